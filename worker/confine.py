"""What a freshly forked worker does to itself before it runs agent code."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct
from pathlib import Path

from corral.protocol import cgroupfs
from corral.protocol.procfs import become_subreaper, prctl
from corral.protocol.spawn import WorkerSettings, cpu_lifetime

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_PR_SET_CHILD_SUBREAPER = 36
_CLONE_PARENT = 0x8000


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Get `sig` when the parent dies; exit at once if it already has."""
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def no_new_privs() -> None:
    prctl(_PR_SET_NO_NEW_PRIVS, 1)


def set_cpu_hard_limit(seconds: float) -> None:
    """Let the kernel SIGKILL this process after `seconds` more CPU time, whatever it
    does: a hard limit can be lowered, never raised (without CAP_SYS_RESOURCE), and is
    inherited by everything the worker forks."""
    used = sum(os.times()[:2])
    hard = int(used + seconds) + 1
    soft, _ = resource.getrlimit(resource.RLIMIT_CPU)
    if soft == resource.RLIM_INFINITY or soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def set_cpu_backstop(seconds: float) -> None:
    """Let the kernel end this process (SIGXCPU) after `seconds` more CPU time.

    The supervisor's sampling is the primary CPU bound; this catches a worker the
    sampler cannot see in time. Only the soft limit moves (up to the hard limit set
    at the worker's start), so it can be raised again for the next turn.
    """
    used = sum(os.times()[:2])
    soft = int(used + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# classic BPF, as the kernel's seccomp filters take it (linux/filter.h, linux/seccomp.h)
_LD_ABS_W = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# offsets in struct seccomp_data: nr, arch, then args[6] of 64 bits (little-endian)
_NR, _ARCH, _ARG0_LO, _ARG1_LO, _ARG1_HI = 0, 4, 16, 24, 28
_X32_BIT = 0x40000000
_AUDIT_ARCH_X86_64 = 0xC000003E
# (AUDIT_ARCH_*, prctl, clone, clone3): the ABIs a process on these machines can use
_ARCHES = (
    (_AUDIT_ARCH_X86_64, 157, 56, 435),
    (0x40000003, 172, 120, 435),  # i386, on x86_64
    (0xC00000B7, 167, 220, 435),  # aarch64
    (0x40000028, 172, 120, 435),  # arm, on aarch64
)


def _escape_filter() -> bytes:
    """A seccomp program refusing the two ways a process can put a descendant outside
    the worker's tree: clearing the child-subreaper flag (EPERM), and clone with
    CLONE_PARENT (EPERM). clone3's flags are in memory a filter cannot read, so it
    answers ENOSYS and the C library falls back to clone, whose flags it can."""
    # a jump: instructions to skip, or one of the three returns at the end
    prog: list[tuple[int, int | str, int | str, int]] = []

    def op(code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        prog.append((code, jt, jf, k))

    for arch, prctl_nr, clone_nr, clone3_nr in _ARCHES:
        op(_LD_ABS_W, _ARCH)
        check = len(prog)
        op(_JEQ_K, arch)  # its jf, over this ABI's block to the next, is set below
        op(_LD_ABS_W, _NR)
        if arch == _AUDIT_ARCH_X86_64:
            op(_JGE_K, _X32_BIT, jt="enosys")  # the x32 ABI, with numbers of its own
        op(_JEQ_K, prctl_nr, jf=6)
        op(_LD_ABS_W, _ARG0_LO)
        op(_JEQ_K, _PR_SET_CHILD_SUBREAPER, jf="allow")
        op(_LD_ABS_W, _ARG1_LO)
        op(_JEQ_K, 0, jf="allow")
        op(_LD_ABS_W, _ARG1_HI)
        op(_JEQ_K, 0, jt="eperm", jf="allow")
        op(_JEQ_K, clone_nr, jf=2)
        op(_LD_ABS_W, _ARG0_LO)
        op(_JSET_K, _CLONE_PARENT, jt="eperm", jf="allow")
        op(_JEQ_K, clone3_nr, jt="enosys", jf="allow")
        prog[check] = (_JEQ_K, 0, len(prog) - check - 1, arch)
    op(_RET_K, _RET_ALLOW)  # another ABI (none on these machines), or any other call
    op(_RET_K, _RET_ERRNO | 1)  # EPERM
    op(_RET_K, _RET_ERRNO | 38)  # ENOSYS
    returns = {"allow": len(prog) - 3, "eperm": len(prog) - 2, "enosys": len(prog) - 1}
    code = bytearray()
    for i, (c, jt, jf, k) in enumerate(prog):
        to = [j if isinstance(j, int) else returns[j] - i - 1 for j in (jt, jf)]
        code += struct.pack("=HBBI", c, to[0], to[1], k)
    return bytes(code)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# Built once, at import (in the zygote): every worker installs the same program, and
# building it (a ctypes class, a dlopen, a few hundred small objects) in each worker
# would copy the pages it touches into each one.
_FILTER = ctypes.create_string_buffer(_escape_filter())
_FPROG = _SockFprog((len(_FILTER) - 1) // 8, ctypes.cast(_FILTER, ctypes.c_void_p))
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def forbid_escapes() -> None:
    """Install the seccomp filter of `_escape_filter` for this process and everything
    it forks (a filter cannot be removed; no_new_privs must be set first)."""
    if _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_FPROG), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")


def confine(settings: WorkerSettings, idle: bool = False) -> None:
    """Own cgroup, own process group, lower priority, no core files, no privilege gain,
    no way out of its own process tree, a CPU limit it cannot raise.

    The cgroup (when the supervisor has a delegated subtree) comes first, so that
    everything the worker forks, strays included, is in it and under its limits.
    `idle` starts the worker at SCHED_IDLE: its session broke a bound recently.

    A process group of its own keeps the terminal's Ctrl-C away from workers. Not a
    session of its own: with the kernel's autogroup scheduling (on by default on
    desktops and many servers) every session is a scheduling group with an equal
    share, so a setsid'd worker spinning at nice 10 would take as much CPU as the
    whole supervisor; in the supervisor's session, nice and SCHED_IDLE do their job.
    """
    if settings.cgroup_workers:
        limits = cgroupfs.Limits(
            memory_max=settings.memory_max, pids_max=settings.pids_max, cpu_max=settings.cpu_max
        )
        cgroupfs.join(cgroupfs.worker_cgroup(Path(settings.cgroup_workers), os.getpid()), limits)
    os.setpgid(0, 0)
    die_with_parent()
    become_subreaper()
    no_new_privs()
    try:
        forbid_escapes()
    except OSError:
        pass  # a kernel without seccomp filters: the zygote's sweep still kills escapees
    set_cpu_hard_limit(cpu_lifetime(settings.cpu_time_per_turn))
    os.nice(settings.nice)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # the zygote handles some of these itself; the worker starts from the defaults
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
