"""``prl-detect longitudinal``: which PRLs of a patient are new, persist, enlarge, lost their rim or went.

:func:`register` adds it to the CLI's subparsers. Errors are :class:`InputError` sentences; the CLI exits 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PRLDetectorLib.cli.options import add_detection_options, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "longitudinal", help="compare two visits: new, persisting, enlarging, resolved and disappeared PRLs",
        description="Register the follow-up QSM rigidly to the baseline, match the PRLs of the two visits by overlap, "
        "and give each tracked lesion a change: new, persisting, enlarging, resolved (rim lost, lesion still there) "
        "or disappeared. Writes changes.csv/.json, change_labels.nii.gz, changes.seg.nrrd and report.html.",
    )
    for visit in ("baseline", "followup"):
        name = "follow-up" if visit == "followup" else visit
        parser.add_argument(f"--{visit}", help=f"{name} result folder of detect")
        parser.add_argument(f"--{visit}-qsm", help=f"{name} QSM: without --{visit}, PRLs are detected on it here "
                            f"(into OUT/{visit}); with it, the QSM that result was detected on")
        parser.add_argument(f"--{visit}-flair", help=f"{name} FLAIR: tells a lesion that lost its rim from one that "
                            "went (default: the FLAIR detection used, if any)")
        parser.add_argument(f"--{visit}-date", help=f"{name} acquisition date (2021-03-04): gives the interval and "
                            "refuses a follow-up before its baseline")
    parser.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing comparison folder")
    parser.add_argument("--no-report", dest="report", action="store_false", help="leave out report.html")
    add_detection_options(parser)
    parser.set_defaults(func=cmd_longitudinal)


def cmd_longitudinal(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from PRLDetectorLib.longitudinal.compare import VisitInput, run_longitudinal
    from PRLDetectorLib.longitudinal.tracking import parse_time

    def visit(name: str) -> VisitInput:
        def path(option: str) -> Path | None:
            value = getattr(args, f"{name}{option}")
            return Path(value) if value else None

        return VisitInput(path(""), path("_qsm"), path("_flair"), parse_time(getattr(args, f"{name}_date"), f"{name} date"))

    settings = settings_from_args(args)
    settings.validate()
    # Log lines go through tqdm, so that they do not break the line that says which step runs.
    with logging_redirect_tqdm(loggers=[logging.getLogger("PRLDetectorLib")]), \
            tqdm(desc="longitudinal", disable=args.quiet, bar_format="{desc}", leave=False) as bar:
        table = run_longitudinal(visit("baseline"), visit("followup"), Path(args.out), settings, args.overwrite,
                                 args.report, progress=bar.set_description_str)
    counts = table.counts()
    print(f"Baseline {len(table.baseline.lesions)} PRL(s), follow-up {len(table.followup.lesions)}: "
          + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "not imaged"))
    registration = table.alignment.to_dict()
    print(f"Registration: {registration['translation_mm']:.1f} mm, {registration['rotation_deg']:.1f}°, QSM "
          f"correlation {registration['correlation_before_after'][1]:.2f}")
    print(f"Results: {args.out}")
    return 0
