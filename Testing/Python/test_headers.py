"""The reader's headers of the lesion table: one home, a header for every column, files untouched."""

from __future__ import annotations

import ast
from pathlib import Path

from PRLDetectorLib.detection import headers
from PRLDetectorLib.detection.features import LESION_COLUMNS

REPO = Path(__file__).resolve().parents[2]


def test_every_lesion_column_has_a_readers_header_and_no_two_read_alike():
    missing = [c for c in (*LESION_COLUMNS, "status", *headers.OPTIONAL_COLUMNS) if c not in headers.HEADERS]
    assert not missing, f"columns without a reader's header: {missing}"
    titles = list(headers.HEADERS.values())
    assert len(titles) == len(set(titles))
    assert headers.FILE_ONLY <= set(headers.HEADERS)
    assert headers.header("made_by_another_tool") == "made_by_another_tool"


def test_the_header_module_imports_nothing_so_the_panel_can_read_it_before_dependencies_are_installed():
    tree = ast.parse((REPO / "PRLDetectorLib" / "detection" / "headers.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections.abc"}, imported


def test_rows_are_reviewed_most_probable_first_only_when_a_probability_exists():
    rows = [{"lesion_id": 1, "prl_probability": 0.2}, {"lesion_id": 2, "prl_probability": float("nan")},
            {"lesion_id": 3, "prl_probability": "0.7"}, {"lesion_id": 4}]
    assert [r["lesion_id"] for r in headers.view_rows(rows)] == [3, 1, 2, 4]
    plain = [{"lesion_id": 2}, {"lesion_id": 1}]
    assert headers.view_rows(plain) == plain

