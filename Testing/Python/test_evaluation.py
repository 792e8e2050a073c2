"""Lesion- and patient-level evaluation on constructed cases with known hits and misses."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PRLDetectorLib.cohort.evaluation import (
    CaseEvaluation,
    CohortEvaluation,
    Proportion,
    compare_lesion_detection,
    evaluate_case,
    evaluate_folders,
    mcnemar,
)
from PRLDetectorLib.errors import InputError


def _constructed_case() -> tuple[np.ndarray, np.ndarray]:
    """Three true PRLs and four predicted lesions along one row of voxels.

    true:  1 at x 0-4, 2 at x 10-14, 3 at x 20-24
    pred: 13 at x 0-1 (2 voxels on PRL 1), 10 at x 3-6 (2 voxels on PRL 1), 11 at x 14-16 (1 voxel on
          PRL 2), 12 at x 27-28 (on nothing)
    """
    gt = np.zeros((3, 3, 30), np.uint16)
    pred = np.zeros_like(gt)
    gt[1, 1, 0:5], gt[1, 1, 10:15], gt[1, 1, 20:25] = 1, 2, 3
    pred[1, 1, 0:2], pred[1, 1, 3:7], pred[1, 1, 14:17], pred[1, 1, 27:29] = 13, 10, 11, 12
    return gt, pred


def test_a_case_with_known_hits_misses_and_false_positives():
    gt, pred = _constructed_case()
    case = evaluate_case(gt, pred, case_id="c1")
    assert case.gt_ids == (1, 2, 3) and case.gt_hits == (True, True, False)
    assert case.pred_ids == (10, 11, 12, 13) and case.pred_hits == (True, True, False, True)
    assert (case.detected, case.missed, case.true_positive_predictions, case.false_positives) == (2, 1, 3, 1)
    # 15 true voxels, 11 predicted, 5 shared.
    assert case.dice == pytest.approx(2 * 5 / (15 + 11))


def test_a_larger_minimum_overlap_turns_a_one_voxel_touch_into_a_miss():
    gt, pred = _constructed_case()
    case = evaluate_case(gt, pred, min_overlap_voxels=2)
    assert case.gt_hits == (True, False, False)
    assert case.pred_hits == (True, False, False, True)
    with pytest.raises(InputError, match="overlap"):
        evaluate_case(gt, pred, min_overlap_voxels=0)


def test_empty_truth_and_prediction_have_no_dice_and_no_lesions():
    empty = np.zeros((2, 2, 2), np.uint16)
    case = evaluate_case(empty, empty)
    assert case.gt_count == case.pred_count == 0 and math.isnan(case.dice)
    with pytest.raises(InputError, match="shape"):
        evaluate_case(empty, np.zeros((2, 2, 3), np.uint16))


def test_proportions_print_the_way_the_paper_does():
    assert str(Proportion(147, 203)) == "72.4 % (147/203)"
    assert str(Proportion(8, 8)) == "100.0 % (8/8)"
    assert str(Proportion(0, 0)) == "n/a (0/0)"
    assert Proportion(147, 203).with_ci() == "72.4 % (147/203), 95 % CI 65.9-78.1 %"


def test_wilson_intervals_match_hand_computed_values():
    z2 = 1.959963984540054**2
    # All successes: the interval is [n / (n + z²), 1]; no successes: [0, z² / (n + z²)].
    assert Proportion(8, 8).wilson_ci() == pytest.approx((8 / (8 + z2), 1.0))
    assert Proportion(0, 10).wilson_ci() == pytest.approx((0.0, z2 / (10 + z2)))
    assert Proportion(147, 203).wilson_ci() == pytest.approx((0.6589, 0.7810), abs=5e-4)
    assert all(math.isnan(v) for v in Proportion(0, 0).wilson_ci())


def _case(case_id: str, gt_count: int, pred_count: int, detected: int = 0, matched: int = 0) -> CaseEvaluation:
    return CaseEvaluation(
        case_id=case_id,
        gt_ids=tuple(range(1, gt_count + 1)),
        gt_hits=tuple(i < detected for i in range(gt_count)),
        pred_ids=tuple(range(1, pred_count + 1)),
        pred_hits=tuple(i < matched for i in range(pred_count)),
        intersection_voxels=10 * matched,
        gt_voxels=20 * gt_count,
        pred_voxels=20 * pred_count,
    )


def test_patient_sensitivity_and_specificity_at_one_and_four_prls():
    cohort = CohortEvaluation(
        cases=(
            _case("A", gt_count=5, pred_count=4, detected=4, matched=4),  # positive at 1 and 4, found
            _case("B", gt_count=2, pred_count=0),  # positive at 1, missed; negative at 4
            _case("C", gt_count=0, pred_count=1),  # negative, called positive at 1
            _case("D", gt_count=0, pred_count=0),  # negative, called negative
        )
    )
    assert cohort.patient_sensitivity(1) == Proportion(1, 2)
    assert cohort.patient_specificity(1) == Proportion(1, 2)
    assert cohort.patient_sensitivity(4) == Proportion(1, 1)
    assert cohort.patient_specificity(4) == Proportion(3, 3)
    assert cohort.lesion_sensitivity == Proportion(4, 7)
    assert cohort.lesion_precision == Proportion(4, 5)
    # Dice: A 80/180, B 0/40, C 0/20, D undefined (left out of the mean).
    assert cohort.mean_dice == pytest.approx((80 / 180) / 3)
    assert cohort.pooled_dice == pytest.approx(80 / 240)


def test_the_table_prints_the_papers_figures_and_undefined_ones_as_na():
    cohort = CohortEvaluation(cases=(_case("internal", 203, 188, detected=147, matched=147),))
    table = cohort.format_table()
    assert "Lesion sensitivity" in table and "72.4 % (147/203)" in table
    assert "78.2 % (147/188)" in table
    assert "Patient specificity (>=1 PRL)   n/a (0/0)" in table
    assert "Dice, pooled" in table and "internal" in table
    json.dumps(cohort.to_dict(), allow_nan=False)


def test_mcnemar_matches_hand_computed_exact_p_values():
    def flags(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
        a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
        b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
        return a, b

    result = mcnemar(*flags(20, 1, 6, 3))  # 2 * P(X <= 1 | n = 7) = 2 * 8 / 128
    assert (result.b, result.c, result.n_pairs) == (1, 6, 30)
    assert result.p_value == pytest.approx(0.125)
    assert mcnemar(*flags(5, 10, 2, 0)).p_value == pytest.approx(2 * 79 / 4096)  # 1 + 12 + 66 of 2^12
    assert mcnemar(*flags(5, 0, 5, 0)).p_value == pytest.approx(2 / 32)
    assert mcnemar(*flags(5, 3, 3, 0)).p_value == 1.0
    assert mcnemar(*flags(5, 0, 0, 1)).p_value == 1.0
    assert "1 hit by A only, 6 by B only" in str(result)
    with pytest.raises(InputError, match="same lesions"):
        mcnemar([True, False], [True])


# --- folders of NIfTI files, as the phantom writes them -------------------------------------------

SPACING = (0.8, 0.8, 1.5)


def _write(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 5.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def cohort_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two cases.

    p01 has instances: PRLs 1 and 2 touch (one component of gt_prl) and lesion 3 is rimless. The
    prediction hits PRL 1 and the rimless lesion.
    p02 has only gt_prl with two separate PRLs; the prediction is a binary mask hitting both.
    """
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    shape = (6, 12, 20)

    instances = np.zeros(shape, np.uint16)
    instances[2:4, 2:6, 2:6] = 1
    instances[2:4, 2:6, 6:10] = 2  # touches PRL 1 face to face
    instances[2:4, 8:11, 14:18] = 3
    _write(gt_dir / "p01" / "gt_instances.nii.gz", instances)
    _write(gt_dir / "p01" / "gt_prl.nii.gz", np.isin(instances, [1, 2]).astype(np.uint8))
    truth = {"prl_count": 2, "lesions": [{"id": 1, "class": "prl"}, {"id": 2, "class": "prl"},
                                          {"id": 3, "class": "rimless"}]}
    (gt_dir / "p01" / "truth.json").write_text(json.dumps(truth), encoding="utf-8")
    pred = np.zeros(shape, np.uint16)
    pred[2:4, 3:5, 3:5] = 1
    pred[2:4, 9:10, 15:17] = 2
    _write(pred_dir / "p01" / "prl_labels.nii.gz", pred)

    gt_mask = np.zeros(shape, np.uint8)
    gt_mask[1:3, 1:4, 1:4] = 1
    gt_mask[3:5, 7:10, 12:16] = 1
    _write(gt_dir / "p02" / "gt_prl.nii.gz", gt_mask)
    pred_mask = np.zeros(shape, np.uint8)
    pred_mask[1:3, 2:4, 2:4] = 1
    pred_mask[3:5, 8:10, 13:15] = 1
    _write(pred_dir / "p02" / "prl_labels.nii.gz", pred_mask)
    return gt_dir, pred_dir


def test_folder_evaluation_keeps_touching_prls_apart_and_counts_mimic_hits_as_false(cohort_folders):
    cohort = evaluate_folders(*cohort_folders)
    p01, p02 = cohort.cases
    assert (p01.case_id, p02.case_id) == ("p01", "p02")
    assert p01.gt_ids == (1, 2) and p01.gt_hits == (True, False)
    assert p01.pred_hits == (True, False)  # the rimless lesion is not a PRL
    assert p02.gt_count == 2 and p02.pred_count == 2  # the binary prediction was split
    assert p02.gt_hits == (True, True)
    assert cohort.lesion_sensitivity == Proportion(3, 4)
    assert cohort.lesion_precision == Proportion(3, 4)
    assert "75.0 % (3/4)" in cohort.format_table()
    json.dumps(cohort.to_dict(), allow_nan=False)


def test_a_single_case_folder_is_evaluated_on_its_own(cohort_folders):
    gt_dir, pred_dir = cohort_folders
    assert [c.case_id for c in evaluate_folders(gt_dir / "p02", pred_dir / "p02").cases] == ["p02"]
    assert [c.case_id for c in evaluate_folders(gt_dir / "p01", pred_dir).cases] == ["p01"]


def test_a_case_without_prediction_is_an_input_error_naming_it(cohort_folders):
    gt_dir, pred_dir = cohort_folders
    (pred_dir / "p02" / "prl_labels.nii.gz").unlink()
    with pytest.raises(InputError, match="'p02'"):
        evaluate_folders(gt_dir, pred_dir)


def test_a_prediction_on_another_grid_is_an_input_error(cohort_folders):
    gt_dir, pred_dir = cohort_folders
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "p01" / "prl_labels.nii.gz")))
    _write(pred_dir / "p01" / "prl_labels.nii.gz", pred, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="p01.*ground-truth grid"):
        evaluate_folders(gt_dir, pred_dir)


def test_predictions_without_truth_are_ignored_with_a_warning(cohort_folders, caplog):
    gt_dir, pred_dir = cohort_folders
    _write(pred_dir / "p99" / "prl_labels.nii.gz", np.zeros((6, 12, 20), np.uint16))
    with caplog.at_level(logging.WARNING, logger="PRLDetectorLib.cohort.evaluation"):
        assert len(evaluate_folders(gt_dir, pred_dir).cases) == 2
    assert "p99" in caplog.text


def test_two_prediction_sets_are_compared_on_the_same_true_prls(cohort_folders, tmp_path):
    gt_dir, pred_dir = cohort_folders
    # A second model that finds PRL 2 of p01 instead of PRL 1, and both PRLs of p02.
    other_dir = tmp_path / "other"
    other = np.zeros((6, 12, 20), np.uint16)
    other[2:4, 3:5, 7:9] = 1
    _write(other_dir / "p01" / "prl_labels.nii.gz", other)
    _write(other_dir / "p02" / "prl_labels.nii.gz",
           sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "p02" / "prl_labels.nii.gz"))))
    result = compare_lesion_detection(evaluate_folders(gt_dir, pred_dir), evaluate_folders(gt_dir, other_dir))
    assert (result.b, result.c, result.n_pairs) == (1, 1, 4)
    assert result.p_value == 1.0
    json.dumps(result.to_dict())

    only_p02 = evaluate_folders(gt_dir / "p02", pred_dir / "p02")
    with pytest.raises(InputError, match="same ground truth"):
        compare_lesion_detection(evaluate_folders(gt_dir, pred_dir), only_p02)


def test_lesion_f1_and_false_positives_per_patient_follow_from_the_counts():
    cohort = CohortEvaluation(
        cases=(
            _case("A", gt_count=5, pred_count=4, detected=4, matched=4),
            _case("B", gt_count=2, pred_count=0),
            _case("C", gt_count=0, pred_count=1),
            _case("D", gt_count=0, pred_count=0),
        )
    )
    # Sensitivity 4/7, precision 4/5: F1 = 2 * (4/7) * (4/5) / (4/7 + 4/5) = 8/12.
    assert cohort.lesion_f1 == pytest.approx(2 / 3)
    assert cohort.false_positives_per_patient == pytest.approx(1 / 4)  # one, in C
    table = cohort.format_table()
    assert "Lesion F1                       0.667" in table
    assert "0.25 (1 of 4 patients have any)" in table


def test_icc_of_a_constant_offset_matches_the_hand_computed_value():
    from PRLDetectorLib.cohort.evaluation import icc_2_1

    # True 1, 2, 3 and predicted 2, 3, 4: MS subjects 2, MS raters 1.5, MS error 0, so
    # ICC(2,1) = 2 / (2 + 0 + 2 * 1.5 / 3) = 2/3 (a perfect rank agreement, one PRL too many each).
    assert icc_2_1(np.array([[1, 2], [2, 3], [3, 4]])) == pytest.approx(2 / 3)
    assert icc_2_1(np.array([[0, 0], [2, 2], [5, 5]])) == pytest.approx(1.0)


def test_count_agreement_reports_spearman_and_bland_altman_limits():
    from PRLDetectorLib.cohort.evaluation import count_agreement

    agreement = count_agreement([0, 1, 2, 3, 4], [0, 2, 2, 4, 4])
    differences = np.array([0, 1, 0, 1, 0])
    assert agreement.mean_difference == pytest.approx(0.4)
    half = 1.959964 * differences.std(ddof=1)
    assert agreement.limits_of_agreement == pytest.approx((0.4 - half, 0.4 + half), abs=1e-5)
    # Ranks 1..5 against 1, 2.5, 2.5, 4.5, 4.5 (ties averaged): Sxy 9, Sxx 10, Syy 9, so rho = 9 / sqrt(90).
    assert agreement.spearman_rho == pytest.approx(9 / math.sqrt(90))
    json.dumps(agreement.to_dict(), allow_nan=False)


def test_the_papers_precision_comparison_is_fishers_exact_test_on_its_counts():
    from PRLDetectorLib.cohort.evaluation import compare_proportions

    # Internal test set: QSM only 147/188 against QSM + FLAIR 126/192, reported as P = 0.009.
    result = compare_proportions(Proportion(147, 188), Proportion(126, 192))
    assert round(result.p_value, 3) == 0.009
    assert "78.2 % (147/188)" in str(result)


def test_patient_classification_is_compared_with_mcnemar_paired_by_patient():
    from PRLDetectorLib.cohort.evaluation import compare_evaluations

    a = CohortEvaluation(cases=(
        _case("A", 5, 4, detected=4, matched=4), _case("B", 2, 1, detected=1, matched=1),
        _case("C", 0, 0), _case("D", 0, 0),
    ))
    b = CohortEvaluation(cases=(
        _case("A", 5, 5, detected=5, matched=5), _case("B", 2, 0), _case("C", 0, 2), _case("D", 0, 1),
    ))
    comparison = compare_evaluations(a, b)
    # At >= 1: A is right on all four patients, B only on A; three discordant pairs, all for A: p = 2 / 2**3.
    at_one = comparison.patient_classification[1]
    assert (at_one.b, at_one.c, at_one.n_pairs) == (3, 0, 4)
    assert at_one.p_value == pytest.approx(0.25)
    assert "3 right by A only, 0 by B only, of 4 patients" in comparison.format_table()
    # Lesions: A hits 5 of 7 true PRLs, B 5; B's extra hit on A's case is paired against A's hit on B.
    assert comparison.lesion_sensitivity.n_pairs == 7
    json.dumps(comparison.to_dict(), allow_nan=False)
