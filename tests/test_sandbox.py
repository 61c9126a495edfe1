"""The sandbox, from inside an agent: a hostile agent tries what it must not, and sees a
permission error each time, while corral keeps serving everyone else."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.protocol.spawn import SandboxSettings
from corral.supervisor.config import ConfigError, parse_config
from corral.supervisor.sandbox import (
    checks_http_peers,
    closes_corral_ports,
    corral_ports,
    describe,
)
from corral.worker import landlock, sandbox, seccomp
from tests.harness import Corral, wait_for

HOSTILE = "tests.agents:hostile"
ABI = landlock.abi()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock")
needs_scoping = pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")


def attack(c: Corral, session: str, *commands: str) -> list[str]:
    """The hostile agent's answer, one line per command."""
    (reply,) = c.texts(session, ";".join(commands))
    lines = reply.split("\n")
    assert len(lines) == len(commands), reply
    return lines


def status(c: Corral) -> dict:  # type: ignore[type-arg]
    done = c.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def worker_pid(c: Corral, session: str) -> int:
    rows = [r for r in c.ls() if r["session"] == session]
    assert rows and rows[0]["pid"], rows
    return int(rows[0]["pid"])


@needs_landlock
def test_a_hostile_agent_cannot_touch_other_sessions_or_corrals_files(
    corral: Callable[..., Corral],
) -> None:
    c = corral(agent=HOSTILE)
    assert attack(c, "alice", "own")[0].startswith("ok True")  # the victim has data now
    state = c.state
    alice_dir = state / "agents" / "alice"
    assert (alice_dir / "mine.txt").exists()
    lines = attack(
        c,
        "mallory",
        f"read {state}/sessions/alice.jsonl",
        f"write {state}/sessions/alice.jsonl",
        f"read {alice_dir}/mine.txt",
        f"write {alice_dir}/mine.txt",
        f"list {alice_dir}",
        f"list {state}",
        f"read {state}/corral.db",
        f"write {state}/corral.db",
        f"read {c.config_path}",
        f"write {c.tmp}/outside.txt",
        "list /tmp",
        "write /tmp/outside.txt",
        f"write {Path.home()}/outside.txt",
        "list /dev/shm",
    )
    refused = [line for line in lines if not line.startswith("denied PermissionError")]
    assert refused == [], lines
    assert not (c.tmp / "outside.txt").exists()
    assert (state / "sessions" / "alice.jsonl").read_bytes().count(b"pwned") == 0
    # the attacker's own state_dir, temporary directory and transcript still work,
    # and so does every other session
    own = attack(c, "mallory", "own")[0]
    zygote = status(c)["zygote_pid"]
    assert own.startswith(f"ok True {state}/tmp/{zygote}/{worker_pid(c, 'mallory')}/"), own
    assert attack(c, "mallory", "own")[0].endswith("history 4")
    assert attack(c, "alice", "own")[0].endswith("history 2")


@needs_landlock
def test_a_hostile_agent_cannot_use_the_control_socket(corral: Callable[..., Corral]) -> None:
    c = corral(agent=HOSTILE)
    sock = c.state / "control.sock"
    lines = attack(c, "mallory", f"control {sock}", f"child-control {sock}")
    assert all(line.startswith("denied PermissionError: HTTP/1.1 403") for line in lines), lines
    # a worker that makes itself invisible in /proc does not break the chain
    lines = attack(c, "mallory", "undumpable", f"child-control {sock}")
    assert lines[1].startswith("denied PermissionError: HTTP/1.1 403"), lines
    assert status(c)["sessions"] == 1  # the operator's CLI is served as before


@needs_scoping
def test_a_hostile_agent_cannot_signal_outside_its_own_tree(corral: Callable[..., Corral]) -> None:
    c = corral(agent=HOSTILE)
    attack(c, "alice", "own")
    st = status(c)
    alice, supervisor, zygote = worker_pid(c, "alice"), st["pid"], st["zygote_pid"]
    lines = attack(
        c,
        "mallory",
        *(f"signal {pid} {sig}" for pid in (alice, zygote, supervisor) for sig in ("SIGSTOP",)),
        *(f"pidfd-signal {pid} SIGKILL" for pid in (alice, zygote, supervisor)),
        *(f"signal {pid} SIGKILL" for pid in (alice, zygote, supervisor)),
        f"environ {supervisor}",
        f"environ {zygote}",
        f"environ {alice}",
    )
    assert all(line.startswith("denied PermissionError") for line in lines), lines
    # nobody was hurt: the same processes serve, alice's worker answers
    assert status(c)["zygote_pid"] == zygote
    assert attack(c, "alice", "own")[0].endswith("history 2")
    assert worker_pid(c, "alice") == alice


@needs_scoping
def test_a_hostile_agent_cannot_reach_an_abstract_socket_outside(
    corral: Callable[..., Corral],
) -> None:
    name = f"corral-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + name)
        listener.listen()
        c = corral(agent=HOSTILE)
        assert attack(c, "mallory", f"abstract {name}") == [
            "denied PermissionError: [Errno 1] Operation not permitted"
        ]


def test_with_the_sandbox_off_the_same_attack_works_and_status_says_so(
    corral: Callable[..., Corral],
) -> None:
    c = corral({"sandbox": {"enabled": False}}, agent=HOSTILE)
    attack(c, "alice", "own")
    (line,) = attack(c, "mallory", f"read {c.state}/sessions/alice.jsonl")
    assert line.startswith("ok read"), line
    level = status(c)["sandbox"]
    assert level["enabled"] is False and level["abi"] == 0
    assert c.metrics()["corral_sandbox_abi"] == 0
    assert "sandbox: off" in c.log()
    assert "off ([sandbox] enabled = false)" in c.cli("status").stdout


@needs_landlock
def test_status_metrics_and_log_show_the_landlock_level_in_force(
    corral: Callable[..., Corral],
) -> None:
    c = corral()
    level = status(c)["sandbox"]
    assert level["enabled"] is True and level["abi"] == ABI
    assert "filesystem" in level["enforced"]
    metrics = c.metrics()
    assert metrics["corral_sandbox_abi"] == ABI
    assert metrics['corral_sandbox_enforced{feature="filesystem"}'] == 1
    assert c.log().count(f"sandbox: Landlock ABI {ABI}") == 1
    assert f"Landlock ABI {ABI}" in c.cli("status").stdout


@needs_landlock
def test_extra_read_only_and_read_write_paths_are_reachable(
    corral: Callable[..., Corral], tmp_path: Path
) -> None:
    cache, work = tmp_path / "model-cache", tmp_path / "workspace"
    cache.mkdir()
    work.mkdir()
    (cache / "weights.bin").write_bytes(b"w" * 10)
    c = corral({"sandbox": {"read_only": [str(cache)], "read_write": [str(work)]}}, agent=HOSTILE)
    lines = attack(
        c,
        "s",
        f"read {cache}/weights.bin",
        f"write {cache}/weights.bin",
        f"write {work}/out.txt",
        f"read {work}/out.txt",
    )
    assert lines[0] == "ok read 10 bytes"
    assert lines[1].startswith("denied PermissionError")
    assert lines[2:] == ["ok wrote", "ok read 6 bytes"]


@needs_landlock
def test_an_extra_path_that_holds_corrals_state_is_carved_out(
    corral: Callable[..., Corral], tmp_path: Path
) -> None:
    # tmp_path holds this run's state_dir and config: reading it must not reach them
    (tmp_path / "notes.txt").write_text("hello")
    c = corral({"sandbox": {"read_only": [str(tmp_path)]}}, agent=HOSTILE)
    lines = attack(
        c,
        "s",
        f"read {tmp_path}/notes.txt",
        f"read {c.state}/corral.db",
        f"read {c.config_path}",
    )
    assert lines[0] == "ok read 5 bytes"
    assert all(line.startswith("denied PermissionError") for line in lines[1:]), lines


@needs_landlock
def test_the_chaos_agent_runs_unchanged_inside_and_leaves_no_temporary_files(
    corral: Callable[..., Corral],
) -> None:
    c = corral(agent="corral.worker.agents.chaos:agent")
    assert c.texts("a", "echo hi; orphan; balloon 20; echo done") == ["hi", "done"]
    (reply,) = c.texts("b", "crash")
    assert "crashed" in reply
    assert c.texts("b", "echo again") == ["again"]
    assert status(c)["sandbox"]["abi"] == ABI
    assert (c.state / "tmp").is_dir()  # the workers' private temporary directories
    c.stop()
    assert not (c.state / "tmp").exists()


@pytest.mark.skipif(ABI < 4, reason="TCP rules need Landlock ABI 4")
def test_allow_connect_ports_limits_tcp_and_the_http_channel_port_can_be_left_out(
    corral: Callable[..., Corral],
) -> None:
    with socket.socket() as allowed, socket.socket() as other:
        for s in (allowed, other):
            s.bind(("127.0.0.1", 0))
            s.listen()
        a, b = allowed.getsockname()[1], other.getsockname()[1]
        c = corral({"sandbox": {"allow_connect_ports": [a]}}, agent=HOSTILE)
        lines = attack(c, "s", f"tcp {a}", f"tcp {b}", f"tcp {c.port}")
        around = attack(c, "s", f"mptcp {b}", f"tfo {b}")
    assert lines[0] == "ok connected"
    assert all(line.startswith("denied PermissionError") for line in lines[1:]), lines
    assert [line.split("]")[0] for line in around] == [
        "failed OSError: [Errno 93",
        "failed OSError: [Errno 95",
    ], around
    assert "has no token" not in c.log()  # the channel is out of the agents' reach


def test_by_default_an_agents_http_requests_get_403_and_nothing_is_accepted(
    corral: Callable[..., Corral],
) -> None:
    c = corral(agent=HOSTILE)  # the defaults: an HTTP channel on loopback, no token
    lines = attack(
        c,
        "mallory",
        f"post {c.port} victim",
        f"child-post {c.port} victim",
        f"post-close {c.port} victim",  # gone before corral looks: refused too
        f"tcp {c.port}",  # the port itself is open: no Landlock layer, no per-spawn cost
    )
    for line in lines[:2]:
        assert line.startswith("status 403"), lines
        assert "agents cannot use corral's HTTP channel" in line, lines
    assert lines[2:] == ["ok sent", "ok connected"], lines
    assert c.texts("alice", "hello") != []  # the test process is served
    wait_for(lambda: c.log().count("HTTP: refused a connection") >= 1, timeout=10)
    time.sleep(1.0)  # what the closed connection sent would be accepted by now
    assert "victim" not in {r["session"] for r in c.ls()}
    done = c.cli("history", "victim")
    assert "as you" not in done.stdout and "sent and gone" not in done.stdout
    assert "http_peer_check" in status(c)["sandbox"]["enforced"]
    assert "corral_ports" not in status(c)["sandbox"]["enforced"]
    assert c.metrics()['corral_sandbox_enforced{feature="http_peer_check"}'] == 1
    assert "has no token" not in c.log()  # the door is closed: nothing to warn of


def test_with_a_token_the_peer_check_is_skipped(corral: Callable[..., Corral]) -> None:
    c = corral({"channels.http": {"token": "s3cret"}}, agent=HOSTILE)
    (line,) = attack_with_token(c, "mallory", f"post {c.port} victim")
    assert line.startswith("status 401"), line  # the token refuses it, not the peer check
    assert "http_peer_check" not in status(c)["sandbox"]["enforced"]
    assert "refused a connection" not in c.log()


def attack_with_token(c: Corral, session: str, *commands: str) -> list[str]:
    status_, body = c.request(
        "POST",
        "/v1/messages?wait=30",
        {"session": session, "text": ";".join(commands)},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert status_ == 200, (status_, body)
    (reply,) = [r["text"] for r in body["replies"]]
    return reply.split("\n")  # type: ignore[no-any-return]


needs_tcp_rules = pytest.mark.skipif(ABI < 4, reason="TCP rules need Landlock ABI 4")


@needs_tcp_rules
def test_with_close_corral_ports_always_agents_cannot_connect_to_corrals_own_ports(
    corral: Callable[..., Corral],
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        c = corral({"sandbox": {"close_corral_ports": "always"}}, agent=HOSTILE)
        port = other.getsockname()[1]
        lines = attack(c, "mallory", f"tcp {c.port}", f"tcp {c.metrics_port}", f"tcp {port}")
        # and so does what the agent starts; and the ways around Landlock's TCP rules
        around = attack(c, "mallory", f"child-tcp {c.port}", f"mptcp {c.port}", f"tfo {c.port}")
    assert lines[0].startswith("denied PermissionError"), lines
    assert lines[1].startswith("denied PermissionError"), lines
    assert lines[2] == "ok connected", lines
    assert around[0].startswith("denied PermissionError"), around
    assert around[1].startswith("failed OSError: [Errno 93]"), around  # EPROTONOSUPPORT
    assert around[2].startswith("failed OSError: [Errno 95]"), around  # EOPNOTSUPP
    assert c.texts("alice", "own") != []  # corral serves everyone else
    assert {"corral_ports", "tcp_bypass_filter"} <= set(status(c)["sandbox"]["enforced"])
    assert c.metrics()['corral_sandbox_enforced{feature="corral_ports"}'] == 1
    assert "has no token" not in c.log()


@needs_tcp_rules
def test_the_openai_agent_reaches_its_endpoint_on_another_local_port(
    corral: Callable[..., Corral], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fake_openai import FakeOpenAI

    monkeypatch.setenv("CORRAL_TEST_FAKE_KEY", "sk-fake-sandbox")
    fake = FakeOpenAI(api_key="sk-fake-sandbox").start()
    try:
        options = {"base_url": fake.base_url, "model": "m", "api_key_env": "CORRAL_TEST_FAKE_KEY"}
        c = corral(
            {"agent.options": options, "sandbox": {"close_corral_ports": "always"}},
            agent="corral.worker.agents.openai:agent",
        )
        assert c.texts("alice", "hello") == ["echo: hello"]
        assert "corral_ports" in status(c)["sandbox"]["enforced"]
        c.stop()
    finally:
        fake.stop()


def test_with_close_corral_ports_never_the_http_channel_is_open_and_named_at_start(
    corral: Callable[..., Corral],
) -> None:
    c = corral({"sandbox": {"close_corral_ports": "never"}}, agent=HOSTILE)
    assert "sandbox: the HTTP channel on 127.0.0.1:" in c.log()
    (line,) = attack(c, "mallory", f"post {c.port} victim")
    assert line.startswith("status 202"), line
    assert not {"corral_ports", "http_peer_check"} & set(status(c)["sandbox"]["enforced"])


def test_which_ports_are_corrals_own() -> None:
    def ports(extra: str) -> list[int]:
        cfg = parse_config(
            '[channels.http]\nlisten = "127.0.0.1:8787"\n[metrics]\nlisten = "127.0.0.1:9464"\n'
            '[sandbox]\nclose_corral_ports = "always"\n' + extra
        )
        return corral_ports(cfg) if closes_corral_ports(cfg) else []

    # "auto" (the default) is the HTTP channel's peer check: no layer of port rules
    default = parse_config("")
    assert not closes_corral_ports(default) and checks_http_peers(default)
    assert ports("") == [8787, 9464]
    assert ports('[store]\nurl = "postgresql://corral@127.0.0.1:5433/corral"\n') == [
        5433,
        8787,
        9464,
    ]
    assert ports('[store]\nurl = "postgresql://corral@localhost/corral"\n') == [
        5432,
        8787,
        9464,
    ]
    # a server elsewhere: port rules cannot tell hosts apart, its port stays open
    assert ports('[store]\nurl = "postgresql://corral@10.20.30.40:5433/corral"\n') == [
        8787,
        9464,
    ]
    assert ports('[store]\nurl = "postgresql:///corral"\n') == [8787, 9464]  # unix socket
    # with a token the channel is no door: no peer check; "always" still adds the layer
    token = '[channels.http]\ntoken = "t"\n'
    cfg = parse_config(token + '[sandbox]\nclose_corral_ports = "always"\n')
    assert closes_corral_ports(cfg) and not checks_http_peers(cfg)
    assert not closes_corral_ports(parse_config(token))
    assert not checks_http_peers(parse_config('[sandbox]\nclose_corral_ports = "never"\n'))
    assert ports("allow_connect_ports = [443]\n") == []  # its own allow-list
    with pytest.raises(ConfigError, match=r"sandbox\.close_corral_ports"):
        parse_config('[sandbox]\nclose_corral_ports = "yes"\n')


TCP_FILTER_SCRIPT = """
import ctypes, errno, os, socket, subprocess
from corral.worker import seccomp
from corral.worker.confine import no_new_privs

no_new_privs()
seccomp.install()
out = []
libc = ctypes.CDLL(None, use_errno=True)
ring = libc.syscall(425, 4, ctypes.c_void_p(0))
out.append(errno.errorcode[ctypes.get_errno()] if ring < 0 else "io_uring")
for args in [(43, socket.SOCK_STREAM, 0), (socket.AF_INET6, socket.SOCK_STREAM, 262)]:
    try:
        socket.socket(*args).close()
        out.append("opened")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
socket.socket(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP).close()
out.append(subprocess.run(["sh", "-c", "echo fine"], capture_output=True, text=True).stdout.strip())
print(" ".join(out))
"""


@pytest.mark.skipif(not seccomp.supported(), reason="the filter knows x86_64 and aarch64")
def test_the_tcp_bypass_filter_refuses_io_uring_smc_and_mptcp_and_nothing_else() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TCP_FILTER_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ENOSYS", "EAFNOSUPPORT", "EPROTONOSUPPORT", "fine"]


def test_before_landlock_abi_4_status_says_corrals_ports_stay_open() -> None:
    plan = sandbox.Plan(abi=3, settings=SandboxSettings(deny_connect_ports=[8787]))
    level = plan.level()
    assert "corral_ports" in level.missing
    text = describe(level)
    assert "corral's ports stay open to agents" in text and "refuses their connections" in text
    assert "corral_ports" in sandbox.Plan(abi=4, settings=plan.settings).level().enforced


def test_sandbox_config_keys_are_checked() -> None:
    cfg = parse_config(
        '[sandbox]\nenabled = false\nread_only = ["/srv/models"]\nallow_connect_ports = [443]\n'
    )
    assert cfg.sandbox.enabled is False and cfg.sandbox.allow_connect_ports == [443]
    with pytest.raises(ConfigError, match=r"sandbox\.read_write"):
        parse_config('[sandbox]\nread_write = ["relative/dir"]\n')
    with pytest.raises(ConfigError, match=r"sandbox\.allow_connect_ports"):
        parse_config("[sandbox]\nallow_connect_ports = [70000]\n")
    with pytest.raises(ConfigError, match=r"sandbox\.writable: unknown key"):
        parse_config("[sandbox]\nwritable = []\n")


def test_the_zygote_refuses_a_socket_whose_peer_is_not_its_parent(tmp_path: Path) -> None:
    # a socket connected by some other process (not the zygote's parent) is handed to it:
    # it must exit without reading a request
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket,sys,time\n"
                "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET);s.connect(sys.argv[1])\n"
                "time.sleep(30)\n",
                path,
            ]
        )
        try:
            conn, _ = listener.accept()
            with conn:
                zygote = subprocess.Popen(
                    [sys.executable, "-m", "corral.worker.zygote", str(conn.fileno())],
                    pass_fds=(conn.fileno(),),
                    stderr=subprocess.PIPE,
                )
                assert zygote.wait(timeout=30) == 0
        finally:
            other.kill()
            other.wait()


@needs_landlock
def test_the_sandbox_cost_is_small_enough_to_spawn_many(corral: Callable[..., Corral]) -> None:
    # not a timing assert (that is bench/sandbox.py): 20 sessions start and answer
    c = corral()
    for i in range(20):
        assert c.texts(f"s{i}", "hi") == ["hi"]
    wait_for(lambda: len(c.ls()) == 20)


OLDER_ABI_SCRIPT = """
import dataclasses, os, sys
import corral.worker.runtime
from corral.protocol.spawn import SandboxSettings
from corral.worker import sandbox
from corral.worker.confine import no_new_privs

abi, secret, own = int(sys.argv[1]), sys.argv[2], sys.argv[3]
hidden = os.path.dirname(secret)
plan = sandbox.plan(SandboxSettings(hidden=[hidden]), os.path.join(hidden, "tmp"))
plan = dataclasses.replace(plan, abi=abi)
pid = os.fork()
if pid == 0:
    no_new_privs()
    sandbox.enter(plan, [own])
    out = []
    for path in (secret, sys.executable):
        try:
            open(path, "rb").close()
            out.append("read")
        except PermissionError:
            out.append("denied")
    with open(os.path.join(own, "f"), "w") as f:
        f.write("x")
    out.append("own")
    print(" ".join(out), plan.level().enforced)
    os._exit(0)
os.waitpid(pid, 0)
"""


@needs_landlock
@pytest.mark.parametrize("abi", range(1, ABI + 1))
def test_every_landlock_abi_from_1_restricts_files(abi: int, tmp_path: Path) -> None:
    (tmp_path / "corral").mkdir()
    secret = tmp_path / "corral" / "corral.db"
    secret.write_text("secret")
    own = tmp_path / "own"
    own.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", OLDER_ABI_SCRIPT, str(abi), str(secret), str(own)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    words, _, enforced = done.stdout.partition(" [")
    assert words == "denied read own", done.stdout
    assert ("'signals'" in enforced) == (abi >= 6)
    assert (own / "f").read_text() == "x"


def test_the_peer_check_knows_our_descendants_and_nobody_else(tmp_path: Path) -> None:
    from corral.supervisor.sandbox import started_by_us

    uid = os.geteuid()
    # a child that makes itself non-dumpable forks the grandchild that is checked
    middle = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes,subprocess,sys,time\n"
            "ctypes.CDLL(None).prctl(4,0,0,0,0)\n"
            "p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'])\n"
            "print(p.pid, flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert middle.stdout is not None
        grandchild = int(middle.stdout.readline())
        pidfd = os.pidfd_open(grandchild)
        try:
            assert started_by_us(grandchild, uid, pidfd)
            assert started_by_us(grandchild, uid)  # the /proc walk
            assert not started_by_us(grandchild, uid + 1, pidfd)  # another uid: not ours
        finally:
            os.close(pidfd)
        assert started_by_us(middle.pid, uid)
        assert not started_by_us(os.getppid(), uid)  # our parent is not our descendant
        assert not started_by_us(os.getpid(), uid)
    finally:
        middle.kill()
        middle.wait()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert started_by_us(gone.pid, uid)  # exited before it could be checked: refused


def test_without_landlock_the_level_says_none_and_why_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from corral.cli.render import sandbox_line
    from corral.protocol.spawn import SandboxSettings
    from corral.supervisor.sandbox import LevelLog
    from corral.worker.sandbox import Plan

    landlock.unavailable, before = "the kernel has no Landlock", landlock.unavailable
    try:
        level = Plan(abi=0, settings=SandboxSettings()).level()
    finally:
        landlock.unavailable = before
    assert level.enabled and level.abi == 0 and level.enforced == []
    assert {"filesystem", "signals", "abstract_unix_sockets"} <= set(level.missing)
    assert sandbox_line(level) == "NONE (the kernel has no Landlock): workers are not confined"
    log = LevelLog()
    with caplog.at_level("INFO", logger="corral.sandbox"):
        log.report(level)
        log.report(level)  # a new zygote on the same kernel: not said again
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "none: the kernel has no Landlock" in record.message
