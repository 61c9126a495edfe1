"""python -m bench.profile [--seconds S] [--out DIR]: where the supervisor's time goes.

Starts one `corral serve` (echo agent), drives the throughput benchmark's load
(16 sessions, closed loop, one pooled client) and records the supervisor with
py-spy (`pip install py-spy`; sampling, from outside, so the process is not
slowed by instrumentation) for S seconds: a flame graph (SVG) and the top
functions by own time and by total time, printed. Also counts the store's commit
groups per message, from the store thread's log line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Bench, Plan
from bench.servers import CorralServer, stop_all
from bench.throughput import closed_loop


async def profile(tmp: Path, seconds: float, out: Path, env: dict[str, str]) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    server = CorralServer(tmp, "profile", config={"supervisor": {"idle_timeout": "1h"}}, env=env)
    try:
        await server.start()
        load = asyncio.create_task(closed_loop(server.base, server.pid, seconds + 2, 1.0))
        await asyncio.sleep(1.5)
        raw = out / "supervisor.txt"
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds)),
            "--rate", "250", "--threads", "--format", "raw", "--output", str(raw), "--nonblocking",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await spy.wait()
        result = await load
        print(f"load: {result['messages_per_s']} msg/s, p50 {result['p50_ms']} ms", flush=True)
        print_top(raw)
        print(f"raw stacks (collapsed, for flamegraph.pl): {raw}")
    finally:
        await server.stop()
    print("store at exit:", server.log_line("store:"))


def print_top(raw: Path, n: int = 30) -> None:
    """Own and total samples per function, from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    all_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue  # the loop thread only: the one the promises are about
        all_samples += count
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        for f in set(frames[1:]):
            total[f] = total.get(f, 0) + count
    print(f"\nloop thread: {all_samples} samples")
    print("top by own time:")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / all_samples:5.1f}%  {f}")
    print("top by total time:")
    for f, c in sorted(total.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {100 * c / all_samples:5.1f}%  {f}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "corral-profile")
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"CORRAL_BENCH_NO_FSYNC": "1"} if args.no_fsync else {}
    bench = Bench(Plan(quick=False), args.out, time.monotonic())
    try:
        asyncio.run(profile(bench.tmp, args.seconds, args.out, env))
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
