"""PRLDetectorLib: paramagnetic rim lesion detection on QSM (+FLAIR) with nnU-Net v2.

The core is pure Python (SimpleITK, numpy, scipy, nnU-Net); it imports neither ``slicer`` nor ``qt``.
Only the :mod:`PRLDetectorLib.mrml` wing speaks MRML. Wings by concern (detection, exports, cohort,
training, phantom, mrml, cli) over a core (settings, errors, results, progress); each wing's ``__init__``
says what it may import.
"""

__version__ = "0.1.0"
