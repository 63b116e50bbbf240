"""``--processes N``: one pod's role run as N processes, so that it uses N cores.

The supervisor starts N copies of the same command with ``--processes 1``. Each
ingress process listens on the same port with ``SO_REUSEPORT``, and the kernel
spreads new connections over them; each worker process registers its own slots
with the scheduler, as a worker pod of its own would. The processes share the
supervisor's standard output and error.

Metrics: the processes write their counters, gauges and histograms to files in one
directory (Prometheus multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and every
``/metrics`` answer is the sum (for gauges: the mode each declares) over all of
them, whichever process a scrape reaches.

Signals: SIGTERM or SIGINT is passed to every process, each drains as it would
alone, and the supervisor exits when all have (0 when all exited cleanly). A
process that dies otherwise is started again after a second; one that keeps dying
(5 times within a minute) stops the whole pod, so that the orchestrator sees it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from llm_broker.procs import die_with_parent, python_cmd

log = logging.getLogger("llm_broker.supervise")

#: Variable through which prometheus_client finds the multiprocess directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT, holding the
    port for the processes (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or "0.0.0.0", port))
    return sock, int(sock.getsockname()[1])


class Supervisor:
    def __init__(self, argv: Sequence[str], processes: int) -> None:
        self.argv = list(argv)
        self.processes = processes
        self.children: dict[int, subprocess.Popen[bytes]] = {}  # slot -> process
        self.stopping = False
        self._restarts: list[float] = []
        self._own_dir: str | None = None
        self.env = dict(os.environ)
        if not self.env.get(MULTIPROC_ENV):
            self._own_dir = tempfile.mkdtemp(prefix="llm-broker-metrics-")
            self.env[MULTIPROC_ENV] = self._own_dir
        else:  # a directory of our own (e.g. an emptyDir): start from no stale files
            for name in os.listdir(self.env[MULTIPROC_ENV]):
                if name.endswith(".db"):
                    os.unlink(os.path.join(self.env[MULTIPROC_ENV], name))

    def _start(self, slot: int) -> None:
        self.children[slot] = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("supervisor: passing signal %d to %d processes", signum, len(self.children))
        self.stopping = True
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signal)
        try:
            for slot in range(self.processes):
                self._start(slot)
            return self._watch()
        finally:
            for proc in self.children.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)

    def _watch(self) -> int:
        worst = 0
        while self.children:
            for slot, proc in list(self.children.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.children[slot]
                self._mark_dead(proc.pid)
                if self.stopping:
                    worst = max(worst, abs(code))
                    continue
                log.error("supervisor: process %d (pid %d) exited with %d", slot, proc.pid, code)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if t > now - RESTART_WINDOW_S]
                if len(self._restarts) >= MAX_RESTARTS:
                    log.error("supervisor: processes keep dying; stopping the pod")
                    self._signal(signal.SIGTERM, None)
                    worst = 1
                    continue
                self._restarts.append(now)
                time.sleep(RESTART_DELAY_S)  # not in a tight loop if it dies at start
                if not self.stopping:
                    self._start(slot)
            time.sleep(0.1)  # the supervisor's poll period; it does nothing else
        return worst


def child_argv(argv: Sequence[str], **options: object) -> list[str]:
    """The ``llm-broker`` command line of one process: ``argv`` (the supervisor's own
    arguments) with ``options`` (``--name value``; True: a bare flag) put last."""
    out = python_cmd(*argv)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
