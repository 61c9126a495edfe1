"""The ways around Landlock's TCP rules, closed with a small seccomp filter.

Landlock (up to ABI 7, Linux 6.18 here) polices connect() on TCP sockets only, and only
through the connect() hook. Found by trying, from a process restricted to every port
but one (tests/test_sandbox.py):

- an MPTCP socket (socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)) connects to the
  closed port: it is not a TCP socket to Landlock, and falls back to plain TCP with
  a server that does not speak MPTCP;
- TCP Fast Open, sendto(..., MSG_FASTOPEN, address), connects without connect();
- an AF_SMC socket falls back to TCP through a kernel socket of its own (not tried
  here: this kernel has no SMC; closed anyway);
- io_uring can do the first two without those system calls (IORING_OP_SOCKET, SEND with
  MSG_FASTOPEN), where no seccomp filter can look.

The filter refuses those (EPROTONOSUPPORT, EOPNOTSUPP, EAFNOSUPPORT: what a kernel
without MPTCP, with TFO off or without SMC answers, so programs fall back to plain
TCP), io_uring_setup (ENOSYS, as on a kernel built without it) and system calls of
another ABI (x32, i386 through int 0x80, AArch32), whose numbers the filter does not
know. The zygote installs it once, before its first fork; every worker inherits it,
and nothing can remove it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Any

from corral.worker.landlock import libc

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

IPPROTO_MPTCP = 262
AF_SMC = 43
MSG_FASTOPEN = 0x20000000
_X32_BIT = 0x40000000

# (audit arch, socket, sendto, sendmsg, sendmmsg); io_uring_setup is 425 on both
_ARCHES = {
    "x86_64": (0xC000003E, 41, 44, 46, 307),
    "aarch64": (0xC00000B7, 198, 206, 211, 269),
}
_IO_URING_SETUP = 425


def supported() -> bool:
    return platform.machine() in _ARCHES


def _arg(i: int) -> int:
    """Offset of the low 32 bits of argument i in struct seccomp_data (little endian)."""
    return 16 + 8 * i


def program() -> list[tuple[int, int, int, int]]:
    """The filter, as (code, jt, jf, k); jumps are resolved from labels here."""
    arch, sys_socket, sys_sendto, sys_sendmsg, sys_sendmmsg = _ARCHES[platform.machine()]
    # a small assembler: ("label", name) marks a place; jumps name their targets
    code: list[tuple[Any, ...]] = [
        (_LD_ABS, 4),  # arch
        (_JEQ, arch, None, "foreign"),
        (_LD_ABS, 0),  # nr
        (_JGE, _X32_BIT, "foreign", None),
        (_JEQ, sys_socket, "socket", None),
        (_JEQ, sys_sendto, "flags3", None),
        (_JEQ, sys_sendmsg, "flags2", None),
        (_JEQ, sys_sendmmsg, "flags3", None),
        (_JEQ, _IO_URING_SETUP, "nosys", None),
        (_RET, _RET_ALLOW),
        ("label", "socket"),
        (_LD_ABS, _arg(0)),
        (_JEQ, AF_SMC, "nofamily", None),
        (_LD_ABS, _arg(2)),
        (_JEQ, IPPROTO_MPTCP, "noproto", None),
        (_RET, _RET_ALLOW),
        ("label", "nofamily"),
        (_RET, _RET_ERRNO | errno.EAFNOSUPPORT),
        ("label", "flags2"),
        (_LD_ABS, _arg(2)),
        (_JSET, MSG_FASTOPEN, "notsupp", None),
        (_RET, _RET_ALLOW),
        ("label", "flags3"),
        (_LD_ABS, _arg(3)),
        (_JSET, MSG_FASTOPEN, "notsupp", None),
        (_RET, _RET_ALLOW),
        ("label", "noproto"),
        (_RET, _RET_ERRNO | errno.EPROTONOSUPPORT),
        ("label", "notsupp"),
        (_RET, _RET_ERRNO | errno.EOPNOTSUPP),
        ("label", "foreign"),
        ("label", "nosys"),
        (_RET, _RET_ERRNO | errno.ENOSYS),
    ]
    labels: dict[str, int] = {}
    index = 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = index
        else:
            index += 1
    out: list[tuple[int, int, int, int]] = []
    for item in code:
        if item[0] == "label":
            continue
        here = len(out)
        if item[0] in (_JEQ, _JGE, _JSET):
            op, k, jt, jf = item

            def rel(target: str | None, here: int = here) -> int:
                return 0 if target is None else labels[target] - here - 1

            out.append((op, rel(jt), rel(jf), k))
        else:
            op, k = item
            out.append((op, 0, 0, k))
    return out


class _Filter(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install the filter on the calling thread (the zygote: single-threaded, before it
    forks). Needs no_new_privs."""
    insns = program()
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    prog = _Filter(len(insns), ctypes.cast(buf, ctypes.c_void_p))
    if libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")
