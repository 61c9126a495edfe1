"""What a worker may touch once it has restricted itself: corral's sandbox policy.

The zygote computes a `Plan` once, after it has imported the agent: the system's
read-only parts, the Python environment, the directories of every module loaded, the
operator's extra paths, with corral's own files carved out. Each worker then adds its
session's directories and restricts itself (`enter`), before any agent code runs:

    read-only   /usr /lib* /bin /sbin /proc /sys, selected /etc (certificates, resolv.conf,
                nsswitch, passwd, ...), the interpreter, the stdlib, site-packages, the
                agent's package, [sandbox] read_only
    read-write  the session's state_dir, a private temporary directory, /dev/null & co,
                [sandbox] read_write
    nothing     corral's state_dir (store, transcripts, other sessions, control socket),
                the control socket's directory, the config file, everything else

The transcript is written and read through the file descriptor the worker opened
before the restriction. Reading another process's /proc/PID/{environ,fd,mem} is a
ptrace access, which Landlock denies outside the worker's own tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import site
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from corral.protocol.spawn import SandboxLevel, SandboxSettings
from corral.worker import landlock, seccomp
from corral.worker.confine import no_new_privs

SYSTEM_READ_ONLY = ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/proc", "/sys"]
# of /etc, what programs read to run, resolve names and speak TLS; not the rest, which
# holds other services' configuration (and corral's own, /etc/corral)
ETC_READ_ONLY = [
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",
    "gai.conf",
    "group",
    "host.conf",
    "hostname",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.conf",
    "localtime",
    "mailcap",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "pki",
    "protocols",
    "python3*",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
]
DEVICES_READ_WRITE = ["/dev/null", "/dev/zero", "/dev/full"]
DEVICES_READ_ONLY = ["/dev/random", "/dev/urandom"]

READ_ONLY = landlock.FS_READ
DEVICE = landlock.FS_READ_FILE | landlock.FS_WRITE_FILE | landlock.FS_IOCTL_DEV
READ_WRITE = -1  # every right the kernel polices (masked to the ruleset's)


@dataclass
class Plan:
    """What every worker of this zygote may touch; computed once, before the first fork."""

    abi: int  # 0: no restriction is possible (or the sandbox is off)
    settings: SandboxSettings
    rules: list[tuple[str, int]] = field(default_factory=list)  # (path, access)
    # the rules' paths opened (O_PATH) once in the zygote: (fd, access), so a worker
    # spends no time on path lookups
    opened: list[tuple[int, int]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # allowed TCP connect ports, if restricted
    tmp_root: str = ""  # private temporary directories: tmp_root/<worker pid>; "": none
    # corral's own TCP ports, closed to the zygote and so to every worker (close_ports)
    closed_ports: list[int] = field(default_factory=list)
    closed_in: float = 0.0  # seconds the zygote spent building and entering that layer
    # the seccomp filter that closes the ways around Landlock's TCP rules (seccomp.py)
    tcp_filter: bool = False

    def level(self) -> SandboxLevel:
        """What is in force, for `corral status`, the metric and the log line."""
        tcp = bool(self.settings.allow_connect_ports)
        ports = bool(self.settings.deny_connect_ports) and not tcp
        if not self.settings.enabled:
            _, missing = landlock.features(0, tcp, ports)
            return SandboxLevel(enabled=False, abi=0, enforced=[], missing=missing)
        enforced, missing = landlock.features(self.abi, tcp, ports)
        if (tcp or ports) and self.abi >= 4:
            (enforced if self.tcp_filter else missing).append("tcp_bypass_filter")
        why = landlock.unavailable if self.abi == 0 else ""
        return SandboxLevel(enabled=True, abi=self.abi, enforced=enforced, missing=missing, why=why)

    def tmp_dir(self, pid: int) -> str:
        return os.path.join(self.tmp_root, str(pid)) if self.tmp_root else ""


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _python_paths() -> list[str]:
    """The interpreter, its stdlib and site-packages, and where every loaded module lives."""
    paths = [sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        if p := sysconfig.get_paths().get(name):
            paths.append(p)
    # where imports come from, PYTHONPATH included (an agent imports its tools when it
    # first needs them); not the working directory `python -m` puts first, which may
    # be anything
    entries = list(sys.path)
    if entries and entries[0] in ("", os.getcwd()):
        entries = entries[1:]
    paths += [p for p in entries if p and os.path.isabs(p)]
    paths += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    for name, module in list(sys.modules.items()):
        for entry in list(getattr(module, "__path__", None) or []):
            if os.path.isabs(entry):
                paths.append(entry)  # a package: its directory
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.isabs(file):
            # a module of a package: its package's directory; a top-level module: the
            # file only (its directory may be a working directory with anything in it)
            paths.append(os.path.dirname(file) if "." in name else file)
    return paths


def _system_paths() -> list[str]:
    paths = list(SYSTEM_READ_ONLY)
    for pattern in ETC_READ_ONLY:
        paths += glob.glob(os.path.join("/etc", pattern))
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if value := os.environ.get(var):
            paths.append(value)
    return paths


def _carve(paths: Iterable[str], hidden: list[str]) -> list[str]:
    """`paths` (real, existing), without anything in `hidden`: a directory that holds a
    hidden path is replaced by its entries, except the one on the way to it."""
    out: list[str] = []
    for path in paths:
        if any(_within(path, h) for h in hidden):
            continue
        inside = [h for h in hidden if _within(h, path)]
        if not inside or not os.path.isdir(path):
            out.append(path)
            continue
        try:
            entries = [os.path.join(path, e) for e in sorted(os.listdir(path))]
        except OSError:
            continue
        out += _carve(entries, inside)
    return out


def _collapse(paths: Iterable[str]) -> list[str]:
    """Existing real paths, each once, none beneath another in the list.

    Real: a resolv.conf or certificate store that is a symlink elsewhere
    (/run/systemd/resolve/...) is checked by the kernel at its target, so the target
    is what is allowed."""
    real = sorted({_real(p) for p in paths if p and os.path.lexists(p)})
    out: list[str] = []
    for p in real:
        if not os.path.exists(p):
            continue
        if out and _within(p, out[-1]):
            continue
        out.append(p)
    return out


def plan(settings: SandboxSettings, tmp_root: str) -> Plan:
    """The rules for every worker; call after the agent is imported (its modules count).

    `tmp_root` (`<state_dir>/tmp/<zygote pid>`, which workers cannot reach) holds this
    zygote's workers' private temporary directories. Zygotes live side by side for a
    while (a reload starts the new one before the old one's workers are gone), so each
    has its own; what a zygote that is no more left behind is removed first.
    """
    abi = landlock.abi() if settings.enabled else 0
    if abi < 1:
        return Plan(abi=0, settings=settings)
    _remove_stale(os.path.dirname(tmp_root))
    os.makedirs(tmp_root, mode=0o700)
    # the private temporary directories of all workers (of every zygote) are no one else's
    hidden = [_real(h) for h in [*settings.hidden, os.path.dirname(tmp_root)] if h]
    read_only = _carve(_collapse([*_system_paths(), *_python_paths(), *settings.read_only]), hidden)
    read_write = _carve(_collapse(settings.read_write), hidden)
    rules = [(p, READ_ONLY) for p in read_only]
    rules += [(p, DEVICE) for p in DEVICES_READ_WRITE]
    rules += [(p, landlock.FS_READ_FILE) for p in DEVICES_READ_ONLY]
    rules += [(p, READ_WRITE) for p in read_write]
    opened = []
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # gone (or never there, like /lib32 on most systems)
        opened.append((fd, landlock.for_file(fd, access)))
    if os.geteuid() == 0:
        limit_root()
    closed: list[int] = []
    took = 0.0
    if settings.deny_connect_ports and not settings.allow_connect_ports and abi >= 4:
        closed = sorted(set(settings.deny_connect_ports))
        took = close_ports(abi, closed)
    tcp_filter = False
    if (closed or settings.allow_connect_ports) and abi >= 4 and seccomp.supported():
        no_new_privs()
        seccomp.install()  # MPTCP, TCP Fast Open and io_uring go around the TCP rules
        tcp_filter = True
    return Plan(
        abi=abi,
        settings=settings,
        rules=rules,
        opened=opened,
        ports=sorted(set(settings.allow_connect_ports)),
        tmp_root=tmp_root,
        closed_ports=closed,
        closed_in=took,
        tcp_filter=tcp_filter,
    )


def close_ports(abi: int, ports: list[int]) -> float:
    """Restrict the calling process (the zygote) to TCP connects to any port but `ports`;
    the seconds it took.

    A layer of network rules only: the zygote keeps its files, and it never connects
    over TCP. Every worker forked after inherits the layer beneath its own. Landlock has
    no port ranges, so this is one rule per allowed port (65,000-odd), and every layer
    stacked on it (each worker's) copies them: that copy is the per-spawn cost
    (bench/sandbox.py). Call single-threaded, before the first fork.
    """
    started = time.perf_counter()
    no_new_privs()  # landlock_restrict_self needs it (or CAP_SYS_ADMIN); fork keeps it
    ruleset = landlock.Ruleset(abi, restrict_tcp=True, scope=False, files=False)
    try:
        ruleset.allow_connect_except(set(ports))
    except BaseException:
        ruleset.close()
        raise
    ruleset.restrict()
    return time.perf_counter() - started


def enter(plan: Plan, own: list[Path]) -> None:
    """Restrict this process (and all it will start) to the plan plus `own` (read-write).

    Call in the worker, single-threaded, after everything it needs by path is open.
    """
    if not plan.settings.enabled:
        return
    drop_capabilities()
    if plan.abi < 1:
        return
    tmp = plan.tmp_dir(os.getpid())
    if tmp:
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:  # left by an earlier process with this PID
            _remove(tmp)
            os.mkdir(tmp, 0o700)
        # the agent's temporary files go here, where no other session can see them
        for var in ("TMPDIR", "TMP", "TEMP"):
            os.environ[var] = tmp
        tempfile.tempdir = tmp
    ruleset = landlock.Ruleset(plan.abi, restrict_tcp=bool(plan.ports))
    try:
        for fd, access in plan.opened:
            ruleset.allow_fd(fd, access)
        for own_dir in [*map(str, own), *([tmp] if tmp else [])]:
            ruleset.allow_path(own_dir, READ_WRITE)
        for port in plan.ports:
            ruleset.allow_connect(port)
    except BaseException:
        ruleset.close()
        raise
    ruleset.restrict()
    for fd, _ in plan.opened:
        os.close(fd)
    plan.opened = []
    if own:
        # the supervisor's working directory is closed to it now; its own is not
        os.chdir(own[0])


_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def limit_root() -> None:
    """In a zygote run as root: nothing it forks regains capabilities by execve.

    The zygote keeps its own (it may need them for cgroups); its workers drop theirs
    (drop_capabilities) and, with this, an agent's exec of any program as uid 0 gives
    none back. Bounding set and securebits are inherited across fork: done once here.
    """
    libc = landlock.libc()
    libc.prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)


def drop_capabilities() -> None:
    """A worker of a corral run as root gives up every capability, for good.

    Landlock lets a process with CAP_SYS_PTRACE read other processes' /proc/PID/environ
    and maps (the supervisor's secrets), and CAP_DAC_OVERRIDE and friends are no
    business of an agent's. Without capabilities root is a plain uid to the kernel.
    """
    libc = landlock.libc()
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) == 0 and not any(
        d.effective | d.permitted | d.inheritable for d in data
    ):
        return  # the usual case: a service user has none
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def forget(plan: Plan | None, pid: int) -> None:
    """A worker is gone: remove its private temporary directory (in the zygote)."""
    if plan is not None and (tmp := plan.tmp_dir(pid)):
        _remove(tmp)


def remove_all(plan: Plan | None) -> None:
    if plan is not None and plan.tmp_root:
        _remove(plan.tmp_root)
        with contextlib.suppress(OSError):  # the last zygote out removes the parent too
            os.rmdir(os.path.dirname(plan.tmp_root))


def _remove_stale(parent: str) -> None:
    """Remove what zygotes that are gone left in `parent` (one directory per zygote pid)."""
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        if not name.isdigit() or not os.path.exists(f"/proc/{name}"):
            _remove(os.path.join(parent, name))


def _remove(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
