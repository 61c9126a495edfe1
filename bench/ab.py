"""python -m bench.ab REV [--rounds N] [--seconds S] [--tree-env K=V]: REV vs this tree.

On a shared machine one run's figure says little; two runs side by side, taken in
turns, say more. This exports commit REV of the repository to a temporary directory
and runs the throughput benchmark's load (16 sessions, closed loop) against a
`corral serve` of REV and one of the working tree, alternating, N rounds each, plus
the bare aiohttp echo server once per round. It prints every round and the median
ratio of each to bare aiohttp.

REV's code is found first on PYTHONPATH (a `corral` directory of links to its
protocol/, worker/, supervisor/, cli/), ahead of the editable install of this tree.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import REPO, BaselineServer, CorralServer, stop_all
from bench.throughput import closed_loop

PACKAGES = ("protocol", "worker", "supervisor", "cli")


def export(rev: str, into: Path) -> Path:
    """REV's files under `into`/tree; the directory to put on PYTHONPATH."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    data = subprocess.run(
        ["git", "archive", rev, *PACKAGES], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tree, filter="data")
    pkg = into / "path" / "corral"
    pkg.mkdir(parents=True)
    for name in PACKAGES:
        (pkg / name).symlink_to(tree / name)
    return into / "path"


async def one(server: CorralServer | BaselineServer, seconds: float) -> dict[str, Any]:
    try:
        await server.start()
        assert server.proc is not None
        return await closed_loop(server.base, server.proc.pid, seconds, 1.0)
    finally:
        if isinstance(server, CorralServer):
            await server.stop()
        else:
            server.kill()


async def run(
    rev: str, rounds: int, seconds: float, tmp: Path, env: dict[str, str], tree_env: dict[str, str]
) -> None:
    path = export(rev, tmp / "rev")
    rates: dict[str, list[float]] = {rev: [], "tree": [], "bare": []}
    cpu: dict[str, list[float]] = {rev: [], "tree": [], "bare": []}
    ratios: dict[str, list[float]] = {rev: [], "tree": []}
    config = {"supervisor": {"idle_timeout": "1h"}}
    for n in range(rounds):
        got: dict[str, float] = {}
        used: dict[str, float] = {}
        order = [rev, "tree"] if n % 2 == 0 else ["tree", rev]
        for name in order:
            extra = dict(env)
            if name == "tree":
                extra.update(tree_env)
            if name == rev:
                extra["PYTHONPATH"] = str(path)
            server = CorralServer(tmp, f"ab-{name}-{n}", config=config, env=extra)
            r = await one(server, seconds)
            got[name], used[name] = r["messages_per_s"], r["server_cpu_us_per_message"] or 0
        r = await one(BaselineServer(tmp, f"ab-bare-{n}", "echo", 5.0), seconds)
        got["bare"], used["bare"] = r["messages_per_s"], r["server_cpu_us_per_message"] or 0
        for k, v in got.items():
            rates[k].append(v)
            cpu[k].append(used[k])
        for k in ratios:
            ratios[k].append(got[k] / got["bare"] if got["bare"] else 0.0)
        line = ", ".join(f"{k} {v:.0f}/s ({used[k]:.0f} us CPU/msg)" for k, v in got.items())
        print(f"round {n + 1}: {line}", flush=True)
    for k, v in rates.items():
        print(f"{k:>10}: median {statistics.median(v):.0f} msg/s", end="")
        print(f", server CPU {statistics.median(cpu[k]):.0f} us/msg", end="")
        if k in ratios:
            print(f", ratio to bare {statistics.median(ratios[k]):.3f}", end="")
        print()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("rev", help="the commit to compare with, e.g. HEAD~1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument(
        "--tree-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the tree's server only, e.g. CORRAL_EVENT_LOOP=asyncio",
    )
    args = parser.parse_args()
    env = {"CORRAL_BENCH_NO_FSYNC": "1"} if args.no_fsync else {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corral-ab-") as tmp:
        try:
            tree_env = dict(kv.split("=", 1) for kv in args.tree_env)
            asyncio.run(run(args.rev, args.rounds, args.seconds, Path(tmp), env, tree_env))
        finally:
            stop_all()
    print(f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
