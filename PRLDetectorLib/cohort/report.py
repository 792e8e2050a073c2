"""Reports a neuroradiologist can read: one HTML page per patient, one for the cohort.

Pages are self-contained (every picture is a PNG inside the HTML), so they can be mailed or archived.

Patient page: the burden, the lesion table and, for every lesion, a strip of 32 mm crops centred on it:
a locator (the whole axial slice with the crop's square), then axial without outline, axial, coronal and
sagittal with the lesion's outline; QSM on the first row (window −0.15 to 0.25 ppm, paramagnetic bright)
and FLAIR on the second when the patient has one. Views are in radiological convention (the patient's
right on the image's left) and every panel has its orientation letters. Crops are resampled onto an
isotropic 0.5 mm grid aligned with the patient axes, so oblique or anisotropic scans look right.

Cohort page: counts of patients, PRL-positive patients, the distribution of PRL counts, of lesion volumes
and of the patients' total volume; with ground truth, predicted against true counts per patient and the
accuracy table; with a clinical outcome, the association and its plot.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.detection.features import read_lesions_csv
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import LABELS_NAME, LESIONS_NAME, REPORT_NAME, RESULT_MARKER

logger = logging.getLogger(__name__)

QSM_WINDOW_PPM = (-0.15, 0.25)
CROP_MM = 32.0
CROP_SPACING_MM = 0.5
FLAIR_PERCENTILES = (1.0, 99.5)
LESION_COLOR = "#ffd400"
OTHER_LESION_COLOR = "#00c8ff"
CONVENTION = "Radiological convention: the patient's right is on the image's left."


# --- pictures ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a base64 PNG data URI, in a 256-colour palette (a third of the bytes); closes it."""
    from PIL import Image

    fig.canvas.draw()
    rgb = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    _pyplot().close(fig)
    buffer = io.BytesIO()
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class _Volumes:
    """A patient's images on the QSM grid, as the pictures need them."""

    qsm: sitk.Image
    flair: sitk.Image | None
    labels: sitk.Image
    flair_window: tuple[float, float] | None
    qsm_lps: sitk.Image
    """The QSM with its axes permuted and flipped to L, P, S (no interpolation), for the locator."""
    flair_lps: sitk.Image | None


def _load_volumes(result_dir: Path, record: dict) -> _Volumes:
    from PRLDetectorLib.detection.images import head_mask, read_image

    inputs = record.get("inputs", {})
    if "qsm" not in inputs:
        raise InputError(f"{result_dir / 'burden.json'} names no QSM input; run detection again to make a report.")
    qsm = read_image(inputs["qsm"]["path"], "QSM")
    brain = head_mask(sitk.GetArrayViewFromImage(qsm))
    # Outside the head a QSM map is 0 ppm, mid-grey in the window; shown black (NaN), as readers expect.
    shown = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayViewFromImage(qsm), np.float32(np.nan)))
    shown.CopyInformation(qsm)
    labels = sitk.ReadImage(str(result_dir / LABELS_NAME))
    if labels.GetSize() != qsm.GetSize():
        raise InputError(f"The labels in '{result_dir}' are not on the grid of their QSM; run detection again.")
    labels.CopyInformation(qsm)  # NIfTI rounds the header of a DICOM-read grid by ~1e-6 mm
    flair = None
    window = None
    flair_path = inputs.get("flair", {}).get("path")
    if flair_path:
        from PRLDetectorLib.detection.registration import flair_as_recorded, flair_to_qsm_grid

        original = read_image(flair_path, "FLAIR")
        # The alignment detection made and recorded, so FLAIR and outlines agree; else the same alignment
        # detection would make (it is deterministic).
        flair = flair_as_recorded(original, qsm, record.get("flair_alignment"))
        if flair is None:
            flair, _ = flair_to_qsm_grid(original, qsm)
        values = sitk.GetArrayViewFromImage(flair)[brain]
        if values.size:
            low, high = np.percentile(values, FLAIR_PERCENTILES)
            window = (float(low), float(high if high > low else low + 1))
    return _Volumes(
        qsm=shown, flair=flair, labels=labels, flair_window=window, qsm_lps=sitk.DICOMOrient(shown, "LPS"),
        flair_lps=sitk.DICOMOrient(flair, "LPS") if flair is not None else None,
    )


def _crop_grid(centre_lps: np.ndarray) -> sitk.Image:
    """An isotropic grid aligned with the patient axes (LPS), CROP_MM wide, centred on ``centre_lps``."""
    n = int(round(CROP_MM / CROP_SPACING_MM)) | 1  # odd: the middle slices pass through the centre itself
    grid = sitk.Image(n, n, n, sitk.sitkUInt8)
    grid.SetSpacing((CROP_SPACING_MM,) * 3)
    grid.SetOrigin(tuple(centre_lps - CROP_SPACING_MM * (n - 1) / 2))
    return grid


def _resampled(image: sitk.Image, grid: sitk.Image, linear: bool = True, outside: float = math.nan) -> np.ndarray:
    """``image`` on the crop grid; beyond the scan's field of view ``outside`` (NaN shows black)."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), interpolator, outside, sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(out)


def _planes(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Axial, coronal, sagittal slices through the centre of an LPS (z, y, x) crop, ready for imshow.

    Axial: rows anterior→posterior, columns right→left. Coronal: rows superior→inferior, columns
    right→left. Sagittal: rows superior→inferior, columns anterior→posterior.
    """
    c = volume.shape[0] // 2
    return {"axial": volume[c], "coronal": volume[::-1, c, :], "sagittal": volume[::-1, :, c]}


_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def _letters(ax, plane: str) -> None:
    from matplotlib import patheffects

    left, right, top, bottom = _LETTERS[plane]
    # White with a dark edge: readable on bright FLAIR lesions and on black background alike.
    style = {"color": "white", "fontsize": 7, "fontweight": "bold", "transform": ax.transAxes,
             "path_effects": [patheffects.withStroke(linewidth=1.6, foreground="black")]}
    ax.text(0.03, 0.5, left, ha="left", va="center", **style)
    ax.text(0.97, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.97, top, ha="center", va="top", **style)
    ax.text(0.5, 0.03, bottom, ha="center", va="bottom", **style)


def _scale_bar(ax, pixels_per_mm: float, length_mm: float = 10.0) -> None:
    n = ax.get_images()[0].get_array().shape
    x1 = n[1] * 0.95
    y = n[0] * 0.9
    ax.plot([x1 - length_mm * pixels_per_mm, x1], [y, y], color="white", lw=2, solid_capstyle="butt")
    ax.text(x1 - length_mm * pixels_per_mm / 2, y - n[0] * 0.03, f"{length_mm:g} mm", color="white",
            fontsize=6, ha="center", va="bottom")


def _locator(ax, oriented: sitk.Image, centre_lps: np.ndarray, window: tuple[float, float]) -> None:
    """The whole axial slice through the lesion, in radiological orientation, with the crop's square.

    ``oriented`` is the image with its axes along L, P, S, so that rows run anterior to posterior and
    columns the patient's right to left.
    """
    index = oriented.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in centre_lps))
    k = int(np.clip(round(index[2]), 0, oriented.GetSize()[2] - 1))
    values = sitk.GetArrayViewFromImage(oriented)[k]
    sx, sy = oriented.GetSpacing()[:2]
    ax.imshow(values, cmap="gray", vmin=window[0], vmax=window[1], aspect=sy / sx, interpolation="bilinear")
    ax.set_facecolor("black")
    half = CROP_MM / 2
    corner = oriented.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in centre_lps - half))
    ax.add_patch(_pyplot().Rectangle(
        (corner[0], corner[1]), CROP_MM / sx, CROP_MM / sy, fill=False, edgecolor=LESION_COLOR, lw=1.0
    ))
    _letters(ax, "axial")


def lesion_figure(volumes: _Volumes, lesion: dict, title: str | None = None) -> str:
    """The strip of one lesion as a PNG data URI (see the module doc)."""
    plt = _pyplot()
    lesion_id = int(lesion["lesion_id"])
    centre = _lesion_centre(volumes.labels, lesion)
    grid = _crop_grid(centre)
    qsm = _planes(_resampled(volumes.qsm, grid))
    label_values = _resampled(volumes.labels, grid, linear=False, outside=0.0)
    this = _planes(_resampled(sitk.Cast(volumes.labels == lesion_id, sitk.sitkFloat32), grid, outside=0.0))
    others = _planes(((label_values != 0) & (label_values != lesion_id)).astype(np.float32))
    rows = [("QSM", qsm, QSM_WINDOW_PPM, volumes.qsm_lps)]
    if volumes.flair_lps is not None and volumes.flair_window is not None:
        rows.append(("FLAIR", _planes(_resampled(volumes.flair, grid)), volumes.flair_window, volumes.flair_lps))

    fig, axes = plt.subplots(len(rows), 5, figsize=(8.6, 1.78 * len(rows) + 0.25), dpi=110, squeeze=False)
    fig.patch.set_facecolor("black")
    pixels_per_mm = 1.0 / CROP_SPACING_MM
    for r, (name, planes, window, oriented) in enumerate(rows):
        _locator(axes[r, 0], oriented, centre, window)
        columns = [("axial", False), ("axial", True), ("coronal", True), ("sagittal", True)]
        for c, (plane, outline) in enumerate(columns, start=1):
            ax = axes[r, c]
            ax.imshow(planes[plane], cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
            ax.set_facecolor("black")
            if outline:
                if this[plane].max() >= 0.5:
                    ax.contour(this[plane], levels=[0.5], colors=[LESION_COLOR], linewidths=0.9)
                if others[plane].max() >= 0.5:
                    ax.contour(others[plane], levels=[0.5], colors=[OTHER_LESION_COLOR], linewidths=0.6,
                               linestyles="dashed")
            _letters(ax, plane)
            if c == 1:
                _scale_bar(ax, pixels_per_mm)
        axes[r, 0].set_ylabel(name, color="white", fontsize=8)
    headings = ["locator (axial)", "axial", "axial + outline", "coronal + outline", "sagittal + outline"]
    for c, heading in enumerate(headings):
        axes[0, c].set_title(heading, color="white", fontsize=7, pad=2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title:
        fig.suptitle(title, color="white", fontsize=9, x=0.01, ha="left", y=0.995)
    # Room above the panels for the title and the headings: about a third of an inch, whatever the rows.
    fig.subplots_adjust(left=0.03, right=0.995, bottom=0.01, top=1 - 0.36 / fig.get_figheight(),
                        wspace=0.03, hspace=0.06)
    return _png(fig)


def _lesion_centre(labels: sitk.Image, lesion: dict) -> np.ndarray:
    """The lesion's centroid (LPS mm), moved to its nearest lesion voxel when the centroid lies outside it
    (a crescent), so that the three planes cut through the lesion."""
    centre = np.array([lesion[f"centroid_lps_{a}_mm"] for a in "xyz"], dtype=float)
    lo = [int(lesion[f"bbox_min_{a}"]) for a in "ijk"]
    hi = [int(lesion[f"bbox_max_{a}"]) + 1 for a in "ijk"]
    box = sitk.GetArrayViewFromImage(labels)[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] == int(lesion["lesion_id"])
    index = labels.TransformPhysicalPointToIndex(tuple(centre))
    inside = all(lo[d] <= index[d] < hi[d] for d in range(3)) and box[
        index[2] - lo[2], index[1] - lo[1], index[0] - lo[0]]
    if inside or not box.any():
        return centre
    voxels = np.argwhere(box)[:, ::-1] + np.array(lo)  # (i, j, k)
    points = np.array([labels.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)) for ijk in voxels[:4096]])
    return points[np.argmin(np.linalg.norm(points - centre, axis=1))]


# --- patient page ------------------------------------------------------------------------------------

_STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1b1b;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
.meta{color:#555;font-size:13px} .burden{display:flex;gap:28px;margin:14px 0}
.burden div{background:#f3f5f8;border-radius:6px;padding:10px 16px} .burden b{display:block;font-size:22px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{padding:3px 9px;text-align:right}
th{background:#eef1f5} td:first-child,th:first-child{text-align:left} tr:nth-child(even) td{background:#fafbfc}
.lesion{margin:18px 0} .lesion img{max-width:100%;border-radius:4px}
.note{font-size:12px;color:#555} .warn{color:#a35200} pre{background:#f6f8fa;padding:10px;font-size:12px;overflow-x:auto}
"""

_LESION_TABLE = (
    ("lesion_id", "PRL", "{:d}"),
    ("volume_mm3", "volume (mm³)", "{:.1f}"),
    ("centroid_ras_x_mm", "R–L (mm)", "{:.1f}"),
    ("centroid_ras_y_mm", "A–P (mm)", "{:.1f}"),
    ("centroid_ras_z_mm", "S–I (mm)", "{:.1f}"),
    ("prl_probability", "PRL probability", "{:.2f}"),
    ("prl_uncertainty", "± (ensemble)", "{:.2f}"),
    ("probability_mean", "network probability", "{:.2f}"),
    ("rim_minus_surround_ppm", "rim − surround (ppb)", "{:.0f}"),
    ("rim_minus_core_ppm", "rim − core (ppb)", "{:.0f}"),
    ("paramagnetic_edge_fraction", "paramagnetic edge", "{:.0%}"),
)
_PPB_COLUMNS = {"rim_minus_surround_ppm", "rim_minus_core_ppm"}


def _cell(column: str, fmt: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if column in _PPB_COLUMNS:
        value = value * 1000.0
    return fmt.format(int(value) if fmt == "{:d}" else value)


def _read_record(result_dir: Path) -> dict:
    marker = Path(result_dir) / RESULT_MARKER
    if not marker.is_file():
        raise InputError(f"'{result_dir}' holds no burden.json; give the output folder of detect or of one batch patient.")
    return json.loads(marker.read_text(encoding="utf-8"))


def case_report_html(result_dir: Path, case_id: str | None = None) -> str:
    """The patient page of one result folder of ``detect`` (or of one patient of a batch).

    The pictures show the scans detection used: a FLAIR row only when the model read a FLAIR (registering
    a FLAIR only for the pictures would cost a QSM-only batch ~9 s a patient).
    """
    result_dir = Path(result_dir)
    record = _read_record(result_dir)
    case_id = case_id or result_dir.name
    lesions = read_lesions_csv(result_dir / LESIONS_NAME)
    volumes = _load_volumes(result_dir, record)
    burden = record["burden"]
    model = record.get("model", {})
    settings = record.get("settings", {})
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>PRLs – {esc(case_id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Paramagnetic rim lesions – {esc(case_id)}</h1>",
        f"<div class='meta'>Model {esc(str(model.get('name', '?')))} ({esc(str(model.get('version', '?')))}), "
        f"{_stage2(record)}, minimum lesion {settings.get('min_lesion_mm3', '?')} mm³, "
        f"rim check {_rim_check(settings)}; "
        f"detected {esc(str(record.get('created_utc', '?')))}; PRLDetector {esc(__version__)}. "
        "For research use; every lesion needs a reader's confirmation.</div>",
        "<div class='burden'>",
        f"<div>PRLs<b>{burden['prl_count']}</b></div>",
        f"<div>total volume<b>{burden['total_volume_mm3']:.0f} mm³</b></div>",
        f"<div>PRL-positive (≥ 1)<b>{'yes' if burden['positive_ge1'] else 'no'}</b></div>",
        f"<div>≥ 4 PRLs<b>{'yes' if burden['positive_ge4'] else 'no'}</b></div>",
        "</div>",
    ]
    if lesions:
        # A reader goes from the surest call to the least sure one.
        lesions = sorted(lesions, key=lambda row: -(row["prl_probability"]
                                                     if not math.isnan(row["prl_probability"]) else 2.0))
        parts.append("<h2>Lesions</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for _, h, _ in _LESION_TABLE) + "</tr>")
        for lesion in lesions:
            parts.append("<tr>" + "".join(f"<td>{_cell(c, f, lesion[c])}</td>" for c, _, f in _LESION_TABLE) + "</tr>")
        parts.append(
            "</table><p class='note'>Centroids in RAS scanner coordinates (as Slicer shows them). Rim: the "
            "lesion's outer 1.5 mm; surround: 1-3 mm outside it; paramagnetic edge: share of edge directions "
            "whose rim is > 20 ppb above the surround.</p>"
        )
        parts.append(
            f"<h2>Lesion views</h2><p class='note'>{CONVENTION} Crops of {CROP_MM:.0f} mm through the lesion; "
            f"QSM window {QSM_WINDOW_PPM[0]} to {QSM_WINDOW_PPM[1]} ppm (paramagnetic bright). Outline of "
            f"this lesion <span style='color:#b59700'>yellow</span>, of other PRLs "
            f"<span style='color:#0090c0'>dashed blue</span>. The second axial view has no outline, so that "
            "the rim itself is seen.</p>"
        )
        for lesion in lesions:
            lesion_id = int(lesion["lesion_id"])
            title = (f"PRL {lesion_id}: {lesion['volume_mm3']:.0f} mm³ at RAS ({lesion['centroid_ras_x_mm']:.0f}, "
                     f"{lesion['centroid_ras_y_mm']:.0f}, {lesion['centroid_ras_z_mm']:.0f}) mm; rim − surround "
                     f"{_cell('rim_minus_surround_ppm', '{:+.0f}', lesion['rim_minus_surround_ppm'])} ppb"
                     + ("" if math.isnan(lesion["prl_probability"]) else
                        f"; PRL probability {lesion['prl_probability']:.2f} ± {lesion['prl_uncertainty']:.2f}"))
            figure = lesion_figure(volumes, lesion, title)
            parts.append(f"<div class='lesion' id='prl{lesion_id}'><img alt='{esc(title)}' src='{figure}'></div>")
    else:
        parts.append("<p>No PRL was found.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_case_report(result_dir: Path, out_path: Path | None = None) -> Path:
    out_path = Path(out_path) if out_path else Path(result_dir) / REPORT_NAME
    out_path.write_text(case_report_html(result_dir), encoding="utf-8")
    logger.info("Wrote %s", out_path)
    return out_path


# --- cohort page -------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def cohort_figure(burden: list[dict[str, str]], lesions: list[dict[str, str]]) -> str:
    """PRL counts per patient, lesion volumes and total volume per patient, as a PNG data URI."""
    plt = _pyplot()
    counts = np.array([int(row["prl_count"]) for row in burden])
    totals = np.array([float(row["total_volume_mm3"]) for row in burden])
    volumes = np.array([float(row["volume_mm3"]) for row in lesions]) if lesions else np.zeros(0)
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.1), dpi=100, constrained_layout=True)
    ax = axes[0]
    values = np.arange(0, int(counts.max(initial=0)) + 1)
    ax.bar(values, np.bincount(counts, minlength=values.size), color="#1f5fa8", width=0.8)
    ax.axvline(3.5, color="#c0392b", lw=1, ls="--")
    ax.text(3.6, 0.97, "≥ 4", color="#c0392b", fontsize=8, va="top", transform=ax.get_xaxis_transform())
    ax.set_title("PRLs per patient", fontsize=9)
    ax.set_xlabel("PRLs")
    ax.set_ylabel("patients")
    ax = axes[1]
    if volumes.size:
        bins = np.logspace(np.log10(max(volumes.min(), 1.0)), np.log10(volumes.max() * 1.01 + 1), 16)
        ax.hist(volumes, bins=bins, color="#1f5fa8")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([3, 10, 30, 100, 300, 1000, 3000, 10000]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_title(f"Volume of each PRL ({volumes.size} PRLs)", fontsize=9)
    ax.set_xlabel("volume (mm³)")
    ax.set_ylabel("PRLs")
    ax = axes[2]
    ax.hist(totals[counts > 0], bins=12, color="#1f5fa8")
    ax.set_title(f"Total PRL volume of the {int((counts > 0).sum())} PRL-positive patients", fontsize=9)
    ax.set_xlabel("total volume (mm³)")
    ax.set_ylabel("patients")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def counts_figure(pairs: list[tuple[str, int, int]]) -> str:
    """Predicted against true PRL counts, one point per patient, as a PNG data URI."""
    plt = _pyplot()
    true = np.array([t for _, t, _ in pairs])
    predicted = np.array([p for _, _, p in pairs])
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100, constrained_layout=True)
    ax.set_title(f"PRL count per patient, n = {len(pairs)}", fontsize=9)
    top = max(int(true.max(initial=0)), int(predicted.max(initial=0))) + 1
    ax.plot([-0.5, top], [-0.5, top], color="#888", lw=1, ls="--", label="agreement")
    points, sizes = np.unique(np.stack([true, predicted]), axis=1, return_counts=True)
    ax.scatter(points[0], points[1], s=25 + 30 * (sizes - 1), color="#1f5fa8", alpha=0.8, label="patients",
               zorder=3)
    for (x, y), size in zip(points.T, sizes, strict=True):
        if size > 1:
            ax.text(x, y, str(size), color="white", fontsize=7, ha="center", va="center")
    ax.axhline(3.5, color="#c0392b", lw=0.7, ls=":")
    ax.axvline(3.5, color="#c0392b", lw=0.7, ls=":")
    ax.set_xlim(-0.5, top)
    ax.set_ylim(-0.5, top)
    ax.set_xlabel("true PRLs")
    ax.set_ylabel("predicted PRLs")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.6)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def cohort_report_html(
    out_dir: Path, gt_dir: Path | None = None, association=None, association_png: Path | None = None
) -> str:
    """The cohort page of a batch output folder (see the module doc)."""
    out_dir = Path(out_dir)
    burden = _read_csv(out_dir / "burden.csv")
    if not (out_dir / "burden.csv").is_file():
        raise InputError(f"'{out_dir}' holds no burden.csv; give the output folder of a batch.")
    lesions = _read_csv(out_dir / "lesions.csv")
    failures = _read_csv(out_dir / "failures.csv")
    esc = html.escape
    n = len(burden)
    positive = sum(row["positive_ge1"] == "True" for row in burden)
    positive4 = sum(row["positive_ge4"] == "True" for row in burden)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>PRL cohort</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Paramagnetic rim lesions – cohort of {n} patient(s)</h1>",
        f"<div class='meta'>{esc(str(out_dir.resolve()))}; report made "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by PRLDetector {esc(__version__)}.</div>",
        "<div class='burden'>",
        f"<div>patients<b>{n}</b></div>",
        f"<div>PRL-positive (≥ 1)<b>{positive}</b></div>",
        f"<div>≥ 4 PRLs<b>{positive4}</b></div>",
        f"<div>PRLs in all<b>{len(lesions)}</b></div>",
        f"<div>failed<b>{len(failures)}</b></div>",
        "</div>",
    ]
    if burden:
        parts.append(f"<h2>Distribution</h2><img alt='PRL counts and volumes' src='{cohort_figure(burden, lesions)}'>")
    if gt_dir is not None:
        parts += _ground_truth_section(out_dir, Path(gt_dir))
    if association is not None:
        parts.append(f"<h2>Association with {esc(association.outcome)}</h2>")
        if association_png is not None and Path(association_png).is_file():
            data = base64.b64encode(Path(association_png).read_bytes()).decode("ascii")
            parts.append(f"<img alt='association plot' src='data:image/png;base64,{data}'>")
        parts.append(f"<pre>{esc(association.format_table())}</pre>")
    parts.append("<h2>Patients</h2><table><tr><th>patient</th><th>PRLs</th><th>total volume (mm³)</th>"
                 "<th>≥ 1</th><th>≥ 4</th><th>report</th></tr>")
    for row in burden:
        case = row["case_id"]
        link = f"<a href='{esc(case)}/{REPORT_NAME}'>open</a>" if (out_dir / case / REPORT_NAME).is_file() else "–"
        parts.append(
            f"<tr><td>{esc(case)}</td><td>{row['prl_count']}</td><td>{float(row['total_volume_mm3']):.0f}</td>"
            f"<td>{'yes' if row['positive_ge1'] == 'True' else 'no'}</td>"
            f"<td>{'yes' if row['positive_ge4'] == 'True' else 'no'}</td><td>{link}</td></tr>"
        )
    parts.append("</table>")
    if failures:
        parts.append("<h2 class='warn'>Failed patients</h2><table><tr><th>patient</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(f['case_id'])}</td><td style='text-align:left'>{esc(f['reason'])}</td></tr>" for f in failures]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _ground_truth_section(out_dir: Path, gt_dir: Path) -> list[str]:
    from PRLDetectorLib.cohort.evaluation import evaluate_folders

    evaluation = evaluate_folders(gt_dir, out_dir, skip_missing=True)
    pairs = [(c.case_id, c.gt_count, c.pred_count) for c in evaluation.cases]
    return [
        "<h2>Against ground truth</h2>",
        f"<img alt='predicted against true PRL counts' src='{counts_figure(pairs)}'>",
        f"<pre>{html.escape(evaluation.format_table())}</pre>",
    ]


def write_cohort_report(
    out_dir: Path, gt_dir: Path | None = None, association=None, association_png: Path | None = None
) -> Path:
    out_path = Path(out_dir) / REPORT_NAME
    out_path.write_text(cohort_report_html(out_dir, gt_dir, association, association_png), encoding="utf-8")
    logger.info("Wrote %s", out_path)
    return out_path


def _stage2(record: dict) -> str:
    """How the calls were made: the classifier's operating point, or the network's threshold alone."""
    stage2 = record.get("lesion_classifier")
    if stage2:
        return (f"lesion classifier at its {stage2['operating_point']} point (PRL probability ≥ "
                f"{stage2['probability_cutoff']:.2f}; {stage2['called']} of {stage2['candidates']} candidates called, "
                f"expected PRL count {stage2['expected_prl_count']:.1f})")
    return f"network alone, threshold {record.get('settings', {}).get('threshold', '?')}"


def _rim_check(settings: dict) -> str:
    coverage = settings.get("min_rim_coverage") or 0.0
    return f"rim ≥ {100 * coverage:.0f} % of the edge" if coverage > 0 else "off"
