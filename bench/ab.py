"""This build against an earlier one, in alternating runs of one session.

CPU per request at c=64 (ingress + worker + Redis, from ``bench/run.py``'s CPU table)
and the added p50 at c=1 move with the machine from one minute to the next, so two
builds compare only in runs that alternate: ``--pairs`` times, the earlier build's
``bench/run.py --only AB`` and then this one's. It prints each pair and the medians,
with this build's figures as a fraction of the earlier one's.

The earlier build runs from its own checkout with its own interpreter: a git
worktree of ``--before`` (a commit) with a virtualenv made for it, both removed at
the end, or ``--before-dir`` and ``--before-python`` for a checkout and environment
kept from an earlier run (making the virtualenv takes a few minutes).

Usage: ``python bench/ab.py --before fda6e86 [--pairs 4]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Figures:
    rps: float  # B through the broker
    added_ms: float  # A's added p50
    ingress_us: float  # CPU per request during B
    worker_us: float
    redis_us: float

    @property
    def cpu_us(self) -> float:
        return self.ingress_us + self.worker_us + self.redis_us


def figures(report: str) -> Figures:
    """The figures of one ``bench/run.py --only AB`` report (its markdown)."""
    b = re.search(r"\| B: throughput[^|]*\| broker \| 64 \| ([\d,]+) \|", report)
    a = re.search(r"\| A: latency[^|]*\| broker \| 1 \|(?:[^|]*\|){4}\s*\+([\d.]+) ms", report)
    cpu = re.search(r"\| B \| broker \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", report)
    if b is None or a is None or cpu is None:
        raise ValueError("not a bench/run.py report with scenarios A and B")
    rps = float(b.group(1).replace(",", ""))
    ingress, worker, _mock, redis = (int(g) for g in cpu.groups())
    per_request = 10_000 / rps  # % of a core -> µs per request
    return Figures(
        rps, float(a.group(1)), ingress * per_request, worker * per_request, redis * per_request
    )


def run_once(python: str, tree: Path, out: Path) -> Figures:
    argv = [python, "bench/run.py", "--only", "AB", "--out", str(out)]
    subprocess.run(argv, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return figures(out.read_text())


def worktree(commit: str, where: Path) -> tuple[Path, str]:
    """A checkout of ``commit`` and a virtualenv with it installed."""
    tree = where / "before"
    subprocess.run(
        ["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), commit], check=True
    )
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", str(tree)], check=True)
    return tree, python


def report(pairs: list[tuple[Figures, Figures]]) -> list[str]:
    lines = [
        "| pair | CPU µs/request before (ingress / worker / Redis) | after | after / before "
        "| added p50 at c=1 before, after | ratio | req/s at c=64 before, after | ratio |",
        "|--:|---|---|--:|---|--:|---|--:|",
    ]
    for n, (b, a) in enumerate(pairs, 1):
        lines.append(
            f"| {n} | {b.cpu_us:.0f} ({b.ingress_us:.0f} / {b.worker_us:.0f} / {b.redis_us:.0f}) "
            f"| {a.cpu_us:.0f} ({a.ingress_us:.0f} / {a.worker_us:.0f} / {a.redis_us:.0f}) "
            f"| {a.cpu_us / b.cpu_us:.2f} | {b.added_ms:.2f}, {a.added_ms:.2f} ms "
            f"| {a.added_ms / b.added_ms:.2f} | {b.rps:,.0f}, {a.rps:,.0f} | {a.rps / b.rps:.2f} |"
        )

    def median(side: int, name: str) -> float:
        return statistics.median(getattr(p[side], name) for p in pairs)

    lines.append("")
    lines.append("| median | before | after | after / before |")
    lines.append("|---|--:|--:|--:|")
    for name, label in (
        ("cpu_us", "CPU µs per request at c=64"),
        ("ingress_us", "ingress"),
        ("worker_us", "worker"),
        ("redis_us", "Redis"),
        ("added_ms", "added p50 at c=1 (ms)"),
        ("rps", "req/s at c=64"),
    ):
        before, after = median(0, name), median(1, name)
        lines.append(f"| {label} | {before:,.2f} | {after:,.2f} | {after / before:.2f} |")
    return [*lines, "", *spread(pairs)]


#: The earlier build's CPU per request may move this much (max / min) across the pairs
#: before the run is called noisy: on a quiet machine it moves by 2-3 %.
NOISY = 1.10


def spread(pairs: list[tuple[Figures, Figures]]) -> list[str]:
    """How far apart the pairs are, and whether the machine was too noisy for their
    medians to decide between two builds, or against a target, closer than that."""
    cpu = sorted(a.cpu_us / b.cpu_us for b, a in pairs)
    c1 = sorted(a.added_ms / b.added_ms for b, a in pairs)
    before = [b.cpu_us for b, _ in pairs]
    lines = [
        f"Spread of the pairs: CPU {cpu[0]:.2f}-{cpu[-1]:.2f}, added p50 at c=1 "
        f"{c1[0]:.2f}-{c1[-1]:.2f}; the earlier build alone {min(before):.0f}-"
        f"{max(before):.0f} µs per request."
    ]
    if max(before) > NOISY * min(before):
        lines.append(
            "The machine was noisy: the earlier build's CPU per request moved by "
            f"{max(before) / min(before) - 1:.0%} between pairs (2-3 % on a quiet machine). "
            "The medians do not decide a difference smaller than the ratios' spread; "
            "run again when the machine is quiet."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the earlier build's commit")
    parser.add_argument("--before-dir", type=Path, help="a checkout of the earlier build")
    parser.add_argument("--before-python", help="an interpreter with that checkout installed")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args(argv)
    if not args.before and not (args.before_dir and args.before_python):
        parser.error("give --before COMMIT, or --before-dir and --before-python")
    with tempfile.TemporaryDirectory(prefix="llmb-ab-") as tmp_name:
        tmp = Path(tmp_name)
        made = args.before_dir is None
        if made:
            tree, python = worktree(args.before, tmp)
        else:
            tree, python = args.before_dir, args.before_python
        try:
            pairs = []
            for n in range(args.pairs):
                before = run_once(python, tree, tmp / f"before-{n}.md")
                after = run_once(sys.executable, HERE, tmp / f"after-{n}.md")
                pairs.append((before, after))
                print(f"pair {n + 1}: CPU {after.cpu_us / before.cpu_us:.2f}", file=sys.stderr)
        finally:
            if made:
                subprocess.run(
                    ["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    print(f"# this build against {args.before or args.before_dir}, {args.pairs} alternating pairs")
    print()
    print("\n".join(report(pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
