"""This build against an earlier one, both running at once, in runs seconds apart.

``bench/ab.py`` alternates whole ``bench/run.py --only AB`` runs, each two minutes
long with its own start-up; on a machine whose speed moves from minute to minute its
pairs were up to 0.15 apart. Here both builds' stacks (each its own redis-server,
mock upstream, worker and ingress, started by that build's own ``bench/run.py``) are
up together, and short ``wrk`` runs alternate between them, in the order ABBA, BAAB,
... so that each pair of runs is seconds apart and neither build always goes first.
A stack that is not being measured is idle.

Each round measures, for each build: CPU per request of ingress + worker + Redis at
64 connections (``/proc`` user and system time over the run, as ``bench/run.py``'s
scenario B), and the added p50 at one connection (p50 through the broker minus p50 at
the build's own mock, measured right after). The report gives each round's ratios,
their medians and spread, and the ratio of the medians.

The earlier build runs from its own checkout with its own interpreter, as in
``bench/ab.py`` (``--before-dir`` and ``--before-python``; make them with ``git worktree
add`` and a virtualenv).

Usage: ``python bench/interleave.py --before-dir DIR --before-python PY [--rounds 10]
[--seconds 5]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import run as bench

HERE = Path(__file__).resolve().parent.parent
ROLES = ("ingress", "worker", "redis")

#: Run by each build's interpreter in its own checkout: start that build's benchmark
#: stack, print where it is, keep it until standard input closes.
HOLDER = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path.cwd() / "bench"))
import run as bench
bench.raise_fd_limit()
with tempfile.TemporaryDirectory(prefix="llmb-interleave-") as tmp:
    stack = bench.start_stack(Path(tmp))
    try:
        pids = {name: child.pid for name, child in stack.children.items()}
        print(json.dumps({"broker": stack.broker_url, "mock": stack.mock_url, "pids": pids}))
        sys.stdout.flush()
        sys.stdin.read()
    finally:
        stack.stop()
"""


@dataclass
class Build:
    name: str
    holder: subprocess.Popen[str]
    broker: str
    mock: str
    pids: dict[str, int]

    @classmethod
    def start(cls, name: str, python: str, tree: Path) -> Build:
        holder = subprocess.Popen(
            [python, "-c", HOLDER],
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line:
            raise bench.BenchBroken(f"{name}: the stack did not start")
        found = json.loads(line)
        return cls(name, holder, found["broker"], found["mock"], found["pids"])

    def stop(self) -> None:
        if self.holder.stdin is not None:
            self.holder.stdin.close()
        self.holder.wait(timeout=60)

    def cpu_s(self) -> float:
        return sum(bench.read_cpu_s(self.pids[role]) for role in ROLES)


@dataclass(frozen=True)
class Round:
    cpu_us: float  # per request at c=64, ingress + worker + Redis
    rps: float
    added_ms: float  # p50 through the broker minus the mock's, at c=1


def measure(build: Build, seconds: int) -> Round:
    busy = bench.Scenario("B", "c=64", "mock", 64, seconds)
    one = bench.Scenario("A", "c=1", "mock", 1, seconds)
    url = build.broker + bench.CHAT_PATH
    before = build.cpu_s()
    loaded = bench.run_wrk(url, busy, seconds)
    cpu = build.cpu_s() - before
    single = bench.run_wrk(url, one, seconds)
    mock = bench.run_wrk(build.mock + bench.CHAT_PATH, one, max(1, seconds // 2))
    if single.p50_ms is None or mock.p50_ms is None:
        raise bench.BenchBroken(f"{build.name}: wrk gave no p50")
    return Round(1e6 * cpu / max(1, loaded.requests), loaded.rps, single.p50_ms - mock.p50_ms)


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def report(rounds: list[tuple[Round, Round]]) -> list[str]:
    lines = [
        f"# this build against the earlier one, {len(rounds)} interleaved rounds",
        "",
        "| round | CPU µs/request before, after | ratio | added p50 at c=1 before, after "
        "| ratio | req/s at c=64 before, after |",
        "|--:|---|--:|---|--:|---|",
    ]
    for i, (b, a) in enumerate(rounds, 1):
        lines.append(
            f"| {i} | {b.cpu_us:.0f}, {a.cpu_us:.0f} | {a.cpu_us / b.cpu_us:.2f} "
            f"| {b.added_ms:.3f}, {a.added_ms:.3f} ms | {a.added_ms / b.added_ms:.2f} "
            f"| {b.rps:,.0f}, {a.rps:,.0f} |"
        )
    cpu = [a.cpu_us / b.cpu_us for b, a in rounds]
    added = [a.added_ms / b.added_ms for b, a in rounds]
    med = statistics.median
    lines += [
        "",
        "| median | before | after | after / before | median of the rounds' ratios (spread) |",
        "|---|--:|--:|--:|---|",
        f"| CPU µs per request at c=64 | {med(b.cpu_us for b, _ in rounds):.0f} "
        f"| {med(a.cpu_us for _, a in rounds):.0f} "
        f"| {med(a.cpu_us for _, a in rounds) / med(b.cpu_us for b, _ in rounds):.2f} "
        f"| {med(cpu):.2f} ({spread(cpu)}) |",
        f"| added p50 at c=1 (ms) | {med(b.added_ms for b, _ in rounds):.3f} "
        f"| {med(a.added_ms for _, a in rounds):.3f} "
        f"| {med(a.added_ms for _, a in rounds) / med(b.added_ms for b, _ in rounds):.2f} "
        f"| {med(added):.2f} ({spread(added)}) |",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-dir", type=Path, required=True)
    parser.add_argument("--before-python", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    bench.check_prerequisites()
    bench.raise_fd_limit()
    builds: list[Build] = []
    try:
        builds.append(Build.start("before", args.before_python, args.before_dir.resolve()))
        builds.append(Build.start("after", sys.executable, HERE))
        warm = bench.Scenario("W", "warm-up", "mock", 64, 3)
        for build in builds:
            bench.run_wrk(build.broker + bench.CHAT_PATH, warm, 3, strict=False)
        rounds: list[tuple[Round, Round]] = []
        for i in range(args.rounds):
            # ABBA: each build goes first in every other round.
            order = builds if i % 2 == 0 else builds[::-1]
            found = {b.name: measure(b, args.seconds) for b in order}
            rounds.append((found["before"], found["after"]))
            b, a = found["before"], found["after"]
            bench.log(f"round {i + 1}: CPU {a.cpu_us / b.cpu_us:.2f}")
        print("\n".join(report(rounds)))
    finally:
        for build in builds:
            build.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
