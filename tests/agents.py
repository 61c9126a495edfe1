"""Agents used by the tests (importable by the zygote: tests run with the repo on PYTHONPATH)."""

from __future__ import annotations

import asyncio
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
