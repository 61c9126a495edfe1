"""python -m bench.memory_ab REV [REV2] [--rounds N]: the memory benchmark, REV vs this
tree (or vs commit REV2).

Worker memory after one turn is a property of the code, but the machine is shared:
this runs bench/memory.py's measurement for commit REV (exported as bench/ab.py does,
its code found first on PYTHONPATH) and for the working tree in turns, N rounds each,
against one fake endpoint, and prints every round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ab import export
from bench.common import Bench, Plan
from bench.memory import AGENTS, measure
from bench.servers import stop_all

FIGURES = ("uss_median_mib", "pss_median_mib")


def _line(r: dict[str, Any]) -> str:
    if not r.get("sampled"):
        return str(r.get("error", "no worker measured"))
    more = r.get("more", {})
    return (
        f"{r['workers']}: USS {r['uss_median_mib']:.2f} PSS {r['pss_median_mib']:.2f}; "
        f"{more.get('workers', '-')}: PSS {more.get('pss_median_mib', '-')} "
        f"marginal {more.get('marginal_pss_mib', '-')} MiB"
    )


async def run(rev: str, rev2: str, rounds: int, tmp: Path) -> None:
    from tests.fake_openai import FakeOpenAI

    paths = {rev: export(rev, tmp / "rev")}
    if rev2 != "tree":
        paths[rev2] = export(rev2, tmp / "rev2")
    bench = Bench(Plan(quick=False), tmp, time.monotonic())
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    fake = FakeOpenAI().start()
    try:
        for n in range(rounds):
            for who in [rev, rev2] if n % 2 == 0 else [rev2, rev]:
                env = {"PYTHONPATH": str(paths[who])} if who in paths else {}
                for name in AGENTS:
                    r = await measure(bench, name, fake.base_url, env=env, tag=f"-{who}-{n}")
                    got.setdefault((who, name), []).append(r)
                    print(f"round {n + 1} {who:>10} {name:6} {_line(r)}", flush=True)
    finally:
        fake.stop()
    for (who, name), rs in got.items():
        ok = [r for r in rs if r.get("sampled")]
        if not ok:
            continue
        medians = {f: statistics.median(r[f] for r in ok) for f in FIGURES}
        more = [r["more"]["pss_median_mib"] for r in ok if r.get("more", {}).get("sampled")]
        marginal = [r["more"]["marginal_pss_mib"] for r in ok if "marginal_pss_mib" in r["more"]]
        print(
            f"{who:>10} {name:6} median of {len(ok)}: USS {medians['uss_median_mib']:.2f}, "
            f"PSS {medians['pss_median_mib']:.2f} MiB ({ok[0]['workers']} workers); "
            f"PSS {statistics.median(more):.2f} MiB, marginal "
            f"{statistics.median(marginal):.2f} MiB ({ok[0]['more']['workers']} workers)"
            if more and marginal
            else ""
        )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_ab")
    parser.add_argument("rev", help="the commit to compare with, e.g. HEAD~3")
    parser.add_argument(
        "rev2", nargs="?", default="tree", help="another commit (default: the tree)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corral-memory-ab-") as tmp:
        try:
            asyncio.run(run(args.rev, args.rev2, args.rounds, Path(tmp)))
        finally:
            stop_all()
    print(f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
