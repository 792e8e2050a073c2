"""HTML reports: a page per patient with every lesion pictured, in radiological orientation, and a cohort page."""

from __future__ import annotations

import base64
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from result_fixtures import write_phantom, write_truth_result_of_case

from PRLDetectorLib.cohort.batch import BatchReport, write_cohort_tables
from PRLDetectorLib.cohort.report import (
    LESION_COLOR,
    _planes,
    case_report_html,
    cohort_report_html,
)

PNG = re.compile(r"src='data:image/png;base64,([^']+)'")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two phantom patients (2 PRLs with FLAIR; none without) and their results, as a batch leaves them."""
    root = tmp_path_factory.mktemp("cohort")
    cases, out = root / "cases", root / "out"
    write_phantom(cases, "p1", seed=21, n_prl=2, with_flair=True)
    write_phantom(cases, "p2", seed=22, n_prl=0, with_flair=False)
    for case in ("p1", "p2"):
        write_truth_result_of_case(cases / case, out / case)
    return cases, out


@pytest.fixture(scope="module")
def p1_page(cohort) -> str:
    return case_report_html(cohort[1] / "p1")


def images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in PNG.findall(page)]


def test_the_patient_page_shows_the_burden_the_table_and_one_picture_per_lesion(p1_page):
    page = p1_page
    assert "<b>2</b>" in page  # the PRL count
    assert page.count("<tr>") == 3  # header and two lesions
    pictures = images(page)
    assert len(pictures) == 2
    assert "Radiological convention" in page
    # Self-contained: every image is inline, nothing is fetched from elsewhere.
    assert "src='http" not in page and "src=\"" not in page
    # QSM and FLAIR rows: the strip is about twice as tall as a QSM-only one would be.
    width, height = pictures[0].size
    assert width > 900 and height > 0.4 * width


def test_each_lesion_picture_draws_the_lesion_outline(p1_page):
    picture = np.asarray(images(p1_page)[0]).astype(int)
    yellow = np.array([int(LESION_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    outline = np.abs(picture - yellow).sum(axis=2) < 60
    # The outline appears in the three outlined views of both rows: many pixels, spread across the width.
    assert outline.sum() > 200
    columns = np.flatnonzero(outline.any(axis=0))
    assert columns.max() - columns.min() > picture.shape[1] * 0.5


def test_each_view_carries_orientation_letters_the_qsm_window_and_the_first_a_10_mm_scale_bar(cohort, monkeypatch):
    import PRLDetectorLib.cohort.report as report

    figures = []
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or "")
    case_report_html(cohort[1] / "p1")
    assert len(figures) == 2  # one strip per lesion
    axes = np.array(figures[0].axes).reshape(2, 5)  # QSM row, FLAIR row; locator + four views
    letters = {"axial": {"R", "L", "A", "P"}, "coronal": {"R", "L", "S", "I"}, "sagittal": {"A", "P", "S", "I"}}
    for row in axes:
        for ax, plane in zip(row, ("axial", "axial", "axial", "coronal", "sagittal"), strict=True):
            assert letters[plane] <= {text.get_text() for text in ax.texts}, plane
    for ax in axes[0]:
        assert ax.get_images()[0].get_clim() == pytest.approx(report.QSM_WINDOW_PPM) == (-0.15, 0.25)
    bars = [line for line in axes[0, 1].get_lines() if len(line.get_xdata()) == 2]
    assert len(bars) == 1 and "10 mm" in {text.get_text() for text in axes[0, 1].texts}
    assert np.ptp(bars[0].get_xdata()) == pytest.approx(10.0 / report.CROP_SPACING_MM)
    crop_pixels = axes[0, 1].get_images()[0].get_array().shape[1]
    assert crop_pixels * report.CROP_SPACING_MM == pytest.approx(report.CROP_MM, abs=report.CROP_SPACING_MM)


def test_a_patient_without_prls_is_said_to_have_none(cohort):
    _, out = cohort
    page = case_report_html(out / "p2")
    assert "No PRL was found." in page and not images(page)


def test_views_are_radiological_the_patients_left_on_the_images_right():
    # An LPS crop (z, y, x): x grows to the patient's left, y to posterior, z to superior.
    crop = np.zeros((9, 9, 9))
    crop[4, 4, 8] = 1.0  # patient's far left, at the centre in y and z
    crop[8, 4, 4] = 2.0  # most superior
    crop[4, 0, 4] = 3.0  # most anterior
    planes = _planes(crop)
    assert planes["axial"][4, 8] == 1.0  # left of the patient on the right of the image
    assert planes["axial"][0, 4] == 3.0  # anterior at the top
    assert planes["coronal"][0, 4] == 2.0  # superior at the top
    assert planes["coronal"][4, 8] == 1.0
    assert planes["sagittal"][4, 0] == 3.0  # anterior on the left
    assert planes["sagittal"][0, 4] == 2.0


def test_the_cohort_page_links_patients_lists_failures_and_compares_with_truth(cohort, tmp_path):
    cases, out_original = cohort
    out = tmp_path / "out"
    shutil.copytree(out_original, out)
    (out / "p1" / "report.html").write_text("<html></html>", encoding="utf-8")
    write_cohort_tables(out, BatchReport(failed={"p3": "The QSM is all zero; check the export."}))
    page = cohort_report_html(out, gt_dir=cases)
    assert "cohort of 2 patient(s)" in page
    assert "href='p1/report.html'" in page and "href='p2/report.html'" not in page
    assert "The QSM is all zero" in page
    assert "Against ground truth" in page and "100.0 % (2/2)" in page  # lesion sensitivity of the truth
    assert len(images(page)) == 2  # distributions, and predicted against true counts


def test_the_flair_row_uses_the_registration_detection_recorded(cohort):
    # Detection records its FLAIR registration in burden.json; the report must show FLAIR exactly as the
    # network saw it, not a registration of its own. A recorded 4 mm shift must therefore show up.
    import json

    import SimpleITK as sitk

    from PRLDetectorLib.cohort.report import _load_volumes
    from PRLDetectorLib.detection.registration import Alignment, euler_from_record

    cases, out = cohort
    record = json.loads((out / "p1" / "burden.json").read_text(encoding="utf-8"))
    qsm = sitk.ReadImage(str(cases / "p1" / "qsm.nii.gz"), sitk.sitkFloat32)
    flair = sitk.ReadImage(str(cases / "p1" / "flair.nii.gz"), sitk.sitkFloat32)
    centre = qsm.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in qsm.GetSize()])
    recorded = Alignment("rigid registration", 1.0, 0.9, 0.95, (0.0, 0.0, 0.05, 4.0, 0.0, 0.0), centre)
    record["flair_alignment"] = recorded.to_dict()
    shown = sitk.GetArrayFromImage(_load_volumes(out / "p1", record).flair)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(flair, qsm, euler_from_record(record["flair_alignment"]), sitk.sitkLinear, 0.0, flair.GetPixelID()))
    np.testing.assert_array_equal(shown, expected)
    # A recorded "resampled" (a registration detection tried and rejected) is not registered again.
    record["flair_alignment"] = Alignment("resampled", 1.0, 0.9, 0.9).to_dict()
    plain = sitk.GetArrayFromImage(sitk.Resample(flair, qsm, sitk.Transform(), sitk.sitkLinear, 0.0, flair.GetPixelID()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_load_volumes(out / "p1", record).flair), plain)
    # Without a recorded registration the report aligns FLAIR itself, which is not that shift.
    record["flair_alignment"] = None
    own = sitk.GetArrayFromImage(_load_volumes(out / "p1", record).flair)
    assert np.abs(own.astype(float) - expected).mean() > 0.05 * np.abs(expected).mean()


def test_a_qsm_only_batch_pictures_only_the_qsm_even_when_the_patient_has_a_flair(cohort, tmp_path):
    # Detection did not use the FLAIR, so registering it only for the pictures (~9 s a patient) is not done:
    # the report shows the scans detection saw.
    from PRLDetectorLib.cohort.batch import Case, CaseExports, write_exports

    cases, _ = cohort
    target = tmp_path / "p1"
    write_truth_result_of_case(cases / "p1", target, with_flair=False)
    case = Case("p1", cases / "p1" / "qsm.nii.gz", cases / "p1" / "flair.nii.gz")
    write_exports(case, target, CaseExports(report=True))
    pictures = images((target / "report.html").read_text(encoding="utf-8"))
    assert len(pictures) == 2
    width, height = pictures[0].size
    assert height < 0.4 * width, "a FLAIR row was drawn for a QSM-only result"


def test_the_report_command_makes_one_patients_page_or_a_batchs_pages_and_redo_remakes_them(cohort, tmp_path):
    from conftest import assert_refused, run_cli

    _, original = cohort
    out = tmp_path / "out"
    shutil.copytree(original, out)
    done = run_cli("report", "--results", out / "p1")
    assert done.returncode == 0, done.stderr
    assert len(images((out / "p1" / "report.html").read_text(encoding="utf-8"))) == 2
    write_cohort_tables(out, BatchReport())
    (out / "p1" / "report.html").write_text("<html>kept</html>", encoding="utf-8")
    done = run_cli("report", "--results", out)
    assert done.returncode == 0, done.stderr
    assert "cohort of 2 patient(s)" in (out / "report.html").read_text(encoding="utf-8")
    assert (out / "p1" / "report.html").read_text(encoding="utf-8") == "<html>kept</html>"  # not remade
    assert "No PRL was found." in (out / "p2" / "report.html").read_text(encoding="utf-8")  # made
    assert run_cli("report", "--results", out, "--redo").returncode == 0
    assert len(images((out / "p1" / "report.html").read_text(encoding="utf-8"))) == 2  # remade
    assert_refused(run_cli("report", "--results", out, "--clinical", out / "burden.csv"),
                   "Give --clinical and --outcome together")
    assert_refused(run_cli("report", "--results", tmp_path), "neither a detect result")
