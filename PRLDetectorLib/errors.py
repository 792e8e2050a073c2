"""Errors the user can fix.

An :class:`InputError` carries one sentence that names the problem and what to do about it. The CLI
prints it and exits with code 2; the Slicer widget shows it in a dialog. Anything else is a bug.
"""


class InputError(Exception):
    """Bad input, bad settings or a bad model folder, explained in one sentence."""
