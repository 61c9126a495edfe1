"""python -m bench.trees [FORKS] [MIB]: what sampling a forked tree reads and costs.

A process touches MIB MiB, then forks FORKS children that sleep (they share its pages
copy-on-write). Prints, for the same tree in the same run: the summed RSS that corral
sampled before (psutil, per process) and the figure it samples now (PSS summed,
corral.supervisor.proctree.sample_tree), each with the time one sample takes (best
of 3). Not registered in `python -m bench`: it measures the sampler, not a server.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import psutil

from corral.protocol.procfs import descendants, kill_strays
from corral.supervisor import proctree


def make_tree(forks: int, mib: int) -> int:
    r, w = os.pipe()
    root = os.fork()
    if root == 0:
        os.close(r)
        block = bytearray(mib * 2**20)
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))
        for _ in range(forks):
            if os.fork() == 0:
                while True:  # ends when killed
                    time.sleep(3600)
        os.write(w, b"x")
        while True:  # ends when killed
            time.sleep(3600)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return root


def summed_rss(pid: int) -> int:
    """The sampler before: psutil's RSS (and CPU times) of every process, summed."""
    total = 0
    for p in [pid, *descendants(pid)]:
        proc = psutil.Process(p)
        with proc.oneshot():
            total += proc.memory_info().rss
            proc.cpu_times()
    return total


def sampled(pid: int) -> int:
    sample = proctree.sample_tree(pid)
    assert sample is not None
    return sample.rss


def best_of(fn: Callable[[int], int], pid: int, runs: int = 3) -> tuple[int, float]:
    value, best = 0, float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        value = fn(pid)
        best = min(best, time.perf_counter() - t)
    return value, best


def main() -> None:
    forks = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    root = make_tree(forks, mib)
    try:
        time.sleep(0.5)
        rss, rss_s = best_of(summed_rss, root)
        pss, pss_s = best_of(sampled, root)
    finally:
        kill_strays(keep=set())
        for _ in range(forks + 2):  # bounded: reap what was killed
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    figures = {
        "processes": forks + 1,
        "mib_touched": mib,
        "rss_sum_mib_before": round(rss / 2**20),
        "sample_ms_before": round(rss_s * 1e3, 1),
        "pss_sum_mib_now": round(pss / 2**20),
        "sample_ms_now": round(pss_s * 1e3, 1),
        "load": round(os.getloadavg()[0], 1),
    }
    for key, value in figures.items():
        print(f"{key:>22}  {value}", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
