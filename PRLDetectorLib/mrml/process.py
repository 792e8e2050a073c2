"""Run a child process, stream its progress lines and cancel it with everything it started.

Slicer runs detection in a child process (PythonSlicer running ``python -m PRLDetectorLib detect
--progress-lines``) so that the GUI stays responsive. This module has no Qt: a reader thread per
stream puts events in a queue, the caller drains it with :meth:`ChildProcess.poll` (the Slicer widget
from a ``QTimer``) or blocks in :meth:`ChildProcess.wait` (scripts and tests).

Cancelling kills the whole process tree, not only the direct child: PythonSlicer is a launcher that
starts the real interpreter, and nnU-Net may start worker processes of its own.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PRLDetectorLib.progress import PROGRESS_PREFIX

logger = logging.getLogger(__name__)


EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT_ERROR = 2


@dataclass(frozen=True)
class Progress:
    """A progress line: how far the child is (0..1) and what it is doing."""

    fraction: float
    message: str


@dataclass(frozen=True)
class Output:
    """Any other line the child wrote, on ``stdout`` or ``stderr``."""

    stream: str
    text: str


@dataclass(frozen=True)
class Finished:
    """The child has ended: its exit code, whether we cancelled it, and the error it reported."""

    returncode: int
    cancelled: bool
    error: str
    """Last non-empty stderr line: the one-sentence message of an InputError (exit code 2)."""

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK and not self.cancelled


Event = Progress | Output | Finished


def parse_progress_line(line: str) -> Progress | None:
    """Read ``PRLDETECTOR_PROGRESS <fraction> <message>``; None for any other line."""
    parts = line.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] != PROGRESS_PREFIX:
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    if fraction != fraction:  # NaN
        return None
    return Progress(min(1.0, max(0.0, fraction)), parts[2] if len(parts) == 3 else "")


def python_module_command(python: str | Path, module: str, args: Sequence[str]) -> list[str]:
    """``<python> -u -m <module> <args…>``: unbuffered, so progress lines arrive as they are written."""
    return [str(python), "-u", "-m", module, *[str(a) for a in args]]


class ChildProcess:
    """One child process with its output read by threads and its whole tree killable.

    Usage::

        child = ChildProcess(cmd, env=env)
        child.start()
        while child.running:
            for event in child.poll(): ...   # Progress, Output, then one Finished
        # or: finished = child.wait(on_event=print)
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stderr_lines_kept: int = 50,
    ):
        self.args = [str(a) for a in args]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self._proc: subprocess.Popen | None = None
        self._events: queue.Queue[Event] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._waiter: threading.Thread | None = None
        self._stderr_tail: deque[str] = deque(maxlen=stderr_lines_kept)
        self._cancelled = False
        self._finished: Finished | None = None
        self._lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("This child process was already started; create a new ChildProcess.")
        logger.debug("Starting %s", subprocess.list2cmdline(self.args))
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            # A session of its own makes the child the leader of a process group that holds every
            # process it starts, so one killpg ends the tree.
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._waiter = threading.Thread(target=self._wait_for_exit, daemon=True)
        self._waiter.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """True from start until the Finished event has been queued."""
        return self._proc is not None and self._finished is None

    @property
    def finished(self) -> Finished | None:
        return self._finished

    @property
    def error_message(self) -> str:
        return next((line for line in reversed(self._stderr_tail) if line.strip()), "")

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)

    def poll(self) -> list[Event]:
        """Every event queued since the last call, without blocking."""
        events: list[Event] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None, on_event: Callable[[Event], None] | None = None) -> Finished:
        """Block until the child ends, handing every event to ``on_event``; return the Finished event.

        Raises TimeoutError (after cancelling the child) when ``timeout`` seconds pass first.
        """
        if self._proc is None:
            raise RuntimeError("The child process was not started.")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=0.1 if remaining is None else min(0.1, remaining))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    self.cancel()
                    raise TimeoutError(f"The child process did not finish within {timeout} s and was cancelled.") from None
                continue
            if on_event is not None:
                on_event(event)
            if isinstance(event, Finished):
                return event

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """Stop the child and every process it started; return when the child has exited."""
        if self._proc is None or self._finished is not None:
            return
        with self._lock:
            self._cancelled = True
        _kill_tree(self._proc, grace_seconds)

    # -- threads ----------------------------------------------------------------------------------

    def _read(self, stream, name: str) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\r\n")
            if name == "stdout":
                progress = parse_progress_line(line)
                if progress is not None:
                    self._events.put(progress)
                    continue
            else:
                self._stderr_tail.append(line)
            if line.strip():
                self._events.put(Output(name, line))
        stream.close()

    def _wait_for_exit(self) -> None:
        assert self._proc is not None
        returncode = self._proc.wait()
        # The readers end at end of file; a grandchild that kept the pipe open could hold them,
        # so do not wait for ever once the child itself has gone.
        for reader in self._readers:
            reader.join(timeout=5.0)
        with self._lock:
            cancelled = self._cancelled
        finished = Finished(returncode=returncode, cancelled=cancelled, error=self.error_message)
        self._finished = finished
        self._events.put(finished)


def _kill_tree(proc: subprocess.Popen, grace_seconds: float) -> None:
    if sys.platform == "win32":
        # /T takes the children too; /F because a console-less child ignores a polite request.
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        try:
            proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    try:
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, None)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The child is gone; its group may still hold grandchildren that ignored SIGTERM.
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
