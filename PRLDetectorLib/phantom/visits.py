"""Follow-up visits of a phantom patient: the same brain scanned again, its PRLs changed in known ways.

Visit 1 is exactly the case :func:`~PRLDetectorLib.phantom.phantom.generate_case` makes for the seed
(byte-identical); every later visit draws from random streams of its own, so asking for visits never
changes visit 1. From one visit to the next:

* the head lies differently in the scanner (1-5 degrees, 2-8 mm) and the follow-up has its own voxel grid;
* each PRL persists (its rim as it was, or fainter), enlarges (grows 1.5-2.5 mm all round, its rim at the
  new edge: the slowly expanding kind), resolves (the rim is gone, the lesion stays as a rimless lesion) or
  disappears (rim and lesion gone);
* new PRLs appear, and new rimless lesions (which are not PRLs);
* rimless lesions, microbleeds and veins stay as they were.

The later visit is made from the earlier one: the template anatomy is warped afresh onto the new grid
through the moved head, and what was painted on top of it (lesions, veins, microbleeds, tissue texture),
changes included, is carried over by the head motion. QSM and FLAIR are simulated again (new noise, new
reconstruction settings), as a new session gives. A lesion keeps its id across visits: id 7 at visit 2 is
the lesion that was id 7 at visit 1. ``visits.json`` says what happened to every PRL and how the head moved.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm import tqdm

from PRLDetectorLib.changes import DISAPPEARED, ENLARGING, NEW, NOT_IMAGED, PERSISTING, RESOLVED
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.phantom.anatomy import (
    BRAIN_CENTRE_LPS,
    VEIN,
    VENTRICLE,
    WM,
    load_template,
    template_chi,
    warp,
)
from PRLDetectorLib.phantom.lesions import (
    GAP_VOXELS,
    MICROBLEED,
    PRL,
    RIMLESS,
    VEIN_CLEARANCE_VOXELS,
    Lesion,
    Scene,
    _rim_weight,
    place_ms_lesion,
    random_unit,
)
from PRLDetectorLib.phantom.phantom import (
    GENERATOR_VERSION,
    VARY_GRID_SPACINGS,
    WHOLE_BRAIN_EXTENT_MM,
    PhantomCase,
    _image_like,
    _lesion_truth,
    _make_grid,
    case_seed,
    generate_case,
    simulate_flair,
    simulate_qsm,
    write_case,
)

logger = logging.getLogger(__name__)

MAX_VISITS = 6
VISITS_NAME = "visits.json"
"""The patient's change truth, next to its visit folders."""
VISIT_STREAM = 0x5EC
"""Mixed into the seed of every later visit's random streams, so they never meet visit 1's."""
FATES = (PERSISTING, ENLARGING, RESOLVED, DISAPPEARED)
FATE_WEIGHTS = (0.45, 0.2, 0.25, 0.1)
FAINTER_SHARE = 0.5
"""Share of persisting PRLs whose rim fades a little (to 70-90 % of its contrast)."""
MIN_GROWTH = 1.3
"""An enlarging PRL grows at least this much in volume; one boxed in by its neighbours persists instead."""
MIN_IMAGED_SHARE = 0.5
"""A PRL with less of its volume inside the follow-up's field of view is ``not imaged``."""


def visit_folder(visit: int) -> str:
    return f"visit_{visit}"


@dataclass
class PatientVisits:
    """The visits of one phantom patient and what changed between them (the ``visits.json`` content)."""

    visits: list[PhantomCase]
    record: dict


def generate_visits(case_id: str, seed: int, n_visits: int = 2, with_flair: bool = False,
                    spacing_mm: float | tuple = 1.0, extent_mm: float | tuple | None = None,
                    n_prl: int | None = None) -> PatientVisits:
    """Simulate ``n_visits`` visits of one patient; visit 1 is ``generate_case`` with the same arguments."""
    _check_visits(n_visits)
    started = time.perf_counter()
    visits = [generate_case(case_id, seed, with_flair=with_flair, spacing_mm=spacing_mm, extent_mm=extent_mm,
                            n_prl=n_prl)]
    dates_rng = np.random.default_rng(np.random.SeedSequence([int(seed), VISIT_STREAM, 0]))
    date = dt.datetime(2018, 1, 1, 8) + dt.timedelta(days=int(dates_rng.integers(0, 5 * 365)),
                                                   minutes=int(dates_rng.integers(0, 10 * 60)))
    dates = [date]
    intervals = []
    for visit in range(2, int(n_visits) + 1):
        streams = np.random.SeedSequence([int(seed), VISIT_STREAM, visit]).spawn(5)
        rngs = [np.random.default_rng(stream) for stream in streams]
        case, interval = _follow_up(visits[-1], visit, rngs, with_flair, extent_mm is not None)
        years = float(dates_rng.uniform(0.75, 2.5))
        dates.append(dates[-1] + dt.timedelta(days=round(years * 365.25), minutes=int(dates_rng.integers(-120, 120))))
        interval["years"] = round((dates[-1] - dates[-2]).total_seconds() / (365.25 * 86400), 4)
        visits.append(case)
        intervals.append(interval)
    record = {
        "case_id": case_id,
        "seed": int(seed),
        "visits": [{"visit": k, "folder": visit_folder(k), "acq_time": d.isoformat(timespec="seconds")}
                   for k, d in enumerate(dates, start=1)],
        "intervals": intervals,
        "generator_version": GENERATOR_VERSION,
    }
    logger.debug("Generated %d visits of %s in %.1f s", n_visits, case_id, time.perf_counter() - started)
    return PatientVisits(visits, record)


def _check_visits(n_visits: int) -> None:
    if not isinstance(n_visits, (int, np.integer)) or not 2 <= n_visits <= MAX_VISITS:
        raise InputError(f"Visits {n_visits!r} is not a whole number from 2 to {MAX_VISITS}; use --visits 2 for a "
                         "baseline and one follow-up.")


# --- one follow-up ------------------------------------------------------------------------------------


@dataclass
class _Painted:
    """A visit's painted state on its own grid, in (z, y, x) arrays, as the next visit changes it."""

    chi: np.ndarray
    instances: np.ndarray
    tissue: np.ndarray
    texture: np.ndarray
    anatomy: np.ndarray
    """The template's susceptibility alone on this grid: ``chi - anatomy`` is what was painted on top."""
    spacing_zyx: np.ndarray
    chi_wm: float


def _follow_up(prev: PhantomCase, visit: int, rngs: list[np.random.Generator], with_flair: bool,
               cropped: bool) -> tuple[PhantomCase, dict]:
    rng_motion, rng_changes, rng_new, rng_qsm, rng_flair = rngs
    template = load_template()
    patient = prev.patient
    grid_prev = prev.qsm
    tissue = patient["tissue"]
    painted = _Painted(
        chi=sitk.GetArrayFromImage(prev.chi),
        instances=sitk.GetArrayFromImage(prev.gt_instances),
        tissue=sitk.GetArrayFromImage(prev.tissue),
        texture=np.asarray(patient["texture"], np.float32),
        anatomy=warp(template_chi(template, tissue), grid_prev, patient["transform"]),
        spacing_zyx=np.array(grid_prev.GetSpacing()[::-1]),
        chi_wm=tissue.chi_wm,
    )
    voxel_prev = float(np.prod(grid_prev.GetSpacing()))
    properties = {lesion["id"]: dict(lesion) for lesion in prev.truth["lesions"]}
    retired = list(prev.truth.get("retired_lesion_ids", []))
    volumes_before = _volumes(painted.instances, voxel_prev)
    changes = _change_prls(painted, properties, rng_changes)
    retired += [c["lesion_id"] for c in changes if c["class"] == DISAPPEARED]
    next_id = max([*properties, *retired, 0]) + 1
    new_prls, new_rimless = _add_lesions(painted, properties, next_id, rng_new)
    changes += [{"lesion_id": i, "class": NEW} for i in new_prls]
    volumes_changed = _volumes(painted.instances, voxel_prev)

    # The head moves: a point of the follow-up scanner shows the anatomy at motion(point) of the earlier one.
    motion, motion_info = _head_motion(rng_motion)
    spacing = VARY_GRID_SPACINGS[rng_motion.integers(len(VARY_GRID_SPACINGS))]
    size_prev = np.array(grid_prev.GetSize())
    extent = tuple(float(v) for v in size_prev * np.array(grid_prev.GetSpacing()))
    if cropped:
        centre_prev = grid_prev.TransformContinuousIndexToPhysicalPoint([float(v) for v in (size_prev - 1) / 2])
        # The operator places the box on the anatomy again, to within a couple of millimetres.
        centre = np.array(motion.GetInverse().TransformPoint(centre_prev)) + rng_motion.uniform(-2.0, 2.0, 3)
    else:
        extent, centre = WHOLE_BRAIN_EXTENT_MM, BRAIN_CENTRE_LPS
    grid = _make_grid(spacing, extent, np.asarray(centre, float))
    transform = sitk.CompositeTransform(patient["transform"])
    transform.AddTransform(motion)  # the motion first, then the earlier visit's way to the template

    labels = warp(template.labels_image, grid, transform, sitk.sitkNearestNeighbor)
    anatomy = warp(template_chi(template, tissue), grid, transform)
    painted_on_top = _image_like((painted.chi - painted.anatomy).astype(np.float32), grid_prev)
    chi = anatomy + _moved(painted_on_top, grid, motion, sitk.sitkBSpline)
    texture = _moved(_image_like(painted.texture, grid_prev), grid, motion, sitk.sitkLinear)
    veins = _moved(_image_like((painted.tissue == VEIN).astype(np.uint8), grid_prev), grid, motion)
    labels[(veins > 0) & (labels > 0)] = VEIN
    instances = _moved(_image_like(painted.instances, grid_prev), grid, motion).astype(np.uint16)
    instances[labels == 0] = 0
    spacing_zyx = np.array(spacing[::-1])
    qsm, qsm_info = simulate_qsm(chi.astype(np.float32), labels > 0, spacing_zyx, rng_qsm)

    volumes = _volumes(instances, float(np.prod(spacing)))
    lesions = _lesions_on_grid(instances, properties, rng_flair)
    for change in changes:
        lesion_id = change["lesion_id"]
        if change["class"] != NEW:
            change["volume_before_mm3"] = round(volumes_before.get(lesion_id, 0.0), 3)
        if change["class"] != DISAPPEARED:
            change["volume_after_mm3"] = round(volumes.get(lesion_id, 0.0), 3)
            # Of what the lesion is now, how much the follow-up's field of view holds.
            imaged = volumes.get(lesion_id, 0.0) / max(volumes_changed.get(lesion_id, 0.0), 1e-9)
            if change["class"] != NEW and imaged < MIN_IMAGED_SHARE:
                change["drawn_class"], change["class"] = change["class"], NOT_IMAGED
    flair, flair_info = (None, None)
    if with_flair:
        flair, flair_info = simulate_flair(grid, transform, lesions, rng_flair)

    prls = [lesion for lesion in lesions if lesion.cls == PRL]
    truth = {
        "case_id": prev.truth["case_id"],
        "seed": prev.truth["seed"],
        "visit": visit,
        "spacing_mm": list(spacing),
        "size": list(grid.GetSize()),
        "origin_lps_mm": [round(v, 4) for v in grid.GetOrigin()],
        "prl_count": len(prls),
        "rimless_count": sum(lesion.cls == RIMLESS for lesion in lesions),
        "microbleed_count": sum(lesion.cls == MICROBLEED for lesion in lesions),
        "lesions": [_lesion_truth(lesion, grid) for lesion in lesions],
        "veins": prev.truth.get("veins"),
        "tissue_ppm": prev.truth.get("tissue_ppm"),
        "qsm": qsm_info,
        "flair": flair_info,
        "retired_lesion_ids": sorted(retired),
        "generator_version": GENERATOR_VERSION,
    }
    gt_prl = np.isin(instances, [lesion.id for lesion in prls]).astype(np.uint8)
    case = PhantomCase(
        case_id=prev.case_id, qsm=_image_like(qsm, grid), flair=flair, gt_prl=_image_like(gt_prl, grid),
        gt_instances=_image_like(instances, grid), truth=truth, tissue=_image_like(labels, grid),
        chi=_image_like(chi.astype(np.float32), grid),
        patient={"transform": transform, "tissue": tissue, "texture": texture.astype(np.float32)},
    )
    counts = {name: sum(c["class"] == name for c in changes)
              for name in (NEW, PERSISTING, ENLARGING, RESOLVED, DISAPPEARED, NOT_IMAGED)}
    interval = {"from_visit": visit - 1, "to_visit": visit, "head_motion": motion_info,
                "changes": sorted(changes, key=lambda c: c["lesion_id"]), "counts": counts,
                "new_rimless_lesion_ids": new_rimless}
    return case, interval


def _volumes(instances: np.ndarray, voxel_mm3: float) -> dict[int, float]:
    counts = np.bincount(instances.ravel())
    return {int(i): float(counts[i] * voxel_mm3) for i in np.flatnonzero(counts) if i}


def _moved(image: sitk.Image, grid: sitk.Image, motion: sitk.Transform,
           interpolator: int = sitk.sitkNearestNeighbor) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, motion, interpolator, 0.0))


def _head_motion(rng: np.random.Generator) -> tuple[sitk.VersorRigid3DTransform, dict]:
    """The head placed anew in the scanner: 1-5 degrees about a random axis, 2-8 mm."""
    axis = random_unit(rng)[0]
    angle = np.deg2rad(rng.uniform(1.0, 5.0))
    shift = random_unit(rng)[0] * rng.uniform(2.0, 8.0)
    motion = sitk.VersorRigid3DTransform()
    motion.SetCenter(tuple(BRAIN_CENTRE_LPS))
    motion.SetRotation(tuple(axis), float(angle))
    motion.SetTranslation(tuple(shift))
    return motion, {"rotation_deg": round(float(np.rad2deg(angle)), 3),
                    "translation_mm": round(float(np.linalg.norm(shift)), 3), **motion_matrices(motion)}


def motion_matrices(motion: sitk.Transform) -> dict:
    """A rigid head motion (follow-up scanner point → baseline scanner point) as 4x4 LPS matrices both ways.

    ``baseline_to_followup_lps`` is what ``sitk.Resample(followup, baseline, T)`` needs to put the follow-up on
    the baseline grid: what registering the follow-up to the baseline should recover.
    """
    matrix = np.array(motion.GetMatrix()).reshape(3, 3)
    centre = np.array(motion.GetCenter())
    followup_to_baseline = np.eye(4)
    followup_to_baseline[:3, :3] = matrix
    followup_to_baseline[:3, 3] = np.array(motion.GetTranslation()) + centre - matrix @ centre
    return {"followup_to_baseline_lps": np.round(followup_to_baseline, 6).tolist(),
            "baseline_to_followup_lps": np.round(np.linalg.inv(followup_to_baseline), 6).tolist()}


def _change_prls(painted: _Painted, properties: dict[int, dict], rng: np.random.Generator) -> list[dict]:
    """Draw and paint each PRL's fate on the earlier visit's grid; returns one change per PRL."""
    changes = []
    for lesion_id in sorted(properties):
        lesion = properties[lesion_id]
        if lesion["class"] != PRL:
            continue
        fate = FATES[rng.choice(len(FATES), p=FATE_WEIGHTS)]
        box = _box_of(painted.instances, lesion_id, margin=4)
        if box is None:  # not on this grid any more (a cropped field of view)
            continue
        inside = painted.instances[box] == lesion_id
        chi, texture = painted.chi[box], painted.texture[box]
        core = lesion["core_ppm"]
        change = {"lesion_id": lesion_id, "class": fate}
        if fate == ENLARGING and not _enlarge(painted, box, lesion, rng):
            fate = change["class"] = PERSISTING
            change["note"] = "boxed in by its neighbours: it could not grow"
        if fate == PERSISTING and rng.random() < FAINTER_SHARE:
            scale = float(rng.uniform(0.7, 0.9))
            # What was painted is core + (rim - core) * weight above white matter; the rim part fades.
            delta = chi[inside] - texture[inside] - painted.chi_wm
            chi[inside] = painted.chi_wm + core + scale * (delta - core) + texture[inside]
            lesion["rim_ppm"] = lesion["rim_ppm"] * scale
            change["rim_scale"] = round(scale, 3)
        elif fate == RESOLVED:
            chi[inside] = painted.chi_wm + core + texture[inside]
            lesion.update({"class": RIMLESS, "rim_ppm": 0.0, "rim_coverage": 0.0, "rim_thickness_mm": 0.0})
        elif fate == DISAPPEARED:
            chi[inside] = painted.anatomy[box][inside] + texture[inside]
            painted.instances[box][inside] = 0
            del properties[lesion_id]
        changes.append(change)
    return changes


def _box_of(instances: np.ndarray, lesion_id: int, margin: int) -> tuple[slice, ...] | None:
    where = np.argwhere(instances == lesion_id)
    if where.size == 0:
        return None
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, instances.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _enlarge(painted: _Painted, box: tuple[slice, ...], lesion: dict, rng: np.random.Generator) -> bool:
    """Grow a PRL 1.5-2.5 mm all round into white matter, its rim redrawn at the new edge; False if it cannot."""
    grow_mm = float(rng.uniform(1.5, 2.5))
    pad = int(np.ceil(grow_mm / painted.spacing_zyx.min())) + 1
    lo = [max(s.start - pad, 0) for s in box]
    hi = [min(s.stop + pad, n) for s, n in zip(box, painted.instances.shape, strict=True)]
    big = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    instances = painted.instances[big]
    inside = instances == lesion["id"]
    others = ndi.binary_dilation((instances != 0) & ~inside, np.ones((3, 3, 3), bool), iterations=GAP_VOXELS)
    distance = ndi.distance_transform_edt(~inside, sampling=painted.spacing_zyx)
    grown = inside | ((distance <= grow_mm) & (painted.tissue[big] == WM) & ~others)
    if grown.sum() < MIN_GROWTH * inside.sum():
        return False
    centre = np.argwhere(grown).mean(axis=0)
    offsets = np.stack(np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in
                                     zip(grown.shape, centre, painted.spacing_zyx, strict=True)],
                                   indexing="ij"), axis=-1)
    directions = offsets / np.maximum(np.linalg.norm(offsets, axis=-1, keepdims=True), 1e-6)
    weight, covered = _rim_weight(grown, directions, painted.spacing_zyx, lesion["rim_thickness_mm"],
                                  lesion["rim_coverage"], rng)
    core, rim = lesion["core_ppm"], lesion["rim_ppm"]
    delta = core * (1 - np.clip(weight, 0, 1)) + rim * weight
    chi = painted.chi[big]
    chi[grown] = painted.chi_wm + delta[grown] + painted.texture[big][grown]
    instances[grown] = lesion["id"]
    lesion["rim_coverage"] = covered
    return True


def _add_lesions(painted: _Painted, properties: dict[int, dict], next_id: int,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Place new PRLs (0-2) and new rimless lesions (0-1) in free white matter; returns their ids."""
    n_prl = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
    n_rimless = int(rng.random() < 0.4)
    if n_prl + n_rimless == 0:
        return [], []
    cube = np.ones((3, 3, 3), bool)
    occupied = ndi.binary_dilation(painted.instances > 0, cube, iterations=GAP_VOXELS)
    occupied |= ndi.binary_dilation(painted.tissue == VEIN, cube, iterations=VEIN_CLEARANCE_VOXELS)
    scene = Scene(painted.chi, painted.tissue, painted.spacing_zyx, painted.chi_wm, occupied,
                  np.zeros(occupied.shape, bool), painted.instances)
    flat = painted.tissue.ravel()
    wm_voxels = np.flatnonzero((flat == WM) & ~occupied.ravel())
    vent_voxels = np.flatnonzero(flat == VENTRICLE)
    added: dict[str, list[int]] = {PRL: [], RIMLESS: []}
    for cls, n in ((PRL, n_prl), (RIMLESS, n_rimless)):
        for _ in range(n):
            if wm_voxels.size == 0:
                break
            lesion = place_ms_lesion(scene, rng, next_id, cls, wm_voxels, vent_voxels)
            if lesion is None:
                break
            # Placing replaced the tissue texture under the lesion; the texture runs through lesions too.
            painted.chi[lesion.box][lesion.mask] += painted.texture[lesion.box][lesion.mask]
            properties[next_id] = {"id": next_id, "class": cls, "rim_coverage": lesion.rim_coverage,
                                   "rim_thickness_mm": lesion.rim_thickness_mm, "rim_ppm": lesion.rim_ppm,
                                   "core_ppm": lesion.core_ppm}
            added[cls].append(next_id)
            next_id += 1
    return added[PRL], added[RIMLESS]


def _lesions_on_grid(instances: np.ndarray, properties: dict[int, dict], rng: np.random.Generator) -> list[Lesion]:
    """The lesions as they lie on the follow-up grid, for its FLAIR and its truth."""
    lesions = []
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None or index not in properties:
            continue
        lesion = properties[index]
        mask = instances[box] == index
        ms_lesion = lesion["class"] in (PRL, RIMLESS)
        lesions.append(Lesion(
            index, lesion["class"], box, mask, float(lesion.get("diameter_mm", 0.0)),
            rim_coverage=float(lesion["rim_coverage"]), rim_thickness_mm=float(lesion["rim_thickness_mm"]),
            rim_ppm=float(lesion["rim_ppm"]), core_ppm=float(lesion["core_ppm"]),
            flair=float(rng.uniform(0.85, 1.05)) if ms_lesion else 0.0,
        ))
    return lesions


# --- files ---------------------------------------------------------------------------------------------


def write_visits(patient: PatientVisits, out_dir: Path, folder_name: str | None = None) -> Path:
    """Write ``out_dir/<case>/visit_1/``, ``visit_2/``, … (each a phantom case folder) and ``visits.json``."""
    folder = Path(out_dir) / (folder_name or patient.visits[0].case_id)
    if folder.exists():
        raise InputError(f"Case folder {folder} already exists; choose another output folder or remove it.")
    folder.mkdir(parents=True)
    for visit, case in enumerate(patient.visits, start=1):
        write_case(dataclasses.replace(case, case_id=visit_folder(visit)), folder)
    (folder / VISITS_NAME).write_text(json.dumps(patient.record, indent=2) + "\n", encoding="utf-8")
    return folder


def write_visits_bids(patient: PatientVisits, bids_dir: Path, participant: str) -> Path:
    """Add the patient to a BIDS dataset as ``participant`` (``sub-000``): one session per visit
    (``ses-1/anat/sub-000_ses-1_Chimap.nii.gz`` [+ ``_FLAIR``]), its ``sub-000_sessions.tsv`` with each visit's
    ``acq_time``; the phantom folder (truth included) goes to ``sourcedata/phantom/<participant>``."""
    import shutil

    bids_dir = Path(bids_dir)
    if (bids_dir / participant).exists():
        raise InputError(f"{bids_dir / participant} already exists; choose an empty output folder.")
    source = write_visits(patient, bids_dir / "sourcedata" / "phantom", participant)
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        description.write_text(json.dumps({"Name": "PRLDetector phantom visits", "BIDSVersion": "1.10.0",
                                           "DatasetType": "raw", "GeneratedBy": [{"Name": GENERATOR_VERSION}]},
                                          indent=2) + "\n", encoding="utf-8")
    participants = bids_dir / "participants.tsv"
    if not participants.is_file():
        participants.write_text("participant_id\n", encoding="utf-8")
    with participants.open("a", encoding="utf-8") as stream:
        stream.write(f"{participant}\n")
    sessions = ["session_id\tacq_time"]
    for visit in patient.record["visits"]:
        session = f"ses-{visit['visit']}"
        anat = bids_dir / participant / session / "anat"
        anat.mkdir(parents=True)
        for name, suffix in (("qsm", "Chimap"), ("flair", "FLAIR")):
            if (source / visit["folder"] / f"{name}.nii.gz").is_file():
                shutil.copyfile(source / visit["folder"] / f"{name}.nii.gz", anat / f"{participant}_{session}_{suffix}.nii.gz")
        sessions.append(f"{session}\t{visit['acq_time']}")
    (bids_dir / participant / f"{participant}_sessions.tsv").write_text("\n".join(sessions) + "\n", encoding="utf-8")
    return bids_dir / participant


def generate_visit_cohort(out_dir: Path, n: int, seed: int, n_visits: int = 2, with_flair: bool = False,
                          spacing_mm: float | tuple = 1.0, extent_mm: float | tuple | None = None,
                          vary_grid: bool = False, progress: bool = True, bids: bool = False) -> list[Path]:
    """``n`` patients ``case_000``… with ``n_visits`` visits each; visit 1 of each is the case
    :func:`~PRLDetectorLib.phantom.phantom.generate_cohort` makes with the same arguments. With ``bids`` the
    patients are written as a BIDS dataset (``sub-000``…, see :func:`write_visits_bids`)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"Cohort size {n!r} is not a positive whole number.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"Seed {seed!r} is not a non-negative whole number.")
    _check_visits(n_visits)
    out_dir = Path(out_dir)
    width = max(3, len(str(n - 1)))
    case_ids = [f"case_{i:0{width}d}" for i in range(n)]
    folder_names = [f"sub-{c.removeprefix('case_')}" if bids else c for c in case_ids]
    existing = [c for c in folder_names if (out_dir / c).exists()]
    if existing:
        raise InputError(f"Case folder {out_dir / existing[0]} already exists ({len(existing)} of {n}); "
                         "choose an empty output folder.")
    folders = []
    for index in tqdm(range(n), desc="Phantoms", unit="patient", disable=not progress):
        spacing = spacing_mm
        if vary_grid:  # drawn as generate_cohort draws it, so that visit 1 is that cohort's case
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, 1]))
            spacing = VARY_GRID_SPACINGS[rng.integers(len(VARY_GRID_SPACINGS))]
        patient = generate_visits(case_ids[index], case_seed(seed, index), n_visits, with_flair, spacing, extent_mm)
        if bids:
            folders.append(write_visits_bids(patient, out_dir, folder_names[index]))
        else:
            folders.append(write_visits(patient, out_dir))
        counts = patient.record["intervals"][-1]["counts"]
        logger.info("Wrote %s: %d visits; last interval %s", folders[-1], n_visits,
                    ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return folders
