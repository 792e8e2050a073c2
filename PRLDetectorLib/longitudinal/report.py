"""The change page: each tracked lesion at baseline and at follow-up, side by side.

Self-contained HTML (pictures inside), like the patient page of :mod:`PRLDetectorLib.cohort.report`, whose
crop and picture helpers it uses. Every crop lies in the baseline's space: the follow-up is resampled through
the registration, so the two rows of a lesion show the same anatomy in the same planes. Outlines: the
visit's own lesion solid yellow; where that visit has no lesion, the other visit's outline dashed white.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.changes import CHANGE_CLASSES, CHANGE_COLORS, CHANGE_MEANINGS
from PRLDetectorLib.cohort import report as pictures
from PRLDetectorLib.longitudinal.tracking import ChangeTable, LesionChange, Measures

CARRIED_COLOR = "#ffffff"
_COLUMNS = (("axial", False), ("axial", True), ("coronal", True), ("sagittal", True))


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def _in_baseline_space(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, linear: bool,
                       outside: float = math.nan) -> np.ndarray:
    """``image`` on a crop grid of baseline space; ``transform`` maps baseline points to ``image``'s points."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform, interpolator, outside, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _shown_qsm(qsm: sitk.Image) -> sitk.Image:
    """Outside the brain black (NaN), as the patient page shows it."""
    values = sitk.GetArrayViewFromImage(qsm)
    shown = sitk.GetImageFromArray(np.where(values != 0, values, np.float32(np.nan)).astype(np.float32))
    shown.CopyInformation(qsm)
    return shown


def _centre(change: LesionChange, table: ChangeTable) -> np.ndarray:
    """Where the tracked lesion lies in baseline space."""
    if change.baseline is not None and np.all(np.isfinite(change.baseline.centroid_lps)):
        return np.array(change.baseline.centroid_lps)
    point = table.alignment.inverse.TransformPoint(tuple(float(v) for v in change.followup.centroid_lps))
    return np.array(point)


def change_figure(table: ChangeTable, change: LesionChange, shown: tuple[sitk.Image, sitk.Image], title: str) -> str:
    """Baseline (top) and follow-up (bottom) crops of one tracked lesion, as a PNG data URI."""
    plt = pictures._pyplot()
    grid = pictures._crop_grid(_centre(change, table))
    identity = sitk.Transform()
    rows = []
    for visit, image, labels_map, transform, detected in (
        ("baseline", shown[0], table.baseline_map, identity, bool(change.baseline_ids)),
        ("follow-up", shown[1], table.followup_map, table.alignment.transform, bool(change.followup_ids)),
    ):
        reference = table.baseline.qsm if visit == "baseline" else table.followup.qsm
        ids = sitk.GetImageFromArray((labels_map == change.change_id).astype(np.float32))
        ids.CopyInformation(reference)
        outline = pictures._planes(_in_baseline_space(ids, grid, transform, linear=True, outside=0.0))
        qsm = pictures._planes(_in_baseline_space(image, grid, transform, linear=True))
        rows.append((visit, qsm, outline, detected))

    fig, axes = plt.subplots(2, 4, figsize=(7.2, 3.85), dpi=110, squeeze=False)
    fig.patch.set_facecolor("black")
    window = pictures.QSM_WINDOW_PPM
    for r, (visit, qsm, outline, detected) in enumerate(rows):
        for c, (plane, with_outline) in enumerate(_COLUMNS):
            ax = axes[r, c]
            ax.imshow(qsm[plane], cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
            ax.set_facecolor("black")
            if with_outline and outline[plane].max() >= 0.5:
                ax.contour(outline[plane], levels=[0.5], colors=[pictures.LESION_COLOR if detected else CARRIED_COLOR],
                           linewidths=0.9, linestyles="solid" if detected else "dashed")
            pictures._letters(ax, plane)
            if c == 0:
                pictures._scale_bar(ax, 1.0 / pictures.CROP_SPACING_MM)
                ax.set_ylabel(visit, color="white", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    for c, heading in enumerate(["axial", "axial + outline", "coronal + outline", "sagittal + outline"]):
        axes[0, c].set_title(heading, color="white", fontsize=7, pad=2)
    fig.suptitle(title, color=_hex(CHANGE_COLORS[change.change]), fontsize=9, x=0.01, ha="left", y=0.995)
    fig.subplots_adjust(left=0.04, right=0.995, bottom=0.01, top=1 - 0.36 / fig.get_figheight(), wspace=0.03,
                        hspace=0.06)
    return pictures._png(fig)


def _volume(measures: Measures | None) -> str:
    return "–" if measures is None or not measures.volume_mm3 else f"{measures.volume_mm3:.0f}"


def _ppb(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{1000 * value:+.0f}"


def _share(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.0%}"


def _ids(ids: tuple[int, ...]) -> str:
    return ", ".join(f"PRL {i}" for i in ids) or "–"


def _title(change: LesionChange) -> str:
    before = f"{_ids(change.baseline_ids)} ({_volume(change.baseline)} mm³)" if change.baseline_ids else "nothing"
    after = f"{_ids(change.followup_ids)} ({_volume(change.followup)} mm³)" if change.followup_ids else "no PRL"
    return f"{change.change_id}. {change.change}: {before} → {after}"


def changes_report_html(table: ChangeTable) -> str:
    """The change page of one comparison (see the module doc)."""
    esc = html.escape
    counts = table.counts()
    registration = table.alignment.to_dict()
    interval = f"{table.years:.2f} years apart" if table.years is not None else "interval unknown (no dates)"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>PRL changes</title>",
        f"<style>{pictures._STYLE}</style></head><body>",
        "<h1>Paramagnetic rim lesions – changes between two visits</h1>",
        f"<div class='meta'>Baseline {esc(table.baseline.source)}; follow-up {esc(table.followup.source)}; "
        f"{interval}. Follow-up registered to baseline (rigid): {registration['translation_mm']:.1f} mm, "
        f"{registration['rotation_deg']:.1f}°, QSM correlation {registration['correlation_before_after'][0]:.2f} → "
        f"{registration['correlation_before_after'][1]:.2f}. Page made "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by PRLDetector {esc(__version__)}. For research "
        "use; every change needs a reader's confirmation.</div>",
        "<div class='burden'>",
        f"<div>PRLs at baseline<b>{len(table.baseline.lesions)}</b></div>",
        f"<div>PRLs at follow-up<b>{len(table.followup.lesions)}</b></div>",
        *(f"<div style='border-left:5px solid {_hex(CHANGE_COLORS[name])}'>{esc(name)}<b>{counts[name]}</b></div>"
          for name in CHANGE_CLASSES if counts[name] or name != "not imaged"),
        "</div>",
        "<p class='note'>" + "; ".join(f"<b>{esc(k)}</b>: {esc(v)}" for k, v in CHANGE_MEANINGS.items()) + ".</p>",
    ]
    if not table.changes:
        parts += ["<p>No PRL at either visit.</p>", "</body></html>"]
        return "\n".join(parts)
    parts.append(
        "<h2>Tracked lesions</h2><table><tr><th>#</th><th>change</th><th>baseline</th><th>follow-up</th>"
        "<th>volume (mm³)</th><th>rim − surround (ppb)</th><th>paramagnetic edge</th><th>evidence</th></tr>")
    for change in table.changes:
        b, f = change.baseline, change.followup
        parts.append(
            f"<tr><td><a href='#c{change.change_id}'>{change.change_id}</a></td>"
            f"<td style='color:{_hex(CHANGE_COLORS[change.change])};font-weight:bold'>{esc(change.change)}</td>"
            f"<td>{esc(_ids(change.baseline_ids))}</td><td>{esc(_ids(change.followup_ids))}</td>"
            f"<td>{_volume(b) if change.baseline_ids else '–'} → {_volume(f) if change.followup_ids else '–'}</td>"
            f"<td>{_ppb(b.rim_minus_surround_ppm) if b else '–'} → {_ppb(f.rim_minus_surround_ppm) if f else '–'}</td>"
            f"<td>{_share(b.paramagnetic_edge_fraction) if b else '–'} → "
            f"{_share(f.paramagnetic_edge_fraction) if f else '–'}</td>"
            f"<td style='text-align:left'>{esc(change.evidence)}</td></tr>")
    parts.append(
        "</table><p class='note'>Measures of a visit that has no lesion there are taken on its QSM inside the other "
        "visit's outline, carried over by the registration. Rim: the lesion's outer 1.5 mm; surround: 1-3 mm "
        "outside it; paramagnetic edge: share of edge directions whose rim is > 20 ppb above the surround.</p>")
    parts.append(
        f"<h2>Baseline and follow-up</h2><p class='note'>{pictures.CONVENTION} Crops of {pictures.CROP_MM:.0f} mm in "
        "the baseline's space (the follow-up resampled through the registration); QSM window "
        f"{pictures.QSM_WINDOW_PPM[0]} to {pictures.QSM_WINDOW_PPM[1]} ppm. Outline of the visit's own PRL "
        "<span style='color:#b59700'>yellow</span>; where a visit has none, the other visit's outline dashed.</p>")
    shown = (_shown_qsm(table.baseline.qsm), _shown_qsm(table.followup.qsm))
    for change in table.changes:
        title = _title(change)
        figure = change_figure(table, change, shown, title)
        parts.append(f"<div class='lesion' id='c{change.change_id}'><img alt='{esc(title)}' src='{figure}'></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
