"""python -m bench [--quick] [--only NAME,...]: run corral's benchmarks.

Prints progress on stderr, then a table and, as the last line of stdout, one
line of JSON with every figure. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import (
    cluster,
    durability,
    floods,
    isolation,
    memory,
    reaction,
    report,
    sandbox,
    scale,
    spawn,
    stop,
    throughput,
)
from bench.common import Bench, Plan
from bench.servers import REPO, RUN_ID, stop_all

BENCHMARKS: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "isolation": isolation.run,
    "floods": floods.run,
    "reaction": reaction.run,
    "spawn": spawn.run,
    "throughput": throughput.run,
    "scale": scale.run,
    "stop": stop.run,
    "durability": durability.run,
    "sandbox": sandbox.run,
    "cluster": cluster.run,
    "memory": memory.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--baseline-mode",
        choices=("threads", "loop"),
        default="threads",
        help="how the single-process gateway runs agent code (see bench/baseline.py)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


async def run_all(bench: Bench, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = await BENCHMARKS[name](bench)
        except Exception as e:
            # one broken benchmark should not hide the figures of the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def corral_commit() -> str:
    """The commit measured, marked "+changes" if files outside bench/ and docs/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!bench",
                ":!docs",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{'+changes' if changed else ''}" if head else "unknown"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally, which stops our servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in BENCHMARKS if n in args.only.split(",")]
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the run cleanly even when started from a shell that ignores SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    plan = Plan(quick=args.quick, baseline_mode=args.baseline_mode)
    started = time.monotonic()
    info: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
        },
        "run_id": RUN_ID,
        "corral_commit": corral_commit(),
    }
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        try:
            results = asyncio.run(run_all(Bench(plan, Path(tmp), started), names))
        finally:
            left = stop_all()  # before the state dirs go away
    info["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["leftover_processes"] = left
    results.update(info)
    print(report.render(results))
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
