"""Where the broker's CPU goes: py-spy samples of ingress and worker under load.

Starts the benchmark's stack (bench/run.py: its own redis-server, the mock upstream,
one worker, one ingress), warms it up, then runs ``wrk`` against the broker for
``--seconds`` (model ``mock``, ``--connections`` connections, 64 by default, as
scenario B) while ``py-spy record`` samples both processes. It prints, per process,
the functions with the most samples on their own ("self") and with their callees
("total"), as a share of the process's samples, and the CPU per request of each
process over the run.

Usage: ``python bench/profile.py [--seconds 10] [--connections 64] [--top 25]``
(``pip install py-spy``; it needs the right to ptrace its children, which it has
as their parent on most systems, or as root.)

``--syscalls`` also counts each process's system calls per request over the run,
in all and for the few that matter here, with ``perf stat`` on the kernel's
syscall tracepoints (Debian's linux-perf; as root, or with
``kernel.perf_event_paranoid`` at -1).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import run as bench


def record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    argv = ["py-spy", "record", "--format", "raw", "--rate", "100", "--nonblocking"]
    argv += ["--duration", str(seconds), "--pid", str(pid), "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: The system calls counted one by one (all of them are counted too).
SYSCALLS = (
    "getpid",
    "epoll_wait",
    "epoll_pwait",
    "read",
    "write",
    "recvfrom",
    "sendto",
    "writev",
    "futex",
)


def count_syscalls(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    events = ["-e", "raw_syscalls:sys_enter"]
    for name in SYSCALLS:
        events += ["-e", f"syscalls:sys_enter_{name}"]
    argv = ["perf", "stat", "-x", ",", "-o", str(out), *events, "-p", str(pid)]
    argv += ["--", "sleep", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def syscalls_per_request(path: Path, requests: int) -> str:
    """``perf stat -x,`` output as "N per request (name n, ...)"."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].rpartition(":")[2].removeprefix("sys_enter_")] = int(fields[0])
    total = counts.pop("sys_enter", 0)
    parts = ", ".join(f"{k} {v / requests:.2f}" for k, v in counts.items() if v)
    return f"{total / requests:.2f} per request ({parts})"


def summarize(path: Path, top: int) -> list[str]:
    """The top functions of a py-spy raw (collapsed stacks) file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "", "| self % | function |", "|--:|---|"]
    lines += [f"| {100 * n / samples:.1f} | `{f}` |" for f, n in own.most_common(top)]
    lines += ["", "| total % | function |", "|--:|---|"]
    lines += [f"| {100 * n / samples:.1f} | `{f}` |" for f, n in total.most_common(top)]
    return lines


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` as ``module.py:func``."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{module}:{name}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--no-spy", action="store_true", help="only CPU and Redis commands per request"
    )
    parser.add_argument("--model", default="mock", help="e.g. mock-latency-1000 (1 s calls)")
    parser.add_argument(
        "--syscalls", action="store_true", help="system calls per request (perf stat)"
    )
    parser.add_argument(
        "--max-concurrency", type=int, help="the provider's max_concurrency (scenario F: 16384)"
    )
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    bench.check_prerequisites()
    if args.syscalls and shutil.which("perf") is None:
        print("perf is not installed: apt-get install linux-perf", file=sys.stderr)
        return 2
    sc = bench.Scenario("P", "profile", args.model, args.connections, args.seconds, timeout_s=10)
    bench.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="llmb-profile-") as tmp_name:
        tmp = Path(tmp_name)
        overrides = {}
        if args.max_concurrency:
            overrides = {"max_concurrency": args.max_concurrency}
        stack = bench.start_stack(tmp, overrides)
        try:
            url = stack.broker_url + bench.CHAT_PATH
            bench.run_wrk(url, sc, 3, strict=False)
            bench.wait_idle(stack.mock_url, timeout_s=60)
            outs = {name: tmp / f"{name}.txt" for name in ("ingress", "worker")}
            spies = (
                []
                if args.no_spy
                else [record(stack.children[n].pid, args.seconds, p) for n, p in outs.items()]
            )
            counted = {name: tmp / f"{name}.perf" for name in ("ingress", "worker")}
            counters = (
                [count_syscalls(stack.children[n].pid, args.seconds, p) for n, p in counted.items()]
                if args.syscalls
                else []
            )
            commands = bench.redis_commands(stack.redis_url)
            before, started = bench.cpu_now(stack), time.monotonic()
            result = bench.run_wrk(url, sc, args.seconds)
            cpu = bench.cpu_percent(before, bench.cpu_now(stack), time.monotonic() - started)
            after = bench.redis_commands(stack.redis_url)
            for spy in spies + counters:
                spy.wait(timeout=args.seconds + 30)
            print(f"# profile at c={args.connections}, {args.seconds}s: {result.rps:,.0f} req/s")
            print()
            for name in ("ingress", "worker", "redis"):
                us = 10_000 * cpu[name] / result.rps if result.rps else 0.0
                print(f"- {name}: {cpu[name]:.0f} % of a core, {us:.0f} µs per request")
            per_request = {
                k: (n - commands.get(k, 0)) / max(1, result.requests)
                for k, n in after.items()
                if n > commands.get(k, 0) and k != "info"
            }
            ranked = sorted(per_request.items(), key=lambda kv: -kv[1])
            print(f"- Redis commands per request: {sum(per_request.values()):.1f}")
            print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ranked))
            for name, path in counted.items() if args.syscalls else ():
                calls = syscalls_per_request(path, max(1, result.requests))
                print(f"- {name} system calls: {calls}")
            for name, path in outs.items() if not args.no_spy else ():
                print(f"\n## {name}\n")
                print("\n".join(summarize(path, args.top)))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
