"""Landlock, the kernel's unprivileged sandbox: three system calls and their structs, by ctypes.

A process builds a ruleset (the kinds of access it wants the kernel to police), adds
rules (what stays allowed: paths beneath a directory, TCP ports), and restricts itself.
From then on it and everything it forks are held to the rules; a process cannot undo
it. See the kernel's Documentation/userspace-api/landlock.rst.

The ABI version says what the running kernel can police; what it cannot, it lets
through. `Ruleset(abi)` handles everything that ABI knows, so an older kernel gives a
weaker, never a failing, sandbox; `features(abi)` names what is enforced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

# The syscall numbers are the same on every architecture with the unified table
# (x86_64, aarch64, riscv64, ...), from Linux 5.13.
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446

CREATE_RULESET_VERSION = 1 << 0

# access rights to files (LANDLOCK_ACCESS_FS_*), with the ABI that introduced them
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2: link and rename across directories
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5: ioctl on device files

# rights that make sense on a file (the rest only on a directory)
FS_FILE = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2


def fs_rights(abi: int) -> int:
    """Every file access right the kernel of this ABI can police."""
    if abi < 1:
        return 0
    rights = (FS_MAKE_SYM << 1) - 1  # ABI 1: bits 0..12
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def features(abi: int, tcp: bool, corral_ports: bool = False) -> tuple[list[str], list[str]]:
    """(enforced, not enforced) for a sandbox on a kernel of this ABI.

    `tcp`: whether TCP connections are to be restricted to some ports at all;
    `corral_ports`: whether connecting to corral's own ports (the HTTP channel, metrics)
    is to be refused.
    """
    wanted = [
        ("filesystem", 1),
        ("refer", 2),
        ("truncate", 3),
        ("ioctl", 5),
        ("signals", 6),
        ("abstract_unix_sockets", 6),
    ]
    if tcp:
        wanted.append(("tcp_connect", 4))
    if corral_ports:
        wanted.append(("corral_ports", 4))
    enforced = [name for name, since in wanted if abi >= since]
    missing = [name for name, since in wanted if abi < since]
    return enforced, missing


def for_file(fd: int, access: int) -> int:
    """`access` as the kernel takes it for what `fd` is: a file gets only file rights."""
    return access if stat.S_ISDIR(os.fstat(fd).st_mode) else access & FS_FILE


class LandlockError(OSError):
    pass


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def libc() -> ctypes.CDLL:
    """The C library, loaded once (prctl, capget, capset)."""
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"{what}: {os.strerror(err)}")
    return result


_UNAVAILABLE = {
    errno.ENOSYS: "the kernel has no Landlock",
    errno.EOPNOTSUPP: "Landlock is built into the kernel but not enabled at boot (lsm=)",
    errno.EPERM: "a seccomp filter refuses the landlock calls (systemd SystemCallFilter=, "
    "a container's filter)",
}
unavailable = ""  # why abi() found none, for the log and `corral status`


def abi() -> int:
    """The running kernel's Landlock ABI version; 0 where it has none (or it is off)."""
    global unavailable
    if platform.system() != "Linux":
        unavailable = "not Linux"
        return 0
    version = _syscall(
        _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    if version < 0:
        # ENOSYS: a kernel without it (or a seccomp filter that refuses it);
        # EOPNOTSUPP: built in, but not enabled at boot (lsm=)
        err = ctypes.get_errno()
        if err in _UNAVAILABLE:
            unavailable = _UNAVAILABLE[err]
            return 0
        raise LandlockError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    return int(version)


class Ruleset:
    """One ruleset: add what stays allowed, then `restrict()` the calling process."""

    def __init__(
        self, abi: int, restrict_tcp: bool = False, scope: bool = True, files: bool = True
    ) -> None:
        """`files`: police file access (False: a layer of TCP rules only, ABI >= 4)."""
        if abi < 1:
            raise LandlockError(errno.ENOSYS, "the kernel has no Landlock")
        self.abi = abi
        self.fs = fs_rights(abi) if files else 0
        self.net = NET_CONNECT_TCP if restrict_tcp and abi >= 4 else 0
        self.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope and abi >= 6 else 0
        attr = _RulesetAttr(self.fs, self.net, self.scoped)
        # an older kernel refuses a struct larger than it knows (E2BIG): pass what it knows
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        self.fd = _check(
            _syscall(
                _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
            ),
            "landlock_create_ruleset",
        )

    def allow_path(self, path: str, access: int) -> bool:
        """Allow `access` beneath `path` (a directory) or on it (a file); False if missing."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False
        try:
            self.allow_fd(fd, for_file(fd, access))
        finally:
            os.close(fd)
        return True

    def allow_fd(self, fd: int, access: int) -> None:
        """Allow `access` beneath the directory (or on the file) open as `fd` (O_PATH)."""
        rule = _PathBeneathAttr(access & self.fs, fd)
        _check(
            _syscall(
                _SYS_ADD_RULE,
                self.fd,
                ctypes.c_uint32(_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule fd {fd}",
        )

    def allow_connect(self, port: int) -> None:
        if not self.net:
            return
        rule = _NetPortAttr(NET_CONNECT_TCP, port)
        _check(
            _syscall(
                _SYS_ADD_RULE,
                self.fd,
                ctypes.c_uint32(_RULE_NET_PORT),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule port {port}",
        )

    def allow_connect_except(self, denied: set[int]) -> int:
        """Allow connecting to every TCP port but `denied`; how many rules that took.

        One rule per port (the kernel has no ranges): ~65,000 calls, in a tight loop."""
        if not self.net:
            return 0
        rule = _NetPortAttr(NET_CONNECT_TCP, 0)
        ref, fd, kind, flags = ctypes.byref(rule), self.fd, ctypes.c_uint32(_RULE_NET_PORT), 0
        syscall, add = _syscall, _SYS_ADD_RULE
        count = 0
        for port in range(1, 65536):
            if port in denied:
                continue
            rule.port = port
            if syscall(add, fd, kind, ref, flags) < 0:
                _check(-1, f"landlock_add_rule port {port}")
            count += 1
        return count

    def restrict(self) -> None:
        """Hold the calling thread, and every thread and process it starts, to the rules.

        Only the calling thread: call it while the process has no other. Needs
        no_new_privs (the worker sets it in confine()). Closes the ruleset.
        """
        try:
            _check(
                _syscall(_SYS_RESTRICT_SELF, self.fd, ctypes.c_uint32(0)), "landlock_restrict_self"
            )
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
