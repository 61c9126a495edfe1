"""Start a real `corral serve` for a test, talk to it, and check nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
MARK = "CORRAL_TEST_MARK"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something true; that value. Fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # ends when the predicate holds or at the deadline
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel may give the
    same free port to two binds in a row, and a test asking for two ports (HTTP and
    metrics) then got one port twice (CI: "metrics.listen ... is also channels.http")."""
    while True:  # ends at the first port not given before; the kernel has thousands
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def processes_with_mark(mark: str) -> list[psutil.Process]:
    """Every live process whose environment carries this test's mark."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def running(pids: Iterable[int]) -> list[int]:
    """The ones still running: a zombie is dead, waiting for its parent to reap it (an
    orphan of a SIGKILLed corral waits for PID 1, which on some machines is slow to)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


STARTED: list[Corral] = []  # every instance, so a failed test still stops what it started


class Corral:
    """A running `corral serve` with its own state dir and ports."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, dict[str, Any]] | None = None,
        agent: str = "corral.worker.agents.echo:agent",
    ):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.state = tmp / "state"
        self.port = free_port()
        self.metrics_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.mark = uuid.uuid4().hex
        self.config_path = tmp / "corral.toml"
        tables: dict[str, dict[str, Any]] = {
            # drain_timeout: a test that stops corral with a turn running waits 2 s for
            # it, not the 30 s default (tests of the drain set their own)
            "supervisor": {"state_dir": str(self.state), "kill_grace": "2s", "drain_timeout": "2s"},
            "agent": {"entrypoint": agent},
            "channels.http": {"listen": f"127.0.0.1:{self.port}"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        for table, values in (config or {}).items():
            tables.setdefault(table, {}).update(values)
        self.config_path.write_text(to_toml(tables))
        self.log_path = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        STARTED.append(self)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MARK] = self.mark
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env["CORRAL_CONFIG"] = str(self.config_path)
        return env

    def start(self, timeout: float = 30.0, cgroup: Path | None = None) -> Corral:
        """Start `corral serve`; in cgroup v2 directory `cgroup` if given."""
        self._log = open(self.log_path, "ab")

        def enter_cgroup() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(self.config_path)],
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup if cgroup is not None else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"corral serve exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # leftover checks find processes by the mark in their environment: make
            # sure that works for this run, or every such check would pass vacuously
            marked = {p.pid for p in processes_with_mark(self.mark)}
            assert self.proc.pid in marked, "the supervisor's environment does not show the mark"
            return self
        raise RuntimeError(f"corral serve did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def leftovers(self, timeout: float = 10.0) -> list[psutil.Process]:
        """Processes of this run still alive after `timeout` seconds of waiting."""
        deadline = time.monotonic() + timeout
        left = processes_with_mark(self.mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = processes_with_mark(self.mark)
        return left

    # ---- HTTP helpers

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 60.0,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def send(self, session: str, text: str, wait: float = 30.0, **extra: Any) -> dict[str, Any]:
        status, body = self.request(
            "POST",
            f"/v1/messages?wait={wait}",
            {"session": session, "text": text, **extra},
            timeout=wait + 30,
        )
        assert status == 200, (status, body)
        return body  # type: ignore[no-any-return]

    def texts(self, session: str, text: str, wait: float = 30.0) -> list[str]:
        return [r["text"] for r in self.send(session, text, wait)["replies"]]

    def metrics(self) -> dict[str, float]:
        """The /metrics text as {"name{labels}": value}."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30
        ) as r:
            return parse_metrics(r.read().decode())

    def ls(self) -> list[dict[str, Any]]:
        result = self.cli("ls", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["sessions"]  # type: ignore[no-any-return]

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral.cli.main", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value}, read with prometheus-client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for test configs: tables of strings, numbers and booleans."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"
