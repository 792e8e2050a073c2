"""PRLDetectorLib: paramagnetic rim lesion detection on QSM (+FLAIR) with nnU-Net v2.

The core is pure Python (SimpleITK, numpy, scipy, nnU-Net); it imports neither ``slicer`` nor ``qt``.
Only :mod:`PRLDetectorLib.mrml_bridge` speaks MRML.
"""

__version__ = "0.1.0"
