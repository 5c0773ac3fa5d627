"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

# The toy model runs fastest on one thread, and the suite's workers (`pytest -n`) share the cores:
# more threads per process would only contend. Children inherit these.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Limits for waits on child processes: long enough for a machine 5x slower than a quiet 2-core
# box (a child that needs 20 s there may need 100+ s under load), so only a hang trips them.
CHILD_TIMEOUT_S = 900.0


class ProcessGroups:
    """Starts children in process groups of their own and kills every group on teardown, so no
    training process (or a grandchild it started) outlives its test, whatever the test's exit."""

    timeout = CHILD_TIMEOUT_S

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, cmd: Sequence[str], *, timeout: float = CHILD_TIMEOUT_S, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Like `subprocess.run(..., capture_output=True, text=True)`, in a group of its own."""
        proc = self.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            pytest.fail(
                f"{cmd[:3]} did not finish within {timeout:.0f} s\n{(out or '')[-2000:]}{err[-2000:]}"
            )
        finally:
            self.kill(proc)  # the group: a grandchild must not outlive its parent
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)

    @staticmethod
    def kill(proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def groups() -> Iterator[ProcessGroups]:
    found = ProcessGroups()
    try:
        yield found
    finally:
        found.close()
