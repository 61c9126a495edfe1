"""Processes the benchmarks start: `corral serve` and the baseline servers.

Every process gets a marker variable in its environment (inherited by the zygote
and every worker), binds 127.0.0.1 only, and is stopped by PID. At the end of a
run, anything still carrying the run's marker is SIGKILLed by PID and counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
MARK = "CORRAL_BENCH_MARK"
RUN_ID = uuid.uuid4().hex[:12]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_started: dict[int, subprocess.Popen[bytes]] = {}  # every process we started, by PID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nofile_limit() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_setup(address_space: int | None) -> None:
    """Runs in the child between fork and exec."""
    # the supervisor holds a socket and a pidfd per worker: 1,000 workers need > 2,000 fds
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    # if the bench itself is killed, its servers get SIGTERM instead of living on
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def launch(
    args: list[str],
    name: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    address_space: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process with the run's marker; it is registered for stop_all()."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env[MARK] = f"{RUN_ID}:{name}"
    full_env["PYTHONPATH"] = f"{REPO}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            preexec_fn=lambda: _child_setup(address_space),
        )
    _started[proc.pid] = proc
    return proc


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code, or None if still running after `timeout` (waited on a thread)."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        return None


def kill_by_pid(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    _started.pop(proc.pid, None)


def marked(prefix: str) -> list[psutil.Process]:
    """Live processes whose marker starts with `prefix`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK, "").startswith(prefix):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_all() -> int:
    """SIGKILL, by PID, every process of this run still alive; how many there were."""
    for proc in list(_started.values()):
        kill_by_pid(proc)
    left = marked(RUN_ID)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


async def wait_listening(
    proc: subprocess.Popen[bytes], ports: list[int], timeout: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:  # ends when every port accepts, the process dies, or the deadline
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not listen within {timeout}s:\n{tail(log_path)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", pending[0])
            writer.close()
            pending.pop(0)
        except OSError:
            await asyncio.sleep(0.02)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for bench configs: tables of strings, numbers and booleans."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


class CorralServer:
    """A `corral serve` with its own state dir, ports and config, stopped by PID."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        agent: str = "corral.worker.agents.echo:agent",
        config: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.extra_env = env or {}
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state"
        self.port = free_port()
        self.metrics_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.control_socket = self.dir / "control.sock"
        self.mark = f"{RUN_ID}:{name}"
        tables: dict[str, dict[str, Any]] = {
            "supervisor": {
                "state_dir": str(self.state),
                "control_socket": str(self.control_socket),
                "kill_grace": "1s",
            },
            "agent": {"entrypoint": agent},
            "channels.http": {"listen": f"127.0.0.1:{self.port}"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        for table, values in (config or {}).items():
            tables.setdefault(table, {}).update(values)
        self.config_path = self.dir / "corral.toml"
        self.config_path.write_text(to_toml(tables))
        self.log_path = self.dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        self.proc = launch(
            [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(self.config_path)],
            self.name,
            self.log_path,
            env={"CORRAL_CONFIG": str(self.config_path), **self.extra_env},
        )

    async def start(self, timeout: float = 60.0) -> CorralServer:
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        await wait_listening(self.proc, [self.port, self.metrics_port], timeout, self.log_path)
        return self

    def log_line(self, containing: str) -> str | None:
        """The last line of the server's log that contains `containing`, without its prefix."""
        found = [line for line in tail(self.log_path, 10_000).splitlines() if containing in line]
        return found[-1].split(containing, 1)[-1].strip(" :") if found else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, timeout: float = 30.0) -> tuple[float, int | None]:
        """SIGTERM by PID and wait; (seconds to exit, exit code). SIGKILL past `timeout`."""
        if self.proc is None:
            return 0.0, None
        started = time.perf_counter()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        code = await wait_exit(self.proc, timeout)
        elapsed = time.perf_counter() - started
        kill_by_pid(self.proc)
        return elapsed, code

    async def leftovers(self, timeout: float = 5.0) -> list[psutil.Process]:
        """Processes of this server still alive after up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        left = marked(self.mark)
        while left and time.monotonic() < deadline:  # ends at the deadline
            await asyncio.sleep(0.05)
            left = marked(self.mark)
        return left

    def control(self) -> aiohttp.ClientSession:
        """A client for the control socket (the API behind `corral status`, `corral ls`)."""
        connector = aiohttp.UnixConnector(path=str(self.control_socket))
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))

    async def status(self, control: aiohttp.ClientSession | None = None) -> dict[str, Any]:
        """The control API's status (what `corral status --json` prints)."""
        if control is None:
            async with self.control() as own:
                return await self.status(own)
        async with control.get("http://corral/v1/status") as resp:
            return await resp.json()  # type: ignore[no-any-return]

    async def loop_lags(
        self,
        control: aiohttp.ClientSession,
        seconds: float | None,
        until: asyncio.Future[Any] | None = None,
    ) -> list[float]:
        """The supervisor's loop lag, tick by tick, read from its status every 50 ms.

        Each 100 ms tick records its lag; polling twice as often sees every tick (a
        repeated value is the same tick). The polls cost the loop about 1 % of its time.
        Runs for `seconds`, or until `until` is done.
        """
        lags: list[float] = []
        last = None
        end = None if seconds is None else time.perf_counter() + seconds
        while (end is None or time.perf_counter() < end) and not (until and until.done()):
            lag = (await self.status(control))["loop_lag"]
            if lag != last:
                lags.append(lag)
                last = lag
            await asyncio.sleep(0.05)
        return lags

    async def sessions(self) -> list[dict[str, Any]]:
        """The control API's session list (what `corral ls --json` prints)."""
        async with self.control() as control:
            async with control.get("http://corral/v1/sessions") as resp:
                return (await resp.json())["sessions"]  # type: ignore[no-any-return]

    def workers(self, zygote_pid: int) -> list[psutil.Process]:
        """The live worker processes: the zygote's children."""
        try:
            return psutil.Process(zygote_pid).children()
        except psutil.NoSuchProcess:
            return []


class BaselineServer:
    """bench/baseline.py in its own process; it may get stuck, so it is SIGKILLed by PID."""

    # the naive gateway has no memory bound of its own: keep a runaway one from
    # taking the whole machine (it is shared); hitting this shows up as MemoryError
    ADDRESS_SPACE = 4 * 1024**3

    def __init__(self, tmp: Path, name: str, mode: str, turn_timeout: float) -> None:
        self.name = name
        self.mode = mode
        self.turn_timeout = turn_timeout
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0

    async def start(self, timeout: float = 30.0) -> BaselineServer:
        self.proc = launch(
            [
                sys.executable,
                "-m",
                "bench.baseline",
                "--mode",
                self.mode,
                "--port",
                str(self.port),
                "--turn-timeout",
                str(self.turn_timeout),
            ],
            self.name,
            self.log_path,
            address_space=self.ADDRESS_SPACE,
        )
        await wait_listening(self.proc, [self.port], timeout, self.log_path)
        return self

    def sample(self) -> dict[str, Any]:
        """RSS, threads and CPU of the baseline process now."""
        assert self.proc is not None
        try:
            p = psutil.Process(self.proc.pid)
            with p.oneshot():
                rss = p.memory_info().rss
                self.peak_rss = max(self.peak_rss, rss)
                return {"rss": rss, "threads": p.num_threads(), "cpu": sum(p.cpu_times()[:2])}
        except psutil.NoSuchProcess:
            return {"rss": 0, "threads": 0, "cpu": 0.0, "dead": True}

    def _error_lines(self) -> list[str]:
        return [
            line.strip()
            for line in tail(self.log_path, 100_000).splitlines()
            if "Error" in line and not line.startswith(" ")
        ]

    def log_errors(self) -> int:
        """How many exception lines the baseline's log holds (aiohttp logs handler errors)."""
        return len(self._error_lines())

    def last_log_error(self) -> str | None:
        lines = self._error_lines()
        return lines[-1][:200] if lines else None

    def kill(self) -> None:
        if self.proc is not None:
            kill_by_pid(self.proc)


def _proc_cpu(p: psutil.Process, with_children: bool = False) -> float:
    t = p.cpu_times()
    total = t.user + t.system
    if with_children:
        total += t.children_user + t.children_system
    return total


class CpuMeter:
    """Where the CPU went during a window, in % of one core.

    For a corral server: its loop thread, its other threads (store, sampler,
    executors), the named healthy workers, every other worker (live ones, plus
    the reaped ones the zygote accounts as children), the zygote itself. Also the
    bench's own process (the client) and the rest of the machine: other work on
    a shared machine shows up there.
    """

    def __init__(self, pid: int, healthy_pids: set[int] | None = None) -> None:
        self.pid = pid
        self.healthy = healthy_pids or set()
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _snapshot(self) -> dict[str, float]:
        out = dict.fromkeys(
            (
                "loop_thread",
                "other_threads",
                "zygote",
                "healthy_workers",
                "other_workers",
                "bench_client",
            ),
            0.0,
        )
        try:
            root = psutil.Process(self.pid)
            for t in root.threads():
                key = "loop_thread" if t.id == self.pid else "other_threads"
                out[key] += t.user_time + t.system_time
            for zygote in root.children():
                zt = zygote.cpu_times()
                out["zygote"] += zt.user + zt.system
                out["other_workers"] += zt.children_user + zt.children_system
                for w in zygote.children():
                    try:
                        key = "healthy_workers" if w.pid in self.healthy else "other_workers"
                        out[key] += _proc_cpu(w, with_children=True)
                    except psutil.NoSuchProcess:
                        continue
        except psutil.NoSuchProcess:
            pass
        out["bench_client"] = _proc_cpu(psutil.Process())
        m = psutil.cpu_times()
        out["machine"] = m.user + m.nice + m.system + m.irq + m.softirq + m.steal
        return out

    def start(self) -> None:
        self._start = self._snapshot()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """% of one core per part since start(); parts that used nothing are left out."""
        end = self._snapshot()
        wall = time.perf_counter() - self._t0
        delta = {k: max(0.0, end[k] - self._start[k]) for k in end}
        machine = delta.pop("machine")
        delta["rest_of_machine"] = max(0.0, machine - sum(delta.values()))
        return {k: round(100 * v / wall) for k, v in delta.items() if v > 0.005 * wall}
