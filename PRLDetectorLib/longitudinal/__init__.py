"""Longitudinal: two or more visits of one patient: which PRLs are new, persist, enlarge, lost their rim or went.

May import the core, detection, exports and cohort (its BIDS reading and report pictures); nothing of
training, phantom, mrml or cli. mrml and cli import it.
"""
