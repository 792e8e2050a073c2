"""Detection settings: one typed place, validated with a sentence that says what is wrong.

The Slicer parameter node mirrors these fields; the CLI options map onto them one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PRLDetectorLib.errors import InputError

DEVICES = ("auto", "cuda", "mps", "cpu")
CONNECTIVITIES = (6, 18, 26)
OPERATING_POINTS = ("sensitive", "balanced", "specific")
"""Stage 2's presets, picked on validation candidates: most PRLs found / best balance / fewest false calls."""
NO_CLASSIFIER = "off"
"""Operating point that skips stage 2: the network's lesions at ``threshold`` (the paper's method)."""


@dataclass
class DetectionSettings:
    model: str = "qsm"
    """A bundled model name (``qsm``, ``qsm_flair``) or the path of an nnU-Net v2 trained-model folder."""
    device: str = "auto"
    """``auto`` picks CUDA, then MPS, then CPU."""
    tta: bool = False
    """Test-time augmentation by mirroring: about 6x slower on CPU for a small gain."""
    threshold: float = 0.5
    """Voxel PRL probability above which a voxel belongs to a lesion, when stage 2 is off (with stage 2 the
    candidates come from the classifier's own, lower, stage-1 cut-off, as it was trained)."""
    operating_point: str = "balanced"
    """Stage 2, the lesion classifier of the model: ``sensitive``, ``balanced`` or ``specific`` (its cut-offs
    on the calibrated PRL probability), or ``off`` for the network alone. A model without a classifier
    runs as ``off``."""
    min_lesion_mm3: float = 10.0
    """Lesion instances smaller than this are dropped (stage 1 alone; with stage 2 the classifier's candidate
    minimum applies, since it judges each candidate on a patch around it, not by its outline's size)."""
    connectivity: int = 26
    """Voxel connectivity that splits the PRL mask into lesions (6, 18 or 26)."""
    min_rim_coverage: float = 0.0
    """Rim check: lesions whose paramagnetic rim covers less than this share of their edge are dropped
    (``paramagnetic_edge_fraction`` of the lesion table; the consensus PRL definition asks for a rim around
    at least 2/3 of the lesion). 0 keeps every lesion the network finds."""

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first setting that is out of range."""
        if self.device not in DEVICES:
            raise InputError(f"Device '{self.device}' is unknown; use one of {', '.join(DEVICES)}.")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"Threshold {self.threshold} is outside (0, 1); use a probability such as 0.5.")
        if self.min_lesion_mm3 < 0:
            raise InputError(f"Minimum lesion size {self.min_lesion_mm3} mm³ is negative; use 0 or more.")
        if self.connectivity not in CONNECTIVITIES:
            raise InputError(f"Connectivity {self.connectivity} is not 6, 18 or 26; use one of those.")
        check_rim_coverage(self.min_rim_coverage)
        if self.operating_point not in (*OPERATING_POINTS, NO_CLASSIFIER):
            raise InputError(f"Operating point '{self.operating_point}' is unknown; use one of "
                             f"{', '.join((*OPERATING_POINTS, NO_CLASSIFIER))}.")
        if not str(self.model).strip():
            raise InputError("No model is given; name a bundled model (qsm, qsm_flair) or an nnU-Net model folder.")

    def to_dict(self) -> dict:
        return asdict(self)


def check_rim_coverage(value: float) -> None:
    """The rim check's minimum coverage is a share of the lesion edge, 0 (off) to 1."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"Minimum rim coverage {value} is outside [0, 1]; use a share such as 0.67.")
