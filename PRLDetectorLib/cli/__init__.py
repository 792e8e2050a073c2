"""The ``prl-detect`` command line: :mod:`.main` assembles the subcommands each command module registers.

On top of everything: may import every wing; nothing else imports cli.
"""
