"""PRL burden against clinical outcomes: Spearman, least squares with t tests, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from PRLDetectorLib.cohort.association import associate, ordinary_least_squares, plot_association, spearman
from PRLDetectorLib.errors import InputError


def write(path, text):
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


@pytest.fixture
def burden(tmp_path):
    return write(tmp_path / "burden.csv", """
case_id,prl_count,total_volume_mm3,mean_volume_mm3,positive_ge1,positive_ge4,model
p1,0,0.0,0.0,False,False,qsm
p2,1,50.0,50.0,True,False,qsm
p3,2,90.0,45.0,True,False,qsm
p4,3,200.0,66.7,True,False,qsm
p5,5,260.0,52.0,True,True,qsm
p6,4,150.0,37.5,True,True,qsm
""")


def test_a_simple_regression_matches_the_hand_computed_fit():
    # x = 0..3, y = 1, 3, 2, 5: Sxx = 5, Sxy = 5.5, so slope 1.1 and intercept 2.75 - 1.1 * 1.5 = 1.1;
    # residuals -0.1, 0.8, -1.3, 0.6 give SSE 2.7, sigma² 1.35 on 2 df, SE(slope) = sqrt(1.35 / 5).
    fit = ordinary_least_squares([1, 3, 2, 5], {"x": [0, 1, 2, 3]})
    slope = fit["x"]
    assert slope.estimate == pytest.approx(1.1)
    assert fit["intercept"].estimate == pytest.approx(1.1)
    assert slope.std_error == pytest.approx(math.sqrt(0.27))
    t = 1.1 / math.sqrt(0.27)
    assert slope.t == pytest.approx(t)
    # With 2 df the t distribution has a closed form: two-sided p = 1 - |t| / sqrt(t² + 2).
    assert slope.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))
    # SE(intercept)² = sigma² (1/n + mean(x)² / Sxx) = 1.35 (0.25 + 0.45).
    assert fit["intercept"].std_error == pytest.approx(math.sqrt(1.35 * 0.7))
    assert fit.r_squared == pytest.approx(1 - 2.7 / 8.75)
    assert fit.df_residual == 2
    # 95 % CI: estimate ± t(0.975, 2) SE, with t(0.975, 2) = 4.302653.
    assert slope.ci95[0] == pytest.approx(1.1 - 4.302653 * math.sqrt(0.27), abs=1e-5)


def test_an_orthogonal_covariate_leaves_the_slope_and_takes_its_own_share():
    # The covariate (±1, balanced within each x pair) is orthogonal to x and the intercept, so the x slope
    # is that of y on x alone, and the covariate's estimate is its mean difference / 2.
    x = [0, 0, 1, 1, 2, 2]
    c = [-1, 1, -1, 1, -1, 1]
    y = [1.0, 3.0, 2.0, 4.5, 3.5, 5.0]
    fit = ordinary_least_squares(y, {"x": x, "c": c})
    assert fit["x"].estimate == pytest.approx(1.125)  # Sxy = 4.5 over Sxx = 4
    assert fit["c"].estimate == pytest.approx((3 + 4.5 + 5 - 1 - 2 - 3.5) / 6)
    assert fit.n == 6 and fit.df_residual == 3


def test_spearman_is_the_pearson_of_ranks_with_a_fisher_interval():
    result = spearman([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])
    # d = ±1 for all six: rho = 1 - 6 * 6 / (6 * 35) = 29/35.
    assert result.rho == pytest.approx(29 / 35)
    assert result.n == 6
    half = 1.959964 * math.sqrt((1 + (29 / 35) ** 2 / 2) / 3)
    assert result.ci95[1] == pytest.approx(math.tanh(math.atanh(29 / 35) + half), abs=1e-5)
    assert result.ci95[0] < result.rho < result.ci95[1]


def test_the_burden_joins_a_bids_style_clinical_table_and_text_sex_is_coded(burden, tmp_path):
    clinical = write(tmp_path / "clinical.tsv", """
case_id\tEDSS\tage\tsex
p1\t1.0\t30\tF
p2\t2.0\t41\tM
p3\t2.5\t35\tF
p4\t3.5\t50\tM
p5\t6.0\t45\tF
p6\tn/a\t39\tM
""")
    association, data = associate(burden, clinical, "EDSS", ["sex"])
    assert data.case_ids == ["p1", "p2", "p3", "p4", "p5"]
    assert association.excluded == {"p6": "missing EDSS"}
    assert association.codings == {"sex": "F = 0, M = 1"}
    np.testing.assert_array_equal(data.columns["sex"], [0, 1, 0, 1, 0])
    # EDSS rises strictly with the PRL count here: Spearman rho is exactly 1.
    assert association.count.rho == pytest.approx(1.0)
    expected = np.linalg.lstsq(
        np.column_stack([np.ones(5), [0, 1, 2, 3, 5], [0, 1, 0, 1, 0]]),
        [1.0, 2.0, 2.5, 3.5, 6.0], rcond=None,
    )[0]
    assert association.regression["prl_count"].estimate == pytest.approx(expected[1])
    table = association.format_table()
    assert "adjusted for sex" in table and "p6: missing EDSS" in table


def test_a_missing_outcome_column_names_the_columns_there_are(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "case_id,EDSS\np1,1\n")
    with pytest.raises(InputError, match="no column 'MSSS'; its columns are case_id, EDSS"):
        associate(burden, clinical, "MSSS")


def test_a_text_outcome_names_the_patient_and_the_value(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "case_id,EDSS\np1,1\np2,mild\np3,2\np4,3\np5,4\np6,5\n")
    with pytest.raises(InputError, match="holds 'mild' for patient p2, which is not a number"):
        associate(burden, clinical, "EDSS")


def test_a_covariate_with_three_text_values_is_refused(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "case_id,EDSS,site\np1,1,A\np2,2,B\np3,2,C\np4,3,A\np5,4,B\np6,5,C\n")
    with pytest.raises(InputError, match="'site' has 3 text values"):
        associate(burden, clinical, "EDSS", ["site"])


def test_too_few_patients_for_the_regression_is_an_input_error(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "case_id,EDSS,age\np1,1,30\np2,2,40\np3,2.5,50\np4,n/a,20\n")
    with pytest.raises(InputError, match="needs at least 5 patients with all values; 3 have them"):
        associate(burden, clinical, "EDSS", ["age"])


def test_a_clinical_table_without_an_id_column_says_how_to_join(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "patient,EDSS\np1,1\n")
    with pytest.raises(InputError, match="neither a case_id nor a participant_id"):
        associate(burden, clinical, "EDSS")


def test_the_plot_is_written_as_a_png(burden, tmp_path):
    clinical = write(tmp_path / "clinical.csv", "case_id,EDSS\np1,1\np2,2\np3,2.5\np4,3.5\np5,6\np6,4\n")
    association, data = associate(burden, clinical, "EDSS")
    out = plot_association(association, data, tmp_path / "edss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bids_burden_joins_participants_by_participant_and_session(tmp_path):
    burden = write(tmp_path / "burden.csv", """
case_id,prl_count,total_volume_mm3,mean_volume_mm3,positive_ge1,positive_ge4,model,participant_id,session_id
sub-01_ses-1,0,0,0,False,False,qsm,sub-01,ses-1
sub-01_ses-2,2,80,40,True,False,qsm,sub-01,ses-2
sub-02_ses-1,1,30,30,True,False,qsm,sub-02,ses-1
sub-03_ses-1,4,300,75,True,True,qsm,sub-03,ses-1
sub-04_ses-1,3,120,40,True,False,qsm,sub-04,ses-1
""")
    clinical = write(tmp_path / "participants.tsv", """
participant_id\tsession_id\tEDSS
sub-01\tses-1\t1.0
sub-01\tses-2\t2.5
sub-02\tses-1\t1.5
sub-03\tses-1\t4.0
sub-04\tses-1\t3.0
sub-05\tses-1\t6.5
""")
    association, data = associate(burden, clinical, "EDSS")
    assert data.case_ids == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-03_ses-1", "sub-04_ses-1"]
    np.testing.assert_array_equal(data.columns["EDSS"], [1.0, 2.5, 1.5, 4.0, 3.0])
    assert association.count.rho == pytest.approx(1.0)


def test_two_sessions_against_one_participant_row_are_refused(tmp_path):
    burden = write(tmp_path / "burden.csv", """
case_id,prl_count,total_volume_mm3,mean_volume_mm3,positive_ge1,positive_ge4,model,participant_id,session_id
sub-01_ses-1,0,0,0,False,False,qsm,sub-01,ses-1
sub-01_ses-2,2,80,40,True,False,qsm,sub-01,ses-2
""")
    clinical = write(tmp_path / "participants.tsv", "participant_id\tEDSS\nsub-01\t1.0\n")
    with pytest.raises(InputError, match="several sessions"):
        associate(burden, clinical, "EDSS")


def test_the_associate_command_prints_the_table_and_writes_the_plot_and_the_json(burden, tmp_path):
    import json

    from conftest import assert_refused, run_cli
    from PIL import Image

    clinical = write(tmp_path / "clinical.csv", """
case_id,EDSS,sex
p1,1.0,F
p2,2.0,M
p3,2.5,F
p4,3.5,M
p5,6.0,F
p6,4.0,M
""")
    done = run_cli("associate", "--burden", burden, "--clinical", clinical, "--outcome", "EDSS", "--covariates", "sex",
                   "--plot", tmp_path / "edss.png", "--json", tmp_path / "edss.json")
    assert done.returncode == 0, done.stderr
    assert "Spearman, PRL count:" in done.stdout and "adjusted for sex" in done.stdout
    assert Image.open(tmp_path / "edss.png").size[0] > 300
    record = json.loads((tmp_path / "edss.json").read_text(encoding="utf-8"))
    assert record["outcome"] == "EDSS" and record["spearman_count"]["n"] == 6
    assert record["spearman_count"]["rho"] == pytest.approx(spearman([0, 1, 2, 3, 5, 4], [1, 2, 2.5, 3.5, 6, 4]).rho)
    assert_refused(run_cli("associate", "--burden", burden, "--clinical", clinical, "--outcome", "MSSS"), "MSSS")
