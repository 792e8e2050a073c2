"""BIDS in and out: find the QSM (``Chimap``) scans of a BIDS dataset, write a BIDS derivatives folder.

In: ``sub-<label>/[ses-<label>/]anat/<entities>_Chimap.nii[.gz]`` is one case, named by its entities
(``sub-01_ses-1``); a ``<entities>_FLAIR.nii[.gz]`` in the same folder is its FLAIR.

Out (``derivatives/prldetector/``, next to the batch's own folders):

* ``dataset_description.json`` with ``DatasetType: derivative``, ``GeneratedBy`` and a ``raw`` dataset
  link, and ``descriptions.tsv`` saying what ``desc-PRL`` means;
* per scan, in the scan's own ``sub-*/[ses-*/]anat`` folder:
  ``<entities>_space-orig_desc-PRL_dseg.nii.gz``: lesion ids on the QSM grid (0 background, n = PRL n);
  ``<entities>_space-orig_desc-PRL_dseg.tsv``: the segmentation's look-up table, one row per lesion
  (``index``, ``name``, ``abbreviation``, ``color``, ``mapping`` = 7, BIDS's common label "Lesion") with the
  lesion's measurements as further columns, as BIDS allows for segmentation tables;
  ``<entities>_space-orig_desc-PRL_dseg.json``: the sidecar of both: ``Sources``, ``SpatialReference``
  and a description with units of every TSV column.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PRLDetectorLib import __version__
from PRLDetectorLib.detection.features import LESION_COLUMNS, format_cell, read_lesions_csv
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import LABELS_NAME, LESIONS_NAME, RESULT_MARKER

logger = logging.getLogger(__name__)

PIPELINE_NAME = "prldetector"
BIDS_VERSION = "1.10.0"
QSM_SUFFIX = "Chimap"
FLAIR_SUFFIX = "FLAIR"
DERIVATIVE_ENTITIES = "space-orig_desc-PRL"
BIDS_LESION_LABEL = 7
"""BIDS's common image-derived label for "Lesion"."""
_NIFTI = (".nii.gz", ".nii")
_ENTITY = re.compile(r"^[a-zA-Z]+-[a-zA-Z0-9]+$")
PRL_COLOR = "#ffd400"

LOOKUP_COLUMNS: dict[str, dict[str, str]] = {
    "index": {"Description": "Value of this lesion's voxels in the dseg image (PRL n has value n; 0 is background)."},
    "name": {"Description": "Name of the lesion: PRL 1 is the largest."},
    "abbreviation": {"Description": "Short name of the lesion."},
    "color": {"Description": "Display colour of the lesion, hexadecimal RGB."},
    "mapping": {"Description": "BIDS common image-derived label of the lesion: 7, Lesion."},
}
"""The look-up table columns BIDS defines for discrete segmentations, in the order written."""

LESION_COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "voxels": {"Description": "Number of voxels of the lesion."},
    "volume_mm3": {"Description": "Lesion volume.", "Units": "mm^3"},
    **{
        f"centroid_lps_{axis}_mm": {
            "Description": f"Centroid of the lesion, {axis} coordinate in patient LPS space (DICOM/ITK).",
            "Units": "mm",
        }
        for axis in "xyz"
    },
    **{
        f"centroid_ras_{axis}_mm": {
            "Description": f"Centroid of the lesion, {axis} coordinate in RAS space (NIfTI scanner, Slicer).",
            "Units": "mm",
        }
        for axis in "xyz"
    },
    **{
        f"bbox_{end}_{axis}": {
            "Description": f"{'First' if end == 'min' else 'Last (inclusive)'} voxel index of the lesion's "
            f"bounding box along image axis {axis} (0-based)."
        }
        for end in ("min", "max")
        for axis in "ijk"
    },
    "qsm_mean_ppm": {"Description": "Mean magnetic susceptibility over the lesion.", "Units": "ppm"},
    "qsm_max_ppm": {"Description": "Highest magnetic susceptibility in the lesion.", "Units": "ppm"},
    "probability_mean": {"Description": "Mean PRL probability of the network over the lesion (0 to 1)."},
    "rim_mean_ppm": {
        "Description": "Mean susceptibility of the lesion's rim: voxels within 1.5 mm of its edge.", "Units": "ppm",
    },
    "core_mean_ppm": {
        "Description": "Mean susceptibility of the lesion's core (lesion without rim); n/a when it has none.",
        "Units": "ppm",
    },
    "surround_mean_ppm": {
        "Description": "Mean susceptibility of the tissue 1 to 3 mm outside the lesion.", "Units": "ppm",
    },
    "rim_minus_core_ppm": {"Description": "Rim mean minus core mean susceptibility.", "Units": "ppm"},
    "rim_minus_surround_ppm": {"Description": "Rim mean minus surround mean susceptibility.", "Units": "ppm"},
    "paramagnetic_edge_fraction": {
        "Description": "Share (0 to 1) of the lesion's edge directions whose rim is paramagnetic: mean "
        "susceptibility more than 0.02 ppm above the surround."
    },
    "prl_probability": {
        "Description": "Calibrated probability (0 to 1) that the lesion is a PRL, from the model's lesion "
        "classifier (stage 2); n/a when the classifier did not run."
    },
    "prl_uncertainty": {
        "Description": "Standard deviation of that probability across the classifier's ensemble members."
    },
}
"""Description and units of every lesion measurement in the dseg TSV (all of LESION_COLUMNS but the id)."""


@dataclass(frozen=True)
class BidsScan:
    """One QSM scan of a BIDS dataset and the FLAIR that goes with it."""

    entities: str
    """The file name's entities, e.g. ``sub-01_ses-1_run-2``: the case id."""
    qsm: Path
    flair: Path | None
    anat_dir: Path
    """The scan's folder relative to the dataset root, e.g. ``sub-01/ses-1/anat``."""

    @property
    def participant_id(self) -> str:
        return split_entities(self.entities)["sub"]

    @property
    def session_id(self) -> str:
        return split_entities(self.entities).get("ses", "")


def split_entities(entities: str) -> dict[str, str]:
    """``sub-01_ses-1_run-2`` → ``{"sub": "sub-01", "ses": "ses-1", "run": "run-2"}``."""
    out = {}
    for part in entities.split("_"):
        key, _, _ = part.partition("-")
        out[key] = part
    return out


def _strip_nifti(name: str) -> str | None:
    for extension in _NIFTI:
        if name.endswith(extension):
            return name[: -len(extension)]
    return None


def _entities_of(path: Path, suffix: str) -> str | None:
    stem = _strip_nifti(path.name)
    if stem is None or not stem.endswith(f"_{suffix}"):
        return None
    entities = stem[: -len(suffix) - 1]
    if not entities.startswith("sub-") or not all(_ENTITY.match(part) for part in entities.split("_")):
        return None
    return entities


def _matching_flair(anat: Path, entities: str) -> Path | None:
    flairs = {e: p for p in sorted(anat.iterdir()) if (e := _entities_of(p, FLAIR_SUFFIX))}
    if entities in flairs:
        return flairs[entities]
    if len(flairs) == 1:
        return next(iter(flairs.values()))
    if flairs:
        logger.warning(
            "%s: %d FLAIRs in %s and none named like the QSM; the scan goes without FLAIR.", entities, len(flairs), anat
        )
    return None


def find_bids_scans(bids_dir: Path) -> list[BidsScan]:
    """Every ``*_Chimap.nii[.gz]`` under ``sub-*/[ses-*/]anat/``, in name order."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"The BIDS folder '{bids_dir}' does not exist; give the root of a BIDS dataset.")
    if not (bids_dir / "dataset_description.json").is_file():
        logger.warning("%s has no dataset_description.json; reading it as BIDS anyway.", bids_dir)
    anat_dirs = sorted([*bids_dir.glob("sub-*/anat"), *bids_dir.glob("sub-*/ses-*/anat")])
    scans = []
    for anat in anat_dirs:
        for path in sorted(anat.iterdir()):
            entities = _entities_of(path, QSM_SUFFIX)
            if entities is None:
                continue
            owner = split_entities(entities)
            if owner["sub"] != anat.relative_to(bids_dir).parts[0]:
                logger.warning("%s lies in another subject's folder; it is skipped.", path)
                continue
            scans.append(BidsScan(entities, path, _matching_flair(anat, entities), anat.relative_to(bids_dir)))
    if not scans:
        raise InputError(
            f"'{bids_dir}' holds no sub-*/[ses-*/]anat/*_{QSM_SUFFIX}.nii.gz; give a BIDS dataset with QSM "
            f"maps named with the {QSM_SUFFIX} suffix."
        )
    return scans


def derivatives_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "derivatives" / PIPELINE_NAME


def derivative_stem(scan: BidsScan) -> str:
    return f"{scan.entities}_{DERIVATIVE_ENTITIES}_dseg"


def dataset_description(bids_dir: Path, model: dict | None) -> dict:
    """``dataset_description.json`` of the derivatives folder."""
    model_text = f" with the model '{model['name']}' ({model.get('version', 'unversioned')})" if model else ""
    raw = Path(bids_dir).resolve().as_uri()
    return {
        "Name": "PRLDetector: paramagnetic rim lesions",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "PRLDetector",
                "Version": __version__,
                "Description": "Paramagnetic rim lesions of multiple sclerosis found on QSM (+FLAIR) by an "
                f"nnU-Net v2 network{model_text}.",
            }
        ],
        "SourceDatasets": [{"URL": raw}],
        "DatasetLinks": {"raw": raw},
    }


def write_derivatives(bids_dir: Path, out_dir: Path, scans: list[BidsScan]) -> Path:
    """Write (or refresh) the derivatives folder for every scan whose batch result is finished.

    Each scan's result folder is ``out_dir/<entities>`` as the batch writes it. Returns the folder.
    """
    root = derivatives_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    model = None
    written = 0
    for scan in scans:
        result = Path(out_dir) / scan.entities
        if not (result / RESULT_MARKER).is_file():
            continue
        record = json.loads((result / RESULT_MARKER).read_text(encoding="utf-8"))
        model = model or record.get("model")
        write_scan_derivatives(bids_dir, root, scan, result, record)
        written += 1
    _write_json(root / "dataset_description.json", dataset_description(bids_dir, model))
    (root / "descriptions.tsv").write_text(
        "desc_id\tdescription\nPRL\tParamagnetic rim lesions found by PRLDetector, one id per lesion, "
        "on the grid of the source QSM\n",
        encoding="utf-8",
    )
    logger.info("BIDS derivatives of %d scan(s) in %s", written, root)
    return root


def write_scan_derivatives(bids_dir: Path, root: Path, scan: BidsScan, result: Path, record: dict) -> Path:
    """The dseg image, its TSV and its JSON sidecar for one scan; returns the image path."""
    folder = root / scan.anat_dir
    folder.mkdir(parents=True, exist_ok=True)
    stem = derivative_stem(scan)
    image = folder / f"{stem}.nii.gz"
    shutil.copyfile(result / LABELS_NAME, image)
    lesions = read_lesions_csv(result / LESIONS_NAME)
    measured = [c for c in LESION_COLUMNS if c != "lesion_id"]
    header = [*LOOKUP_COLUMNS, *measured]
    lines = ["\t".join(header)]
    for row in lesions:
        lesion_id = int(row["lesion_id"])
        cells = [str(lesion_id), f"PRL {lesion_id}", f"PRL{lesion_id}", PRL_COLOR, str(BIDS_LESION_LABEL)]
        cells += [format_cell(column, row[column], missing="n/a") for column in measured]
        lines.append("\t".join(cells))
    (folder / f"{stem}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    sources = [f"bids:raw:{(scan.anat_dir / scan.qsm.name).as_posix()}"]
    if scan.flair is not None and "flair" in record.get("inputs", {}):
        sources.append(f"bids:raw:{(scan.anat_dir / scan.flair.name).as_posix()}")
    burden = record.get("burden", {})
    sidecar = {
        "Description": "Paramagnetic rim lesions (PRLs): one integer id per lesion, 0 is background.",
        "Sources": sources,
        "SpatialReference": sources[0],
        "PRLCount": burden.get("prl_count"),
        "PRLTotalVolume": burden.get("total_volume_mm3"),
        "PRLTotalVolumeUnits": "mm^3",
        "Model": {k: record.get("model", {}).get(k) for k in ("name", "version", "checkpoint_sha256")},
        "DetectionSettings": record.get("settings"),
        **LOOKUP_COLUMNS,
        **{column: LESION_COLUMN_DESCRIPTIONS[column] for column in measured},
    }
    _write_json(folder / f"{stem}.json", sidecar)
    return image


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
