"""Agents used by the tests (importable by the zygote: tests run with the repo on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import json
import os


def pid_echo(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies "<worker pid> <text>"."""
    ctx.reply(f"{os.getpid()} {turn.text}")


def raiser(turn, ctx):  # type: ignore[no-untyped-def]
    """Raises on "boom", echoes anything else."""
    if turn.text == "boom":
        raise ValueError("boom requested")
    ctx.reply(turn.text)


async def async_echo(turn, ctx):  # type: ignore[no-untyped-def]
    """An async agent: two replies with an await between them."""
    ctx.reply(f"first {turn.text}")
    await asyncio.sleep(0.01)
    ctx.progress("halfway")
    ctx.reply(f"second {turn.text}")


def history(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies with the user texts seen so far in this session, then logs a line."""
    seen = [e.text for e in ctx.history() if e.role == "user"]
    ctx.log.info("history has %d user lines", len(seen))
    ctx.reply("|".join([*seen, turn.text]))


def chatty_thread(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies, and leaves a thread behind that, once the turn is over, logs 1 KiB
    lines forever."""
    import threading
    import time

    def chatter() -> None:
        time.sleep(0.5)
        while True:  # ends with the worker
            ctx.log.info("x" * 1024)

    threading.Thread(target=chatter, daemon=True).start()
    ctx.reply("started")


def log_text(turn, ctx):  # type: ignore[no-untyped-def]
    """Logs the message's text as it is (newlines and all), then echoes it."""
    ctx.log.warning("the user said: %s", turn.text)
    ctx.reply("logged")


def hostile(turn, ctx):  # type: ignore[no-untyped-def]
    """An agent that attacks what is not its own; one reply line per `;`-separated command:
    "ok ..." if it worked, "denied <ErrorType>" if it failed with a permission error,
    "failed <ErrorType>: ..." for any other error.

    read PATH · list PATH · write PATH · signal PID SIG · pidfd-signal PID SIG ·
    environ PID · control SOCKET (GET /v1/status) · abstract NAME (connect to an abstract
    unix socket) · child-control SOCKET (the same from a child process) ·
    own (write, read and list its state_dir and $TMPDIR, read history) ·
    undumpable (PR_SET_DUMPABLE 0) · tcp PORT (connect to 127.0.0.1:PORT) · child-tcp PORT ·
    mptcp PORT · tfo PORT (the same through MPTCP, TCP Fast Open) ·
    post PORT SESSION (POST a message as SESSION to the HTTP channel on 127.0.0.1:PORT:
    "status CODE BODY") · child-post PORT SESSION · post-close PORT SESSION (send the
    POST and close at once, before corral can look at the connection) ·
    cli ARGS... (runs `corral ARGS` from inside)
    """
    import signal as signals
    import socket
    import subprocess
    import sys
    import tempfile

    def attempt(command: str) -> str:
        verb, _, arg = command.strip().partition(" ")
        try:
            if verb == "read":
                with open(arg, "rb") as f:
                    return f"ok read {len(f.read())} bytes"
            if verb == "list":
                return f"ok {len(os.listdir(arg))} entries"
            if verb == "write":
                with open(arg, "a") as f:
                    f.write("pwned\n")
                return "ok wrote"
            if verb == "signal":
                pid, sig = arg.split()
                os.kill(int(pid), getattr(signals, sig))
                return "ok signalled"
            if verb == "pidfd-signal":
                pid, sig = arg.split()
                fd = os.pidfd_open(int(pid))
                try:
                    signals.pidfd_send_signal(fd, getattr(signals, sig))
                finally:
                    os.close(fd)
                return "ok signalled"
            if verb == "environ":
                with open(f"/proc/{arg}/environ", "rb") as f:
                    return f"ok read {len(f.read())} bytes"
            if verb == "control":
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(arg)
                    s.sendall(
                        b"GET /v1/status HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n"
                    )
                    answer = b""
                    while chunk := s.recv(65536):
                        answer += chunk
                status = answer.split(b"\r\n", 1)[0].decode()
                if " 403 " in status:
                    raise PermissionError(status)
                return f"ok {status}"
            if verb == "child-control":  # the same, from a process the agent started
                code = (
                    "import socket,sys\n"
                    "s=socket.socket(socket.AF_UNIX);s.settimeout(5);s.connect(sys.argv[1])\n"
                    "s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: c\\r\\n'\n"
                    "  b'Connection: close\\r\\n\\r\\n')\n"
                    "print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
                )
                done = subprocess.run(
                    [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=30
                )
                status = done.stdout.strip() or done.stderr.strip()[-200:]
                if " 403 " in status:
                    raise PermissionError(status)
                return f"ok {status}"
            if verb == "undumpable":  # hide from a supervisor's /proc (ProtectProc=invisible)
                import ctypes

                ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
                return "ok undumpable"
            if verb == "tcp":  # tcp PORT: connect to 127.0.0.1:PORT
                with socket.create_connection(("127.0.0.1", int(arg)), timeout=5):
                    return "ok connected"
            if verb == "mptcp":  # an MPTCP socket, which Landlock's TCP rules do not see
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as s:
                    s.settimeout(5)
                    s.connect(("127.0.0.1", int(arg)))
                    return "ok connected"
            if verb == "tfo":  # TCP Fast Open: a connection made by sendto(), not connect()
                import select

                with socket.socket() as s:
                    s.setblocking(False)
                    try:
                        s.sendto(b"GET / HTTP/1.0\r\n\r\n", 0x20000000, ("127.0.0.1", int(arg)))
                    except BlockingIOError:  # the handshake is under way
                        select.select([], [s], [], 5)
                    if err := s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError(err, os.strerror(err))
                    s.getpeername()  # OSError ENOTCONN if it never connected
                    return "ok connected"
            if verb == "child-tcp":  # the same, from a process the agent started
                code = (
                    "import socket,sys;socket.create_connection(('127.0.0.1',int(sys.argv[1])),5)"
                )
                done = subprocess.run(
                    [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=30
                )
                if "PermissionError" in done.stderr:
                    raise PermissionError(done.stderr.strip().splitlines()[-1])
                return (
                    "ok connected"
                    if done.returncode == 0
                    else "failed " + done.stderr[-100:].replace("\n", " ")
                )
            if verb == "post":
                port, session = arg.split()
                scope: dict[str, object] = {"ARGS": [port, session]}
                exec(POST_SCRIPT, scope)
                return str(scope["result"])
            if verb == "child-post":
                code = "import sys; ARGS = sys.argv[1:]\n" + POST_SCRIPT + "\nprint(result)"
                done = subprocess.run(
                    [sys.executable, "-c", code, *arg.split()],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                return done.stdout.strip() or "failed " + done.stderr[-200:].replace("\n", " ")
            if verb == "post-close":
                port, session = arg.split()
                body = json.dumps({"session": session, "text": "sent and gone"}).encode()
                with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
                    s.sendall(
                        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                return "ok sent"
            if verb == "abstract":
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect("\0" + arg)
                return "ok connected"
            if verb == "own":
                mine = ctx.state_dir / "mine.txt"
                mine.write_text(turn.text)
                tmp = tempfile.mkstemp()[1]
                with open(tmp, "w") as f:
                    f.write("scratch")
                with open(tmp) as f:
                    assert f.read() == "scratch"
                seen = len(ctx.history())
                return f"ok {mine.read_text() == turn.text} {tmp} history {seen}"
            if verb == "cli":
                done = subprocess.run(
                    [sys.executable, "-m", "corral.cli.main", *arg.split()],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if done.returncode != 0:
                    return f"denied cli exit {done.returncode}: {done.stderr.strip()[-200:]}"
                return f"ok {done.stdout.strip()[:200]}"
            return f"unknown {verb}"
        except PermissionError as e:
            return f"denied {type(e).__name__}: {e}"
        except Exception as e:
            return f"failed {type(e).__name__}: {e}"

    ctx.reply("\n".join(attempt(c) for c in turn.text.split(";")))


# ---- hostile process trees (tests/test_trees.py)


def _sleep_forever() -> None:
    import time

    while True:  # ends when the process is killed
        time.sleep(3600)


def _report(fd: int) -> None:
    os.write(fd, f"{os.getpid()}\n".encode())


def _read_pids(fd: int, n: int) -> list[int]:
    data = b""
    while data.count(b"\n") < n:  # ends when all n have written their pid
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return [int(p) for p in data.split()]


def _chain(depth: int, ignore_term: bool) -> list[int]:
    """worker -> a -> b -> ...: each process the parent of the next, none exits; their
    pids, top first."""
    import signal

    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        for level in range(depth):
            if ignore_term:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _report(w)
            if level == depth - 1 or os.fork() != 0:
                os.close(w)
                _sleep_forever()
    os.close(w)
    pids = _read_pids(r, depth)
    os.close(r)
    return pids


def _escape(mib: int) -> tuple[str, int]:
    """Clear our subreaper flag and double-fork a grandchild holding `mib` MiB: whether
    the flag could be cleared, and the grandchild's pid."""
    import ctypes
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    cleared = libc.prctl(36, 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER, 0
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        if os.fork() == 0:
            os.setsid()
            _report(w)
            time.sleep(0.5)  # the worker replies first
            block = bytearray(mib * 1024 * 1024)
            block[::4096] = b"\x01" * len(range(0, len(block), 4096))
            _sleep_forever()
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    pid = _read_pids(r, 1)[0]
    os.close(r)
    return ("cleared" if cleared else "refused"), pid


def _clone_parent() -> tuple[str, int]:
    """A raw clone(CLONE_PARENT): the child would be the zygote's, not ours."""
    import ctypes
    import platform
    import signal

    nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r, w = os.pipe()
    pid = libc.syscall(nr, 0x8000 | signal.SIGCHLD, 0, 0, 0, 0)  # CLONE_PARENT
    if pid == 0:
        os.close(r)
        _report(w)
        _sleep_forever()
    os.close(w)
    if pid < 0:
        os.close(r)
        return "refused", 0
    got = _read_pids(r, 1)
    os.close(r)
    return "cloned", got[0]


def _spin_child() -> int:
    child = os.fork()
    if child == 0:
        x = 0
        while True:  # ends when the process is killed
            x += 1
    return child


def _threads(n: int) -> None:
    import threading

    for _ in range(n):
        threading.Thread(target=_sleep_forever, daemon=True).start()


def _forks(n: int) -> list[int]:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            _sleep_forever()
        pids.append(pid)
    return pids


def _bomb(depth: int) -> None:
    """A bounded fork bomb that ignores SIGTERM: each process forks two children
    (which do the same, `depth` levels down), then sleeps; 2**(depth+1) - 2 processes."""
    import signal

    if os.fork() != 0:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for level in range(depth):
        if os.fork() != 0 and os.fork() != 0:  # both children go on down, the parent sleeps
            break
        if level == depth - 1:
            break
    _sleep_forever()


_held: list[bytearray] = []


def tree(turn, ctx):  # type: ignore[no-untyped-def]
    """Runs `;`-separated commands that shape the worker's process tree:
    `chain N`, `chain-ignoring N`, `escape MIB`, `clone-parent`, `spin-child`,
    `threads N`, `forks N`, `bomb DEPTH`, `balloon MIB`, `rlimit`, `ignore-term`, `crash`, `hang`.
    Each replies with what it did (pids included); plain text is echoed."""
    import resource
    import signal

    for command in filter(None, (c.strip() for c in turn.text.split(";"))):
        word, _, arg = command.partition(" ")
        match word:
            case "chain" | "chain-ignoring":
                pids = _chain(int(arg), ignore_term=word == "chain-ignoring")
                ctx.reply("pids " + " ".join(map(str, pids)))
            case "escape":
                how, pid = _escape(int(arg))
                ctx.reply(f"{how} {pid}")
            case "clone-parent":
                how, pid = _clone_parent()
                ctx.reply(f"{how} {pid}")
            case "spin-child":
                ctx.reply(f"pids {_spin_child()}")
            case "threads":
                _threads(int(arg))
                ctx.reply(f"threads {arg}")
            case "bomb":
                _bomb(int(arg))
                ctx.reply(f"bomb {arg}")
            case "forks":
                ctx.reply("pids " + " ".join(map(str, _forks(int(arg)))))
            case "balloon":
                block = bytearray(int(arg) * 1024 * 1024)
                block[::4096] = b"\x01" * len(range(0, len(block), 4096))
                _held.append(block)
                ctx.reply(f"balloon {arg}")
            case "rlimit":
                _, hard = resource.getrlimit(resource.RLIMIT_CPU)
                try:
                    resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))
                    raised = "raised"
                except (ValueError, OSError):
                    raised = "refused"
                ctx.reply(f"hard {hard} {raised}")
            case "ignore-term":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            case "crash":
                os._exit(3)
            case "hang":
                _sleep_forever()
            case _:
                ctx.reply(command)


def markup(turn, ctx):  # type: ignore[no-untyped-def]
    """`MODE TEXT`: replies TEXT with ctx.reply(TEXT, markup=MODE); MODE "plain": no markup."""
    mode, _, text = turn.text.partition(" ")
    ctx.reply(text, markup="" if mode == "plain" else mode)


# POSTs a message as ARGS[1] to the HTTP channel on 127.0.0.1:ARGS[0]; sets `result`
POST_SCRIPT = """
import http.client, json
_c = http.client.HTTPConnection("127.0.0.1", int(ARGS[0]), timeout=10)
_c.request("POST", "/v1/messages", json.dumps({"session": ARGS[1], "text": "as you"}),
           {"Content-Type": "application/json"})
_r = _c.getresponse()
result = f"status {_r.status} {_r.read().decode()[:200]}"
"""
