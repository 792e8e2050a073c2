"""Training: nnU-Net raw datasets of (corrected) cases, training runs and their export as models.

May import the core, detection and exports; nothing of cohort, phantom, mrml or cli.
"""
