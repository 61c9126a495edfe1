"""`corral config check`: what `serve` and the first turn would find wrong, found now.

parse_config has already checked every key and value; this goes on to what depends on
the machine: the agent imports and takes its options, the listen addresses belong to
this host, the state dir can be made and written.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from corral.supervisor.config import Config, ConfigError, split_listen


def deep_check(cfg: Config) -> list[str]:
    """Every problem found, each naming its key; empty when `serve` would start."""
    problems = []
    if (agent := check_agent(cfg)) is not None:
        problems.append(agent)
    for key, value in (
        ("channels.http.listen", cfg.channels.http.listen),
        ("metrics.listen", cfg.metrics.listen),
    ):
        if (listen := check_listen(key, value)) is not None:
            problems.append(listen)
    if (state := check_state_dir(cfg.state_path)) is not None:
        problems.append(state)
    return problems


def check_agent(cfg: Config) -> str | None:
    # the worker side's loader: the same import, callable and options check as the zygote
    from corral.worker.agentcheck import check_agent as load
    from corral.worker.runtime import AgentLoadError

    try:
        load(cfg.agent.entrypoint, cfg.agent.options)
    except AgentLoadError as e:
        return str(e)
    return None


def check_listen(key: str, value: str) -> str | None:
    """The host must be an address of this machine (port 0: the port itself may be taken
    by a running corral, which is no fault of the file)."""
    try:
        host, _ = split_listen(value, key)
    except ConfigError as e:
        return str(e)
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"{key}: cannot resolve {host!r}: {e.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as e:
            return f"{key}: cannot listen on {host}: {e.strerror} (not an address of this host?)"
    return None


def check_state_dir(state: Path) -> str | None:
    """The state dir exists as a writable directory, or can be created."""
    key = "supervisor.state_dir"
    probe = state
    while not probe.exists():  # ends at / at the latest
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{key}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == state else f"cannot be created in {probe}"
        return f"{key}: {state} {what} by this user (uid {os.getuid()})"
    return None
