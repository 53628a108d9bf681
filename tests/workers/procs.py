"""Worker subprocesses (tests/workers/worker.py) for reliability tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("worker.py")


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


class WorkerProcess:
    """One worker.py subprocess; its stderr (the log) goes to a file."""

    def __init__(self, dsn: str, directory: Path, name: str, **options: Any) -> None:
        self.name = name
        self.runlog = directory / "runs.log"
        self.logfile = directory / f"{name}.log"
        args = [sys.executable, str(SCRIPT), dsn, str(self.runlog), "--name", name]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self._log = self.logfile.open("w")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.pid = self.proc.pid

    def wait_ready(self) -> WorkerProcess:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"{self.name} did not start:\n{self.log()}"
        return self

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.logfile.read_text()

    def stop(self) -> None:
        """Kill it if still running (test teardown)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def runs(runlog: Path) -> list[tuple[str, int, int]]:
    """(event, n, pid) lines of a run log, in the order they were written."""
    if not runlog.exists():
        return []
    result = []
    for line in runlog.read_text().splitlines():
        event, n, pid = line.split()
        result.append((event, int(n), int(pid)))
    return result
