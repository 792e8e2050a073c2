"""The reader's headers of the lesion table: one home, a header for every column, files untouched."""

from __future__ import annotations

import math

from PRLDetectorLib.detection import headers
from PRLDetectorLib.detection.features import LESION_COLUMNS, OPTIONAL_COLUMNS


def test_every_lesion_column_has_a_readers_header_and_no_two_read_alike():
    missing = [c for c in (*LESION_COLUMNS, "status") if c not in headers.HEADERS]
    assert not missing, f"columns without a reader's header: {missing}"
    titles = list(headers.HEADERS.values())
    assert len(titles) == len(set(titles))
    assert headers.FILE_ONLY <= set(headers.HEADERS)
    assert {headers.PRL_PROBABILITY, headers.PRL_UNCERTAINTY} == set(OPTIONAL_COLUMNS)
    assert headers.header("made_by_another_tool") == "made_by_another_tool"


def test_rows_are_reviewed_most_probable_first_only_when_a_probability_exists():
    nan = math.nan
    rows = [{"lesion_id": 1, "prl_probability": 0.2}, {"lesion_id": 2, "prl_probability": nan},
            {"lesion_id": 3, "prl_probability": "0.7"}, {"lesion_id": 4}]
    assert [r["lesion_id"] for r in headers.view_rows(rows)] == [3, 1, 2, 4]
    without = [{"lesion_id": 2, "prl_probability": nan}, {"lesion_id": 1, "prl_probability": nan}]
    assert headers.view_rows(without) == without


def test_the_classifier_columns_are_hidden_only_when_no_lesion_has_a_value():
    nan = math.nan
    assert headers.hidden_in_view([{"prl_probability": nan, "prl_uncertainty": nan}]) == (
        set(headers.FILE_ONLY) | set(OPTIONAL_COLUMNS))
    assert headers.hidden_in_view([{"prl_probability": nan, "prl_uncertainty": nan},
                                   {"prl_probability": 0.4, "prl_uncertainty": 0.1}]) == set(headers.FILE_ONLY)
