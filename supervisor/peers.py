"""Who is on the other end of a loopback TCP connection: a process corral started?

The HTTP channel without a token listens on loopback only and trusts "this machine";
agents run on it too. Instead of a Landlock layer of port rules (which every spawn
copies: ~14 ms and ~4 MB of kernel memory per worker), the channel asks, once per
connection, whether the socket at the other end is held by a process below the
supervisor (a zygote, a worker, anything an agent forks, strays re-parented to us):

1. the peer socket's inode and owner uid, by its exact address pair: one
   NETLINK_SOCK_DIAG request (no dump: the kernel looks the socket up in its hash),
   or /proc/net/tcp{,6} where sock_diag is not available;
2. which process holds `socket:[INODE]`: /proc/PID/fd of our descendants only
   (workers are child subreapers, so their trees stay below them), not the machine.

A socket of another uid is nobody's we started (everything we start keeps our uid);
a socket the kernel no longer knows is allowed (nothing of ours holds it); an
orphaned one (closed by its process, inode 0, its request possibly in our buffer) is
refused: its sender cannot read an answer anyway, and an agent could connect, send
and close before the check runs. Blocking calls: run them on the proc thread.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import NamedTuple

from corral.protocol.procfs import descendants

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid:
# sport, dport (big-endian), src[4], dst[4] (big-endian words), if, cookie[2]
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode
_MSG_UID_INODE = struct.Struct("=II")
_MSG_UID_AT = 4 + 48 + 12
MAX_TREE = 100_000  # processes below us walked at most (a fork bomb cannot stall the check)

REFUSED = "agents cannot use corral's HTTP channel"


class PeerSocket(NamedTuple):
    inode: int  # 0: orphaned (its process closed it)
    uid: int


Address = tuple[str, int]


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener: the peer socket is AF_INET
    return ip


def find_socket(ours: Address, peer: Address) -> PeerSocket | None:
    """The TCP socket at `peer` connected to `ours` (seen from our side: our local
    address and our peer's); None if this host has no such socket (any longer)."""
    try:
        return _by_sock_diag(ours, peer)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        return _by_proc_net(ours, peer)  # no sock_diag (a module not loaded, a seccomp rule)


def _by_sock_diag(ours: Address, peer: Address) -> PeerSocket | None:
    src, dst = _unmapped(peer[0]), _unmapped(ours[0])
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    request = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
        + _SOCKID.pack(peer[1], ours[1], src.packed.ljust(16, b"\0"), dst.packed.ljust(16, b"\0"))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        data = nl.recv(65536)
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    body = _NLMSGHDR.size
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, body)[0]
        raise OSError(code, os.strerror(code))
    if kind != SOCK_DIAG_BY_FAMILY:
        raise OSError(errno.EPROTO, f"unexpected sock_diag answer type {kind}")
    uid, inode = _MSG_UID_INODE.unpack_from(data, body + _MSG_UID_AT)
    return PeerSocket(inode, uid)


def _proc_net_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, hex."""
    raw = ip.packed
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _by_proc_net(ours: Address, peer: Address) -> PeerSocket | None:
    src, dst = _unmapped(peer[0]), _unmapped(ours[0])
    local, remote = _proc_net_address(src, peer[1]), _proc_net_address(dst, ours[1])
    table = "/proc/net/tcp" if src.version == 4 else "/proc/net/tcp6"
    with open(table) as f:
        next(f)  # the header
        for line in f:  # ends at the table's end
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return PeerSocket(int(fields[9]), int(fields[7]))
    return None


def holder(inode: int, root: int, limit: int = MAX_TREE) -> int | None:
    """A process below `root` with `socket:[inode]` among its open files; None: none."""
    link = f"socket:[{inode}]"
    for pid in descendants(root, limit):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return pid
            except OSError:
                continue
    return None


def refusal(ours: Address, peer: Address, root: int | None = None) -> str | None:
    """Why a connection from `peer` to `ours` is refused (a process below `root`, by
    default this one, holds the other end; or it was closed before we could look);
    None: allowed."""
    root = os.getpid() if root is None else root
    found = find_socket(ours, peer)
    if found is None:
        return None
    if found.inode == 0:
        return "closed before it could be checked"
    if found.uid != os.geteuid():
        return None
    if (pid := holder(found.inode, root)) is not None:
        return f"held by process {pid}, which corral started"
    return None
