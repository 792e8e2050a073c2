"""Cohort: many patients: batch runs, BIDS in and out, HTML reports, evaluation and clinical association.

May import the core, detection and exports; nothing of training, phantom, mrml or cli.
"""
