"""Render the README picture of a phantom patient: QSM, FLAIR and the ground-truth contours.

    .venv/bin/python Testing/Scripts/render_phantom_figure.py [--seed 5] [--out phantom.png]

The default output is Resources/Screenshots/phantom.png, the picture the README shows.

Top row: QSM through the basal ganglia; QSM (axial, coronal) and FLAIR through a PRL with the ground truth
outlined; a 9 mm maximum-intensity slab of QSM, where veins show as lines. Bottom row: close-ups of two PRLs,
a rimless lesion and a microbleed, and the case's numbers. Images are radiological (patient's right on the
left); QSM is windowed at -0.15..0.25 ppm.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from PRLDetectorLib.phantom.anatomy import NUCLEI  # noqa: E402
from PRLDetectorLib.phantom.phantom import generate_case  # noqa: E402

logger = logging.getLogger("render_phantom_figure")
QSM_WINDOW = (-0.15, 0.25)
COLOURS = {"prl": "#ff3b30", "rimless": "#ffd60a", "microbleed": "#32d2ff"}


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    # Arrays are (z, y, x) with x towards the patient's right: flip x for the radiological view.
    return volume[z, :, ::-1]


def _coronal(volume: np.ndarray, y: int) -> np.ndarray:
    return volume[:, y, ::-1]


def _show(ax, image: np.ndarray, window: tuple[float, float] | None, title: str) -> None:
    vmin, vmax = window if window else np.percentile(image[image > 0], [0.5, 99.7])
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
    ax.set_title(title, color="white", fontsize=9, pad=3)
    ax.set_axis_off()


def _outline(ax, instances: np.ndarray, truth: dict, classes=("prl", "rimless", "microbleed")) -> None:
    for cls in classes:
        ids = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == cls]
        mask = np.isin(instances, ids)
        if mask.any():
            ax.contour(mask, [0.5], colors=COLOURS[cls], linewidths=0.8)


def _flair_on_qsm_grid(case) -> np.ndarray:
    matrix = np.array(case.truth["flair"]["qsm_to_flair_lps"])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return sitk.GetArrayFromImage(sitk.Resample(case.flair, case.qsm, transform, sitk.sitkLinear, 0.0))


def _centre_index(case, lesion: dict) -> tuple[int, int, int]:
    """(z, y, x) voxel of a lesion's centre, in the flipped display x."""
    x, y, z = case.qsm.TransformPhysicalPointToIndex(lesion["center_lps_mm"])
    return z, y, x


def _zoom(ax, qsm: np.ndarray, case, lesion: dict, half: int = 12) -> None:
    # No outline here: it would sit on the very rim the close-up is meant to show.
    z, y, x = _centre_index(case, lesion)
    crop = qsm[z, max(y - half, 0): y + half + 1, max(x - half, 0): x + half + 1][:, ::-1]
    rim = f" · rim {lesion['rim_coverage']:.0%}" if lesion["rim_coverage"] else ""
    _show(ax, crop, QSM_WINDOW, f"{lesion['class']} · {lesion['diameter_mm']:.0f} mm{rim}")


def _brain_box(tissue: np.ndarray, margin: int = 3) -> tuple[slice, slice, slice]:
    """Bounding box of the brain, so that the panels show head rather than empty background."""
    nonzero = np.nonzero(tissue)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in nonzero)


def render(seed: int, out: Path) -> None:
    case = generate_case("case_figure", seed, with_flair=True, n_prl=5)
    qsm = sitk.GetArrayFromImage(case.qsm)
    instances = sitk.GetArrayFromImage(case.gt_instances)
    tissue = sitk.GetArrayFromImage(case.tissue)
    flair = _flair_on_qsm_grid(case)
    lesions = case.truth["lesions"]
    prls = sorted((lesion for lesion in lesions if lesion["class"] == "prl"),
                  key=lambda lesion: -lesion["voxels"])
    rimless = sorted((lesion for lesion in lesions if lesion["class"] == "rimless"),
                     key=lambda lesion: (-lesion["rim_coverage"], -lesion["voxels"]))
    bleeds = [lesion for lesion in lesions if lesion["class"] == "microbleed"]

    pallidum = np.argwhere(tissue == NUCLEI[0].label)
    z_nuclei = int(np.median(pallidum[:, 0])) if pallidum.size else qsm.shape[0] // 2
    z_prl, y_prl, _ = _centre_index(case, prls[0])

    # Zooms read the full arrays; the overview panels show the brain's bounding box only.
    full_qsm = qsm
    box = _brain_box(tissue)
    z_nuclei, z_prl, y_prl = z_nuclei - box[0].start, z_prl - box[0].start, y_prl - box[1].start
    qsm, instances, flair = qsm[box], instances[box], flair[box]

    fig, axes = plt.subplots(2, 5, figsize=(14, 7.0), facecolor="black")
    _show(axes[0, 0], _axial(qsm, z_nuclei), QSM_WINDOW, "QSM: deep grey nuclei, veins")
    _show(axes[0, 1], _axial(qsm, z_prl), QSM_WINDOW, "QSM through a PRL + ground truth")
    _outline(axes[0, 1], _axial(instances, z_prl), case.truth)
    _show(axes[0, 2], _coronal(qsm, y_prl), QSM_WINDOW, "QSM coronal")
    _outline(axes[0, 2], _coronal(instances, y_prl), case.truth)
    _show(axes[0, 3], _axial(flair, z_prl), None, "FLAIR (own grid, realigned)")
    _outline(axes[0, 3], _axial(instances, z_prl), case.truth)
    slab = qsm[max(z_prl - 4, 0): z_prl + 5].max(axis=0)[:, ::-1]
    _show(axes[0, 4], slab, (-0.1, 0.35), "QSM 9 mm max-intensity slab")

    zooms = prls[:2] + rimless[:1] + (bleeds[:1] if bleeds else prls[2:3])
    for ax, lesion in zip(axes[1, :4], zooms, strict=False):
        _zoom(ax, full_qsm, case, lesion)
    axes[1, 4].set_axis_off()
    size = "×".join(str(n) for n in case.qsm.GetSize())
    legend = "\n".join([
        f"seed {seed}, 1 mm, {size}",
        f"PRL {case.truth['prl_count']}, rimless {case.truth['rimless_count']},",
        f"microbleeds {case.truth['microbleed_count']}, veins {case.truth['veins']}",
        f"TKD threshold {case.truth['qsm']['tkd_threshold']:.2f}",
        "QSM window -0.15..0.25 ppm",
        "",
        "outlines: red PRL, yellow rimless,",
        "cyan microbleed",
    ])
    axes[1, 4].text(0.02, 0.5, legend, color="white", fontsize=9, va="center", family="monospace",
                    transform=axes[1, 4].transAxes)
    fig.tight_layout(pad=0.4)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    logger.info("Wrote %s (%.0f KB)", out, out.stat().st_size / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "phantom.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    render(args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
