"""Child processes that announce readiness on a line of their output.

Used by ``llm-broker dev``, the benchmark and the tests: start a command, wait
for its "listening" line, and stop it together with everything it started.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, and lead a process group."""
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A running command whose output is collected by a reader thread."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            preexec_fn=die_with_parent,
        )
        self.lines: deque[str] = deque(maxlen=2000)
        self._cond = threading.Condition()
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if self._echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, count: int = 1) -> re.Match[str]:
        """Block until ``count`` output lines match ``pattern`` (the last match is
        returned); raise if the child exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        found: list[re.Match[str]] = []
        with self._cond:
            while True:
                lines = list(self.lines)
                for line in lines[seen:]:
                    match = regex.search(line)
                    if match:
                        found.append(match)
                        if len(found) == count:
                            return match
                seen = len(lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} before "
                        f"printing {pattern!r}:\n" + "\n".join(lines[-30:])
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name} did not print {pattern!r} {count} time(s) in {timeout}s:\n"
                        + "\n".join(lines[-30:])
                    )
                self._cond.wait(min(remaining, 0.5))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Signal the child, wait, then kill its whole process group."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def python_cmd(*args: str) -> list[str]:
    """The ``llm-broker`` command run with this interpreter."""
    return [sys.executable, "-m", "llm_broker", *args]
