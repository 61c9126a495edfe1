"""Promises 5 and 6 against hostile process trees: whatever shape an agent gives its
tree, and whatever it does to its own process attributes, every descendant is counted
against its session's bounds and dies with its worker.

Each test drives a real `corral serve` with the `tree` agent (tests/agents.py) and
asserts on what an operator sees: the error reply's reason, `corral ls`, the exit
reasons in /metrics, and the processes left on the machine (psutil).
"""

from __future__ import annotations

import re
import struct
import threading
import time
from typing import Any

import psutil
import pytest

from tests.harness import Corral, processes_with_mark, wait_for

TREE = "tests.agents:tree"
GRACE = 1.0

LIMITS = {
    "turn_timeout": "60s",
    "no_progress_timeout": "3s",
    "rss_max": "200MiB",
    "cpu_time_per_turn": "30s",
}


def start(corral: Any, **limits: Any) -> Corral:
    c: Corral = corral(
        {"limits": {**LIMITS, **limits}, "supervisor": {"kill_grace": f"{GRACE}s"}}, agent=TREE
    )
    return c


def pids_in(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"\d+", text)]


def processes(pids: list[int]) -> list[psutil.Process]:
    """psutil handles of those still alive, so a PID recycled later is not mistaken for
    the same process."""
    found = []
    for p in pids:
        try:
            found.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def gone(procs: list[psutil.Process], timeout: float = 10.0) -> bool:
    try:
        wait_for(lambda: not alive(procs), timeout=timeout)
    except AssertionError:
        return False
    return True


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    try:
        return gone([psutil.Process(pid)], timeout)
    except psutil.NoSuchProcess:
        return True


def only_supervisor_and_zygote(c: Corral, workers: int = 0) -> None:
    """Nothing of this run is left but the supervisor, its zygote and `workers` workers."""
    try:
        wait_for(lambda: len(processes_with_mark(c.mark)) == 2 + workers, timeout=10)
    except AssertionError:
        left = processes_with_mark(c.mark)
        raise AssertionError(f"left: {[(p.pid, p.cmdline()) for p in left]}") from None


def reason(text: str) -> str:
    m = re.search(r"\[(\w+)\]$", text)
    assert m, text
    return m.group(1)


def exits(c: Corral, why: str) -> float:
    return c.metrics().get(f'corral_worker_exits_total{{reason="{why}"}}', 0.0)


def test_grandchildren_of_a_crashed_worker_do_not_survive(corral: Any) -> None:
    c = start(corral)
    for _ in range(5):
        body = c.send("crasher", "chain 3; crash")
        assert body["status"] == "error", body
        pids = pids_in(body["replies"][0]["text"])
        assert len(pids) == 3
        chain = processes(pids)
        assert reason(body["replies"][-1]["text"]) == "crashed"
        assert gone(chain), [p.pid for p in alive(chain)]
    assert exits(c, "crashed") == 5
    only_supervisor_and_zygote(c)


def test_grandchildren_of_a_stopped_worker_do_not_survive(corral: Any) -> None:
    c = start(corral)
    for _ in range(5):
        body = c.send("stopped", "chain 3; hang", wait=30)
        assert body["status"] == "error", body
        assert reason(body["replies"][-1]["text"]) == "no_progress"
        chain = processes(pids_in(body["replies"][0]["text"]))
        assert gone(chain), [p.pid for p in alive(chain)]
    only_supervisor_and_zygote(c)


def test_a_chain_that_ignores_sigterm_is_killed_whole(corral: Any) -> None:
    c = start(corral)
    for _ in range(3):
        body = c.send("stubborn", "ignore-term; chain-ignoring 4; hang", wait=30)
        assert body["status"] == "error", body
        assert reason(body["replies"][-1]["text"]) == "no_progress"
        pids = pids_in(body["replies"][0]["text"])
        assert len(pids) == 4
        chain = processes(pids)
        assert gone(chain), [p.pid for p in alive(chain)]
    only_supervisor_and_zygote(c)


def run_in_thread(c: Corral, session: str, text: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(c.send(session, text, wait=40)))
    t.start()
    return t, result


def test_an_operator_kill_takes_the_whole_tree(corral: Any) -> None:
    c = start(corral, no_progress_timeout="60s")
    for force in (False, True):
        assert c.texts("k", "echo up") == ["echo up"]
        worker = psutil.Process(c.ls()[0]["pid"])
        t, result = run_in_thread(c, "k", "chain 3; hang")
        wait_for(lambda w=worker: len(w.children(recursive=True)) >= 3)  # type: ignore[misc]
        chain = [worker, *worker.children(recursive=True)]
        args = ["kill", "k", "--force"] if force else ["kill", "k"]
        assert c.cli(*args).returncode == 0
        t.join(60)
        assert reason(result["replies"][-1]["text"]) == "killed"
        assert gone(chain), [p.pid for p in alive(chain)]
    only_supervisor_and_zygote(c)


def test_an_agent_cannot_take_a_descendant_out_of_its_tree(corral: Any) -> None:
    """It clears its subreaper flag and double-forks a 300 MiB grandchild: the grandchild
    stays in the session's tree, its memory counts, and it dies with the worker."""
    c = start(corral)
    body = c.send("escaper", "escape 300; hang", wait=40)
    assert body["status"] == "error", body
    assert body["replies"][0]["kind"] == "reply", body
    how, pid = body["replies"][0]["text"].split()
    assert how == "refused"
    assert reason(body["replies"][-1]["text"]) == "rss_limit", body
    assert pid_gone(int(pid))
    only_supervisor_and_zygote(c)


def test_a_process_cloned_as_the_zygotes_child_is_not_let_live(corral: Any) -> None:
    c = start(corral)
    body = c.send("cloner", "clone-parent")
    how, pid = body["replies"][0]["text"].split()
    assert how in ("refused", "cloned")
    if how == "cloned":  # the kernel let it: the zygote must kill it at once
        assert gone(processes([int(pid)]), timeout=3)
    assert c.texts("cloner", "still here") == ["still here"]
    only_supervisor_and_zygote(c, workers=1)


def test_cpu_used_between_turns_is_bounded(corral: Any) -> None:
    """A child left spinning after the turn ends is stopped like a spinning turn."""
    c = start(corral, cpu_time_per_turn="2s")
    body = c.send("idler", "spin-child")
    assert body["status"] == "done", body
    child = processes(pids_in(body["replies"][0]["text"]))
    wait_for(lambda: exits(c, "cpu_limit") == 1, timeout=30)
    assert gone(child)
    assert c.ls() == [] or c.ls()[0]["state"] != "busy"
    assert c.texts("idler", "back") == ["back"]
    only_supervisor_and_zygote(c, workers=1)


def test_an_agent_cannot_raise_its_cpu_limit(corral: Any) -> None:
    c = start(corral)
    hard, raised = c.texts("r", "rlimit")[0].split()[1:]
    assert int(hard) != -1  # RLIM_INFINITY
    assert raised == "refused"


@pytest.mark.parametrize("command", ["threads 100", "forks 60"])
def test_too_many_tasks_end_the_worker(corral: Any, command: str) -> None:
    c = start(corral, max_tasks=50)
    body = c.send("many", f"{command}; hang", wait=30)
    assert body["status"] == "error", body
    text = body["replies"][-1]["text"]
    assert reason(text) == "tasks_limit", text
    assert "too many" in text
    assert exits(c, "tasks_limit") == 1
    assert c.texts("many", "back") == ["back"]
    only_supervisor_and_zygote(c, workers=1)


def test_a_fork_bomb_that_ignores_sigterm_leaves_nothing(corral: Any) -> None:
    c = start(corral, max_tasks=64)
    body = c.send("bomber", "ignore-term; bomb 7; hang", wait=40)
    assert body["status"] == "error", body
    assert reason(body["replies"][-1]["text"]) == "tasks_limit", body
    only_supervisor_and_zygote(c)
    assert c.texts("bomber", "back") == ["back"]


def test_shared_pages_of_a_forked_tree_count_once(corral: Any) -> None:
    """40 MiB touched, then 30 sleeping forks: summed RSS would be over 1 GiB."""
    c = start(corral, rss_max="300MiB")
    body = c.send("forker", "balloon 40; forks 30")
    assert body["status"] == "done", body

    def sampled() -> dict[str, Any] | None:
        rows = c.ls()
        return rows[0] if rows and rows[0]["processes"] == 31 else None

    row = wait_for(sampled)
    time.sleep(1)  # a few more samples: still alive, still under the bound
    row = c.ls()[0]
    assert row["state"] == "idle", row
    assert 40 * 2**20 < row["rss"] < 200 * 2**20, row
    assert row["tasks"] >= 31, row
    assert c.metrics()['corral_session_tasks{session="forker"}'] >= 31
    assert c.texts("forker", "echo fine") == ["echo fine"]


def run_filter(program: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """Run a classic-BPF seccomp program on one system call; the action it returns."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    ops = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:  # ends at a return: every jump goes forward
        code, jt, jf, k = ops[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # ret k
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize(
    ("arch", "prctl", "clone", "clone3"),
    [
        (0xC000003E, 157, 56, 435),  # x86_64
        (0x40000003, 172, 120, 435),  # i386
        (0xC00000B7, 167, 220, 435),  # aarch64
        (0x40000028, 172, 120, 435),  # arm
    ],
)
def test_the_escape_filter_refuses_the_ways_out_and_nothing_else(
    arch: int, prctl: int, clone: int, clone3: int
) -> None:
    from corral.worker.confine import _escape_filter

    program = _escape_filter()
    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    assert run_filter(program, arch, prctl, (36, 0)) == eperm  # clear the subreaper flag
    assert run_filter(program, arch, prctl, (36, 1)) == allow  # set it
    assert run_filter(program, arch, prctl, (36, 1 << 32)) == allow  # set it, in the high word
    assert run_filter(program, arch, prctl, (15, 0)) == allow  # PR_SET_NAME
    assert run_filter(program, arch, clone, (0x8000 | 17,)) == eperm  # CLONE_PARENT
    assert run_filter(program, arch, clone, (0x01200011,)) == allow  # what fork() passes
    assert run_filter(program, arch, clone, (0x003D0F00,)) == allow  # a pthread
    assert run_filter(program, arch, clone3, ()) == enosys
    for nr in (0, 1, 2, 59, 60, 231):
        assert run_filter(program, arch, nr, (36, 0)) == allow
    if arch == 0xC000003E:
        assert run_filter(program, arch, 0x40000000 | 157, (36, 0)) == enosys  # x32
    assert run_filter(program, 0x12345678, prctl, (36, 0)) == allow  # an ABI not listed
