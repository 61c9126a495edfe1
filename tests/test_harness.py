"""The test harness itself: what made CI fail once must not come back."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests import harness


class _Kernel:
    """A kernel that hands out the same free port to two binds in a row, as Linux may."""

    def __init__(self, ports: list[int]):
        self.ports = ports

    def socket(self, *args: Any) -> _Socket:
        return _Socket(self.ports.pop(0))


class _Socket:
    def __init__(self, port: int):
        self.port = port

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        assert address == ("127.0.0.1", 0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_never_gives_a_port_twice_when_the_kernel_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI once failed with "metrics.listen: 127.0.0.1:45077 is also channels.http.listen":
    # a Corral's HTTP and metrics ports came from two binds that got one port
    monkeypatch.setattr(harness, "socket", _Kernel([45077, 45077, 45078]))
    monkeypatch.setattr(harness, "_PORTS_GIVEN", set(), raising=False)
    assert [harness.free_port(), harness.free_port()] == [45077, 45078]


def test_free_port_is_bindable() -> None:
    port = harness.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
