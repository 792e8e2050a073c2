"""Patient burden: counts, volumes, and the ≥ 1 and ≥ 4 PRL cut-offs at their edges."""

from __future__ import annotations

import logging
import math

import pytest

from PRLDetectorLib.detection.burden import Burden, compute_burden
from PRLDetectorLib.detection.features import LesionFeatures


def _lesion(lesion_id: int, volume_mm3: float) -> LesionFeatures:
    nan = math.nan
    return LesionFeatures(
        lesion_id=lesion_id, voxels=int(volume_mm3), volume_mm3=volume_mm3,
        centroid_lps=(0.0, 0.0, 0.0), centroid_ras=(0.0, 0.0, 0.0),
        bbox_min_ijk=(0, 0, 0), bbox_max_ijk=(1, 1, 1),
        qsm_mean_ppm=nan, qsm_max_ppm=nan, probability_mean=nan, rim_mean_ppm=nan, core_mean_ppm=nan,
        surround_mean_ppm=nan, rim_minus_core_ppm=nan, rim_minus_surround_ppm=nan,
        paramagnetic_edge_fraction=nan,
    )


def _lesions(*volumes: float) -> list[LesionFeatures]:
    return [_lesion(i, v) for i, v in enumerate(volumes, start=1)]


def test_three_prls_are_positive_at_one_but_not_at_four():
    burden = compute_burden(_lesions(100.0, 50.0, 30.0))
    assert burden == Burden(prl_count=3, total_volume_mm3=180.0, mean_volume_mm3=60.0,
                            positive_ge1=True, positive_ge4=False)


def test_four_prls_are_positive_at_four():
    burden = compute_burden(_lesions(100.0, 50.0, 30.0, 20.0))
    assert burden.prl_count == 4 and burden.positive_ge4 and burden.positive_ge1
    assert burden.total_volume_mm3 == pytest.approx(200.0)
    assert burden.mean_volume_mm3 == pytest.approx(50.0)


def test_excluding_one_of_four_lesions_drops_below_the_four_cutoff():
    burden = compute_burden(_lesions(100.0, 50.0, 30.0, 20.0), excluded_ids={2})
    assert burden.prl_count == 3 and not burden.positive_ge4
    assert burden.total_volume_mm3 == pytest.approx(150.0)


def test_no_prls_is_negative_with_zero_volume():
    burden = compute_burden([])
    assert burden == Burden(0, 0.0, 0.0, False, False)
    assert compute_burden(_lesions(10.0), excluded_ids=[1]).positive_ge1 is False


def test_excluded_ids_that_match_no_lesion_are_reported_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="PRLDetectorLib.detection.burden"):
        burden = compute_burden(_lesions(10.0, 20.0), excluded_ids=[9])
    assert burden.prl_count == 2
    assert "9" in caplog.text


def test_to_dict_has_every_field():
    assert compute_burden(_lesions(10.0)).to_dict() == {
        "prl_count": 1, "total_volume_mm3": 10.0, "mean_volume_mm3": 10.0,
        "positive_ge1": True, "positive_ge4": False,
    }
