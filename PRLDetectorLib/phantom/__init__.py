"""Phantom: synthetic patients with known PRLs (anatomy, lesions, QSM and FLAIR) for demos, tests and training.

May import the core, detection and exports; nothing of cohort, training, mrml or cli.
"""
