"""Detection: one case from volumes to PRL labels, lesion features and burden (images → … → pipeline).

May import the core (settings, errors, results) and exports; nothing of cohort, training, phantom, mrml or cli.
"""
