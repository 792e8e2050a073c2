"""The child-process runner on real Python child processes (no Slicer, no Qt)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from PRLDetectorLib.mrml.process import (
    EXIT_INPUT_ERROR,
    ChildProcess,
    Finished,
    Output,
    Progress,
    parse_progress_line,
    python_module_command,
)


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, "-u", str(path)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_progress_lines_are_parsed_and_clamped():
    assert parse_progress_line("PRLDETECTOR_PROGRESS 0.25 Predicting fold 0") == Progress(0.25, "Predicting fold 0")
    assert parse_progress_line("PRLDETECTOR_PROGRESS 1") == Progress(1.0, "")
    assert parse_progress_line("PRLDETECTOR_PROGRESS 1.7 done") == Progress(1.0, "done")
    assert parse_progress_line("PRLDETECTOR_PROGRESS -2 start") == Progress(0.0, "start")


def test_other_lines_are_not_progress():
    for line in ("", "hello", "PRLDETECTOR_PROGRESS", "PRLDETECTOR_PROGRESS abc x", "PRLDETECTOR_PROGRESS nan x",
                 "progress 0.5 x", "  PRLDETECTOR_PROGRESSX 0.5 x"):
        assert parse_progress_line(line) is None, line


def test_child_progress_and_output_arrive_in_order_and_success_is_reported(tmp_path):
    child = ChildProcess(_script(tmp_path, """
        import sys
        print("PRLDETECTOR_PROGRESS 0.0 Reading inputs", flush=True)
        print("a log line")
        print("PRLDETECTOR_PROGRESS 0.5 Predicting", flush=True)
        print("warning: something", file=sys.stderr)
        print("PRLDETECTOR_PROGRESS 1.0 Done", flush=True)
    """))
    child.start()
    events = []
    finished = child.wait(timeout=30, on_event=events.append)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.fraction for p in progress] == [0.0, 0.5, 1.0]
    assert [p.message for p in progress] == ["Reading inputs", "Predicting", "Done"]
    assert Output("stdout", "a log line") in events
    assert Output("stderr", "warning: something") in events
    assert events[-1] is finished and isinstance(finished, Finished)
    assert finished.ok and finished.returncode == 0 and not finished.cancelled
    assert not child.running


def test_poll_drains_events_without_blocking(tmp_path):
    child = ChildProcess(_script(tmp_path, """
        print("PRLDETECTOR_PROGRESS 0.3 one", flush=True)
        print("PRLDETECTOR_PROGRESS 0.6 two", flush=True)
    """))
    child.start()
    collected = []
    deadline = time.monotonic() + 30
    while not any(isinstance(e, Finished) for e in collected):
        assert time.monotonic() < deadline, "child did not finish"
        collected += child.poll()
        time.sleep(0.02)
    assert [e.fraction for e in collected if isinstance(e, Progress)] == [0.3, 0.6]
    assert child.poll() == []


def test_input_error_exit_code_and_its_one_line_message_are_propagated(tmp_path):
    child = ChildProcess(_script(tmp_path, """
        import sys
        print("PRLDETECTOR_PROGRESS 0.1 Reading", flush=True)
        print("The QSM 'q.nii' does not exist; check the path.", file=sys.stderr)
        sys.exit(2)
    """))
    child.start()
    finished = child.wait(timeout=30)
    assert finished.returncode == EXIT_INPUT_ERROR
    assert not finished.ok
    assert finished.error == "The QSM 'q.nii' does not exist; check the path."


def test_a_crash_keeps_the_traceback_tail(tmp_path):
    child = ChildProcess(_script(tmp_path, """
        raise ZeroDivisionError("boom")
    """))
    child.start()
    finished = child.wait(timeout=30)
    assert finished.returncode == 1
    assert finished.error == "ZeroDivisionError: boom"
    assert any("Traceback" in line for line in child.stderr_tail)


def test_cancel_kills_the_whole_tree_including_a_grandchild_that_ignores_sigterm(tmp_path):
    if sys.platform == "win32":
        pytest.fail("this test reads /proc; the Windows path (taskkill /T) needs its own test")
    pid_file = tmp_path / "grandchild.pid"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(textwrap.dedent(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        while True:
            time.sleep(0.1)
    """), encoding="utf-8")
    child = ChildProcess(_script(tmp_path, f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, {str(grandchild)!r}])
        print("PRLDETECTOR_PROGRESS 0.2 Predicting", flush=True)
        while True:
            time.sleep(0.1)
    """))
    child.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "grandchild did not start"
        time.sleep(0.05)
    grandchild_pid = int(pid_file.read_text(encoding="utf-8"))
    child_pid = child.pid
    assert _alive(grandchild_pid)

    started = time.monotonic()
    child.cancel(grace_seconds=0.5)
    finished = child.wait(timeout=30)

    assert finished.cancelled and not finished.ok
    assert _wait_until_gone(child_pid)
    assert _wait_until_gone(grandchild_pid), "the grandchild survived cancel"
    assert time.monotonic() - started < 15


def test_wait_with_timeout_cancels_and_raises(tmp_path):
    child = ChildProcess(_script(tmp_path, """
        import time
        time.sleep(60)
    """))
    child.start()
    with pytest.raises(TimeoutError):
        child.wait(timeout=0.5)
    assert _wait_until_gone(child.pid)


def test_environment_is_passed_explicitly_and_the_module_runs_from_cwd(tmp_path):
    package = tmp_path / "fakecli"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "__main__.py").write_text(textwrap.dedent("""
        import os, sys
        print("PRLDETECTOR_PROGRESS 1.0", os.environ["PRL_TEST_VALUE"], " ".join(sys.argv[1:]), flush=True)
    """), encoding="utf-8")
    env = dict(os.environ, PRL_TEST_VALUE="given")
    child = ChildProcess(python_module_command(sys.executable, "fakecli", ["detect", "--x", 1]), env=env, cwd=tmp_path)
    child.start()
    events = []
    assert child.wait(timeout=30, on_event=events.append).ok
    assert Progress(1.0, "given detect --x 1") in events
    assert "PRL_TEST_VALUE" not in os.environ


def test_a_process_is_started_once():
    child = ChildProcess([sys.executable, "-c", "pass"])
    child.start()
    with pytest.raises(RuntimeError):
        child.start()
    assert child.wait(timeout=30).ok
    child.cancel()  # cancelling a finished child does nothing
