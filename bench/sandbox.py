"""Sandbox: what Landlock costs per spawn and per turn.

Per spawn, in one process that imported corral's worker and built the zygote's plan:
fork + restrict (worker/sandbox.enter: capabilities, private tmp, ruleset, rules,
landlock_restrict_self) + _exit + waitpid, against the same without the restriction,
in the same run, alternating. The figures: the median time of enter() as the child
measures it (the cost on a spawn's path; goal <= 1 ms), and the difference of the
medians of the whole fork-to-reap (which adds the kernel freeing the domain at exit).

The same again with corral's ports closed (the default without an HTTP token): the
process first restricts itself like the zygote (a layer of ~65,000 TCP port rules),
and every worker's layer stacked on it copies those rules: the figures name that cost,
the zygote's one-off cost, and the kernel memory each worker's domain holds (the
SUnreclaim growth with 20 workers held restricted at once).

The HTTP channel's peer check (the default without a token, instead of that layer):
what supervisor/peers.refusal costs per new connection, with 0, 100 and 500 idle
"workers" (forks holding 10 descriptors each) below the measuring process, for a
connection from outside the tree (the worst case: every descriptor of the tree is
read; what each CLI or client connection pays) and from the last worker (refused).

Per turn, end to end: three `corral serve` (sandbox off; the defaults: files and the
peer check; files and corral's ports closed by the layer) up at once, the same
echo agent, five messages per new session, the servers taking turns; p50 of POST ?wait
for the first message (a spawn), the second, and the third to fifth (warm). Goal: a
warm turn costs the same (the kernel checks files as they are opened; an echo turn
opens none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench.client import client, percentile, post
from bench.common import Bench
from bench.servers import CorralServer

SPAWN_SCRIPT = """
import json, os, sys, tempfile, time
import corral.worker.runtime
from corral.protocol.spawn import SandboxSettings
from corral.worker import landlock, sandbox
from corral.worker.confine import no_new_privs

n, ports = int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",") if p]


def unreclaimable_kb():
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("SUnreclaim:"))


root = tempfile.mkdtemp()
t = time.perf_counter()
# with `ports`, plan() also restricts this process like the zygote: a layer of TCP rules
settings = SandboxSettings(hidden=[root], deny_connect_ports=ports)
plan = sandbox.plan(settings, os.path.join(root, "tmp"))
plan_s = time.perf_counter() - t
bare, boxed, enter = [], [], []
for i in range(n):
    for restrict in (False, True):
        r, w = os.pipe()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # both children do what a worker does anyway; one also restricts
            os.close(r)
            no_new_privs()  # the worker has it from confine() already
            own = os.path.join(root, f"s{i}-{int(restrict)}")
            os.mkdir(own)
            t0 = time.perf_counter()
            if restrict:
                sandbox.enter(plan, [own])
            os.write(w, repr(time.perf_counter() - t0).encode())
            os._exit(0)
        os.close(w)
        took = os.read(r, 64)
        os.close(r)
        os.waitpid(pid, 0)
        (boxed if restrict else bare).append(time.perf_counter() - t)
        if restrict:
            enter.append(float(took))
            sandbox.forget(plan, pid)  # what the zygote does at reap, off the spawn path
# the kernel memory a worker's domain holds: HELD workers restricted at once
HELD = 20
before = unreclaimable_kb()
r, w = os.pipe()
held = []
for i in range(HELD):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        no_new_privs()
        own = os.path.join(root, f"held{i}")
        os.mkdir(own)
        sandbox.enter(plan, [own])
        os.read(r, 1)
        os._exit(0)
    held.append(pid)
time.sleep(1.0)
during = unreclaimable_kb()
os.close(w)
os.close(r)
for pid in held:
    os.waitpid(pid, 0)
    sandbox.forget(plan, pid)
sandbox.remove_all(plan)
print(json.dumps({"abi": plan.abi, "rules": len(plan.rules), "plan_s": plan_s,
                  "closed_in": plan.closed_in, "closed_ports": plan.closed_ports,
                  "kernel_kb_per_worker": (during - before) / HELD,
                  "bare": bare, "boxed": boxed, "enter": enter}))
"""


PEER_SCRIPT = """
import json, os, socket, sys, time
from corral.supervisor import peers

counts, rounds = [int(c) for c in sys.argv[1].split(",")], int(sys.argv[2])
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
out = {}
workers = []
r, w = os.pipe()
for n in counts:
    while len(workers) < n:
        pid = os.fork()
        if pid == 0:  # an idle worker: a few descriptors, waiting
            os.close(w)
            held = [os.pipe() for _ in range(5)]
            os.read(r, 1)
            os._exit(0)
        workers.append(pid)
    time.sleep(0.5)
    outside = []
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port)) as c:
            conn, _ = server.accept()
            t = time.perf_counter()
            verdict = peers.refusal(conn.getsockname(), conn.getpeername())
            outside.append(time.perf_counter() - t)
            conn.close()
        assert verdict is None, verdict
    out[n] = {"outside": outside}
os.close(w)
os.close(r)
for pid in workers:
    os.waitpid(pid, 0)
# refused: a connection held by a child (found on the way, the last one forked)
inside = []
for _ in range(rounds):
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        c = socket.create_connection(("127.0.0.1", port))
        b.send(b"x")
        b.recv(1)
        os._exit(0)
    conn, _ = server.accept()
    a.recv(1)
    t = time.perf_counter()
    verdict = peers.refusal(conn.getsockname(), conn.getpeername())
    inside.append(time.perf_counter() - t)
    assert verdict and "held by" in verdict, verdict
    a.send(b"x")
    os.waitpid(pid, 0)
    conn.close()
print(json.dumps({"by_workers": out, "inside": inside}))
"""


def peer_check_cost(rounds: int, counts: list[int]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PEER_SCRIPT, ",".join(map(str, counts)), str(rounds)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    r = json.loads(out.stdout)
    figures: dict[str, Any] = {
        f"allowed_p50_ms_{n}_workers": ms(percentile(v["outside"], 50))
        for n, v in r["by_workers"].items()
    }
    figures.update(
        {
            f"allowed_p99_ms_{n}_workers": ms(percentile(v["outside"], 99))
            for n, v in r["by_workers"].items()
        }
    )
    figures["refused_p50_ms_1_worker"] = ms(percentile(r["inside"], 50))
    return figures


def ms(seconds: float | None) -> float | None:
    """Milliseconds to the microsecond: these figures are fractions of one."""
    return None if seconds is None else round(seconds * 1000, 3)


def spawn_cost(n: int, ports: list[int]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", SPAWN_SCRIPT, str(n), ",".join(map(str, ports))],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    r = json.loads(out.stdout)
    bare50, boxed50 = percentile(r["bare"], 50), percentile(r["boxed"], 50)
    assert bare50 is not None and boxed50 is not None
    return {
        "abi": r["abi"],
        "rules": r["rules"],
        "plan_once_ms": ms(r["plan_s"]),
        "fork_bare_p50_ms": ms(bare50),
        "fork_sandboxed_p50_ms": ms(boxed50),
        "extra_p50_ms": ms(boxed50 - bare50),
        "enter_p50_ms": ms(percentile(r["enter"], 50)),
        "enter_p99_ms": ms(percentile(r["enter"], 99)),
        "kernel_kb_per_worker": round(r["kernel_kb_per_worker"]),
        "zygote_layer_ms": ms(r["closed_in"]) if r["closed_ports"] else None,
        "goal_per_spawn_ms": 1,
    }


async def turn_cost(bench: Bench, n: int) -> dict[str, Any]:
    """Both servers up at once, requests alternating between them, so the machine's
    load falls on both alike."""
    servers = {
        name: CorralServer(
            bench.tmp,
            name,
            config={
                "supervisor": {"idle_timeout": "1h", "max_workers": n + 20},
                "sandbox": {
                    "enabled": name != "sandbox-off",
                    # sandbox-on-files: the defaults (files; the HTTP peer check, "auto")
                    "close_corral_ports": "always" if name == "sandbox-on" else "auto",
                },
            },
        )
        for name in ("sandbox-off", "sandbox-on-files", "sandbox-on")
    }
    new: dict[str, list[float]] = {name: [] for name in servers}
    second: dict[str, list[float]] = {name: [] for name in servers}
    warm: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            await server.start()
        async with client() as http:
            for i in range(5):  # warm-up: connections and code paths, not counted
                for server in servers.values():
                    await post(http, server.base, f"w{i}", "hi")
            for i in range(n):
                order = list(servers.items())
                for name, server in order if i % 2 else order[::-1]:
                    answers = [await post(http, server.base, f"s{i}", f"m{k}") for k in range(5)]
                    if not all(a.done for a in answers):
                        raise RuntimeError(f"sandbox: bad reply {[a.body for a in answers]}")
                    new[name].append(answers[0].seconds)
                    second[name].append(answers[1].seconds)
                    warm[name] += [a.seconds for a in answers[2:]]
    finally:
        for server in servers.values():
            await server.stop()
    figures: dict[str, Any] = {
        name: {
            "new_p50_ms": ms(percentile(new[name], 50)),
            "second_p50_ms": ms(percentile(second[name], 50)),
            "warm_p50_ms": ms(percentile(warm[name], 50)),
            "warm_p99_ms": ms(percentile(warm[name], 99)),
        }
        for name in servers
    }
    off = figures["sandbox-off"]
    for name, prefix in (("sandbox-on", ""), ("sandbox-on-files", "files_")):
        for key in ("new", "second", "warm"):
            a, b = figures[name][f"{key}_p50_ms"], off[f"{key}_p50_ms"]
            extra = None if a is None or b is None else round(a - b, 3)
            figures[f"{prefix}{key}_extra_p50_ms"] = extra
    return figures


async def run(bench: Bench) -> dict[str, Any]:
    n = 30 if bench.plan.quick else 200
    bench.say(f"sandbox: {n} forks with and without the restriction; turns with it on and off")
    return {
        # the filesystem layer only (the defaults: "auto" is the HTTP peer check)
        "per_spawn": spawn_cost(n, []),
        # close_corral_ports = "always": the zygote's layer closing corral's ports beneath
        "per_spawn_corral_ports": spawn_cost(n, [8787, 9464]),
        "peer_check": peer_check_cost(20 if bench.plan.quick else 100, [0, 100, 500]),
        "per_turn": await turn_cost(bench, max(10, n // 4)),
    }
