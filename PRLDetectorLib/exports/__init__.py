"""Exports: a result as files other tools read, the Slicer ``.seg.nrrd`` and DICOM SEG.

May import the core and detection; nothing of cohort, training, phantom, mrml or cli.
"""
