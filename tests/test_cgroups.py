"""Per-worker cgroups when corral runs in a delegated cgroup v2 subtree.

The test makes a subtree of its own in the machine's cgroup v2 hierarchy and starts
the supervisor in it, as systemd does with Delegate=yes. Which controllers exist
depends on the machine (on a hybrid cgroup v1/v2 host, none of memory/pids/cpu);
cgroup.kill and membership work everywhere cgroup v2 does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from corral.protocol import cgroupfs
from corral.supervisor import cgroups
from tests.harness import Corral, running

CHAOS = "corral.worker.agents.chaos:agent"
NESTING = "tests.test_cgroups:nesting_agent"


def nesting_agent(turn, ctx):  # type: ignore[no-untyped-def]
    """ "nest": start a sleeper in a cgroup made inside the worker's own, reply its PID.
    "exit": the worker dies mid-turn. Anything else is echoed.

    A worker owns its cgroup's directory, so agent code can do this."""
    if turn.text == "nest":
        found = cgroups.own_cgroup()
        assert found is not None
        inner = found[1] / "inner"
        inner.mkdir()
        sleeper = subprocess.Popen(["sleep", "3600"])
        (inner / "cgroup.procs").write_text(str(sleeper.pid))
        ctx.reply(str(sleeper.pid))
    elif turn.text == "exit":
        os._exit(3)
    else:
        ctx.reply(turn.text)


def _procs(cg: Path) -> set[int]:
    return {int(p) for p in (cg / "cgroup.procs").read_text().split()}


def _remove_tree(cg: Path) -> None:
    if not cg.exists():
        return
    for child in sorted((d for d in cg.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        with contextlib.suppress(OSError):
            (child / "cgroup.kill").write_text("1")
        for _ in range(100):
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    with contextlib.suppress(OSError):
        cg.rmdir()


@pytest.fixture
def delegated() -> Path:
    mount = cgroups.cgroup2_mount()
    if mount is None or not os.access(mount / "cgroup.procs", os.W_OK):
        if os.environ.get("CI"):
            pytest.fail("CI needs a writable cgroup v2 hierarchy for this test")
        pytest.skip("no writable cgroup v2 hierarchy here")
    base = mount / f"corral-test-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        yield base
    finally:
        _remove_tree(base)


def test_each_worker_gets_a_cgroup_and_cgroup_kill_takes_its_strays(tmp_path, delegated):
    c = Corral(
        tmp_path,
        {"limits": {"no_progress_timeout": "2s"}, "supervisor": {"kill_grace": "1s"}},
        agent=CHAOS,
    ).start(cgroup=delegated)
    try:
        assert "per-worker cgroups under" in c.log()
        assert c.proc.pid in _procs(delegated / "supervisor")
        assert c.texts("a", "orphan; orphan; echo two strays") == ["two strays"]
        worker = c.ls()[0]["pid"]
        cg = delegated / "workers" / str(worker)
        members = _procs(cg)
        assert worker in members and len(members) == 3  # the worker and its two setsid'd strays

        body = c.send("a", "ignore-term; orphan; hang", wait=30)
        assert body["replies"][-1]["text"].endswith("[no_progress]")
        deadline = time.monotonic() + 10
        while cg.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cg.exists(), "a dead worker's cgroup is removed"
        assert not running(members)
        assert c.texts("a", "echo back") == ["back"]
    finally:
        assert c.stop() == 0
    assert not c.leftovers()
    assert [d for d in (delegated / "workers").iterdir() if d.is_dir()] == []


def test_worker_cgroups_left_by_a_sigkilled_run_are_cleaned_at_the_next_start(tmp_path, delegated):
    c = Corral(tmp_path, agent=CHAOS).start(cgroup=delegated)
    assert c.texts("a", "orphan; echo x") == ["x"]
    old = _procs(delegated / "workers" / str(c.ls()[0]["pid"]))
    c.kill9()
    c.start(cgroup=delegated)
    try:
        assert not running(old)
        assert c.texts("a", "echo y") == ["y"]
        dirs = [d.name for d in (delegated / "workers").iterdir() if d.is_dir()]
        assert dirs == [str(c.ls()[0]["pid"])]
    finally:
        assert c.stop() == 0


def test_a_cgroup_an_agent_made_inside_its_worker_s_goes_with_the_worker(tmp_path, delegated):
    # the sandbox keeps agents out of /sys/fs/cgroup altogether (no cgroup of their own,
    # no moving to another of the service's): this is the unsandboxed agent's case
    c = Corral(tmp_path, {"sandbox": {"enabled": False}}, agent=NESTING).start(cgroup=delegated)
    try:
        sleeper = int(c.texts("a", "nest")[0])
        worker = c.ls()[0]["pid"]
        cg = delegated / "workers" / str(worker)
        assert sleeper in _procs(cg / "inner")

        c.send("a", "exit")  # the worker dies; the zygote kills and removes its cgroup
        deadline = time.monotonic() + 10
        while cg.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cg.exists(), "the dead worker's cgroup and the one inside it are removed"
        assert not running({sleeper})

        assert c.texts("b", "nest")[0].isdigit()  # left running for the stop to clean up
    finally:
        assert c.stop() == 0
    assert not c.leftovers()
    assert [d for d in (delegated / "workers").iterdir() if d.is_dir()] == []


def test_worker_memory_max_leaves_headroom_above_rss_max():
    """The kernel stops a worker a little above rss_max, so the sampler names the figure."""
    gib, mib = 1024**3, 1024**2
    assert cgroups.worker_limits(gib) == cgroupfs.Limits(
        memory_max=gib + gib // 8, pids_max=cgroups.PIDS_MAX, cpu_max="100000 100000"
    )
    assert cgroups.worker_limits(64 * mib).memory_max == 80 * mib  # at least 16 MiB more
    assert cgroups.worker_limits(gib, cpus=0.5).cpu_max == "50000 100000"
