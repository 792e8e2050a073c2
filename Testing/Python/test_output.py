"""What `prl-detect` leaves for people: one result per folder, readable by others, and a clean terminal or log.

Real CLI child processes on a small phantom with the bundled QSM model.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import REPO, require_model

pytestmark = pytest.mark.slow

TINY_EXTENT_MM = (64.0, 72.0, 56.0)


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory) -> Path:
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    require_model("qsm")
    return write_case(generate_case("tiny", seed=41, with_flair=False, extent_mm=TINY_EXTENT_MM, n_prl=1),
                      tmp_path_factory.mktemp("tiny"))


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "PRLDetectorLib", *map(str, args)]


def _detect(case: Path, out: Path, *options) -> list[str]:
    return _command("detect", "--qsm", case / "qsm.nii.gz", "--out", out, "--device", "cpu", *options)


def _detect_at_the_same_moment(argv: list[str], barrier, answer) -> None:
    """``prl-detect ARGV`` in this (child) process, held at the start of writing its result until the other
    run gets there too: the moment where a check-then-write would let both through."""
    import contextlib
    import io

    import PRLDetectorLib.detection.pipeline as pipeline
    from PRLDetectorLib.cli.main import main

    write_result = pipeline.write_result

    def write_when_both_are_ready(*args, **kwargs):
        barrier.wait(timeout=900)
        return write_result(*args, **kwargs)

    pipeline.write_result = write_when_both_are_ready
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    answer.send((code, stderr.getvalue()))


def test_two_runs_with_the_same_out_give_one_whole_result_and_one_refusal(tiny_case, tmp_path):
    import multiprocessing

    out = tmp_path / "out"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    runs = {}
    for threshold in ("0.5", "0.6"):
        receive, send = context.Pipe(duplex=False)
        argv = ["-q", "detect", "--qsm", str(tiny_case / "qsm.nii.gz"), "--out", str(out), "--device", "cpu",
                "--threshold", threshold]
        process = context.Process(target=_detect_at_the_same_moment, args=(argv, barrier, send))
        process.start()
        runs[threshold] = (process, receive)
    finished = {threshold: receive.recv() for threshold, (_, receive) in runs.items()}
    for process, _ in runs.values():
        process.join(timeout=60)
    assert sorted(code for code, _ in finished.values()) == [0, 2], finished
    winner = next(t for t, (code, _) in finished.items() if code == 0)
    refusal = next(err for code, err in finished.values() if code == 2)
    assert "Traceback" not in refusal
    last = [line for line in refusal.splitlines() if line.strip()][-1]
    assert last.startswith("prl-detect: error: ") and "was written by another run" in last, last
    assert sorted(p.name for p in out.iterdir()) == ["burden.json", "candidates.csv", "lesions.csv", "prl.seg.nrrd",
                                                     "prl_labels.nii.gz"]
    record = json.loads((out / "burden.json").read_text(encoding="utf-8"))
    assert record["settings"]["threshold"] == float(winner)
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a partial folder was left behind"


def test_result_folders_and_files_follow_the_umask(tiny_case, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(_command("-q", "detect", "--qsm", tiny_case / "qsm.nii.gz", "--out", out, "--device", "cpu"),
                          capture_output=True, text=True, encoding="utf-8", errors="replace", umask=0o022, timeout=900)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_output_to_a_pipe_has_one_line_per_step_and_no_carriage_returns(tiny_case, tmp_path):
    done = subprocess.run(_detect(tiny_case, tmp_path / "out"), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=900)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\r" not in done.stdout
    lines = done.stderr.splitlines()
    assert not [line for line in lines if line.startswith(", ") or "| , " in line]
    steps = [line for line in lines if line.startswith("INFO detect ")]
    assert [line.split("% ", 1)[1].split(" 1/")[0] for line in steps][:4] == [
        "Checking the inputs", "Preprocessing (nnU-Net)", "Network tile", "Resampling probabilities to the input grid"]
    assert sum("Network tile" in line for line in lines) == 1


def _run_in_terminal(argv: list[str], columns: int = 120) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal of ``columns`` columns as its stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    code = process.wait(timeout=900)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_in_a_terminal_log_lines_are_written_above_the_bar_not_into_it(tiny_case, tmp_path):
    code, screen = _run_in_terminal(_detect(tiny_case, tmp_path / "out"))
    assert code == 0, screen
    assert "%|" in screen, "no progress bar was drawn"
    shown = [line.rstrip("\r").split("\r")[-1] for line in screen.split("\n")]  # what stays on each line
    log_lines = [line for line in shown if "INFO " in line]
    assert log_lines and all(line.startswith("INFO ") for line in log_lines), log_lines
    assert "| , " not in screen
