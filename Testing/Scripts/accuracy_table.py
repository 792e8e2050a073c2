"""Turn the JSON of evaluate_bundled_models.sh into the README's accuracy table and each model card's
"accuracy" block.

Usage: .venv/bin/python Testing/Scripts/accuracy_table.py WORK_DIR [--write-cards]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_SET = "24 held-out phantom patients: prl-detect phantom --n 24 --seed 5000 --flair --extent-mm 128 150 100"


def _cell(proportion: dict) -> str:
    if not proportion["total"]:
        return "n/a"
    return f"{100 * proportion['value']:.1f} % ({proportion['successes']}/{proportion['total']})"


def _figures(evaluation: dict) -> dict:
    """One model's row of the table, as the model card keeps it."""
    patient = evaluation["patient"]["ge1"]
    return {"lesion_sensitivity": _cell(evaluation["lesion_sensitivity"]),
            "lesion_precision": _cell(evaluation["lesion_precision"]),
            "patient_sensitivity_ge1": _cell(patient["sensitivity"]),
            "patient_specificity_ge1": _cell(patient["specificity"]),
            "false_positives_per_patient": round(evaluation["false_positives_per_patient"], 2)}


def _row(name: str, evaluation: dict) -> str:
    *cells, false_positives = _figures(evaluation).values()
    return f"| {name} | " + " | ".join([*cells, f"{false_positives:.2f}"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--write-cards", action="store_true")
    args = parser.parse_args()
    plain = json.loads((args.work / "evaluation.json").read_text(encoding="utf-8"))
    rim = json.loads((args.work / "evaluation_rim_check.json").read_text(encoding="utf-8"))
    print("| model | lesion sensitivity | lesion precision | patient sensitivity (≥ 1) | patient specificity (≥ 1) "
          "| false positives / patient |")
    print("|---|---|---|---|---|---|")
    print(_row("QSM only", plain["evaluation"]))
    print(_row("QSM + FLAIR", plain["compare"]["evaluation"]))
    print(_row("QSM only + rim check ≥ 2/3", rim["evaluation"]))
    print(_row("QSM + FLAIR + rim check ≥ 2/3", rim["compare"]["evaluation"]))
    for label, record in (("network alone", plain), ("with rim check", rim)):
        tests = record["compare"]["tests"]
        print(f"\n{label}: McNemar (lesion detection) {json.dumps(record['compare']['mcnemar'])}")
        print(f"{label}: all tests {json.dumps(tests)}")
    if args.write_cards:
        models = (("qsm", plain["evaluation"], rim["evaluation"]),
                  ("qsm_flair", plain["compare"]["evaluation"], rim["compare"]["evaluation"]))
        for name, evaluation, rim_checked in models:
            card_path = REPO / "Resources" / "Models" / name / "model.json"
            card = json.loads(card_path.read_text(encoding="utf-8"))
            # Only this table's entries: the card's other accuracy blocks (evaluate_stage2.py's) stay.
            card.setdefault("accuracy", {}).update({"test_set": TEST_SET, "network_alone": _figures(evaluation),
                                                    "with_rim_check_0.67": _figures(rim_checked)})
            card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
            print(f"Wrote the accuracy of {name} into {card_path}")


if __name__ == "__main__":
    main()
