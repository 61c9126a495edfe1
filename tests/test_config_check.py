"""`corral config check` finds what `serve` and the first turn would; `serve` fails at
start, naming the key, on what the check finds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, Corral, free_port, to_toml

OPENAI = "corral.worker.agents.openai:agent"


def check(
    tmp_path: Path,
    tables: dict[str, dict[str, object]] | None,
    *,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`corral config check FILE` on a config with these tables (None: no PATH given)."""
    args = [sys.executable, "-m", "corral.cli.main", "config", "check"]
    if tables is not None:
        base: dict[str, dict[str, object]] = {"supervisor": {"state_dir": str(tmp_path / "s")}}
        for table, values in tables.items():
            base.setdefault(table, {}).update(values)
        path = tmp_path / "corral.toml"
        # TOML's nan and inf, which JSON (to_toml's values) cannot write
        text = to_toml(base).replace("NaN", "nan").replace("Infinity", "inf")
        path.write_text(text)
        args.append(str(path))
    run_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env=run_env, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            {"agent": {"entrypoint": "corral.worker.agents.nothere:agent"}},
            "agent.entrypoint: cannot import 'corral.worker.agents.nothere'",
        ),
        (
            {"agent": {"entrypoint": "corral.worker.agents.echo:nope"}},
            "corral.worker.agents.echo has no callable 'nope'",
        ),
        (
            {"agent": {"entrypoint": OPENAI}, "agent.options": {"model": "m", "max_histroy": 3}},
            "agent.options.max_histroy: unknown option",
        ),
        ({"agent": {"entrypoint": OPENAI}}, "agent.options.model is not set"),
        (
            {"agent": {"entrypoint": OPENAI}, "agent.options": {"model": "m", "tools": ["no:x"]}},
            "agent.options.tools: cannot load 'no:x'",
        ),
        ({"supervisor": {"state_dir": "/tmp/" + "d" * 120}}, "supervisor.state_dir: the control"),
        (
            {"supervisor": {"control_socket": "/tmp/" + "s" * 110 + ".sock"}},
            "supervisor.control_socket: the control socket",
        ),
        ({"limits": {"turn_timeout": float("nan")}}, "limits.turn_timeout: duration must be"),
        ({"limits": {"no_progress_timeout": float("inf")}}, "limits.no_progress_timeout"),
        ({"channels.http": {"listen": "::1:8787"}}, "channels.http.listen: write an IPv6"),
        (
            {"channels.http": {"listen": "192.0.2.7:8787", "token": "t"}},
            "channels.http.listen: cannot listen on 192.0.2.7",
        ),
        ({"metrics": {"listen": "127.0.0.1:8787"}}, "metrics.listen: 127.0.0.1:8787 is also"),
        ({"channels.webhook.ops": {"secret": "x"}}, "channels.webhook.ops.url: required"),
        (
            {"channels.webhook.ops": {"url": "http://x", "secrte": "x"}},
            "channels.webhook.ops.secrte: unknown key",
        ),
    ],
)
def test_config_check_rejects_what_serve_would(tmp_path, tables, message):
    result = check(tmp_path, tables)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr, result.stderr


def test_config_check_rejects_a_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = check(tmp_path, {"supervisor": {"state_dir": str(tmp_path / "file" / "state")}})
    assert result.returncode == 1
    assert "supervisor.state_dir:" in result.stderr and "is not a directory" in result.stderr


def test_config_check_passes_a_good_openai_config(tmp_path):
    options = {"model": "llama3.1", "base_url": "http://127.0.0.1:11434/v1", "max_history": 4}
    result = check(tmp_path, {"agent": {"entrypoint": OPENAI}, "agent.options": options})
    assert result.returncode == 0, result.stderr
    assert f"agent {OPENAI}" in result.stdout and ": ok" in result.stdout


def test_config_check_with_no_path_checks_the_config_serve_would_use(tmp_path):
    path = tmp_path / "elsewhere.toml"
    path.write_text('[agent]\nentrypoint = "corral.worker.agents.echo:nope"\n')
    result = check(tmp_path, None, env={"CORRAL_CONFIG": str(path)})
    assert result.returncode == 1
    assert f"{path}: agent.entrypoint:" in result.stderr
    # and ./corral.toml when $CORRAL_CONFIG is not set
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_CONFIG"}
    (tmp_path / "corral.toml").write_text(f'[supervisor]\nstate_dir = "{tmp_path / "s"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{Path('corral.toml')}: ok")


def run_serve(c: Corral, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `corral serve` expecting it to fail at start; its exit code and log."""
    proc = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(c.config_path)],
        env={**c.env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_serve_fails_at_start_on_an_unknown_agent_option(tmp_path):
    c = Corral(tmp_path, {"agent.options": {"model": "m", "max_histroy": 3}}, agent=OPENAI)
    code, log = run_serve(c)
    assert code == 2, log
    assert "cannot start: agent.options.max_histroy: unknown option" in log
    assert "Traceback" not in log


def test_serve_fails_at_start_without_the_openai_sdk_and_says_how_to_install_it(tmp_path):
    # a module named openai that fails to import, ahead of the real one on the path
    shadow = tmp_path / "shadow" / "openai"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named openai')\n")
    c = Corral(tmp_path / "run", {"agent.options": {"model": "m"}}, agent=OPENAI)
    code, log = run_serve(c, {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}"})
    assert code == 2, log
    assert "cannot start: agent.entrypoint: the openai agent needs the OpenAI SDK" in log
    assert "pip install -e '.[openai]'` in " + str(REPO) in log  # this is a checkout
    assert "Traceback" not in log


def test_a_port_in_use_names_its_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        keys = (("channels.http.listen", "channels.http"), ("metrics.listen", "metrics"))
        for key, table in keys:
            c = Corral(tmp_path / key, {table: {"listen": f"127.0.0.1:{port}"}})
            code, log = run_serve(c)
            assert code == 2, log
            assert f"cannot start: {key} = '127.0.0.1:{port}': the address is already in use" in log
            assert "Traceback" not in log


def test_a_bad_state_dir_names_supervisor_state_dir(tmp_path):
    (tmp_path / "file").write_text("")
    c = Corral(tmp_path / "run", {"supervisor": {"state_dir": str(tmp_path / "file" / "x")}})
    code, log = run_serve(c)
    assert code == 2, log
    assert "cannot start: supervisor.state_dir = " in log and "Traceback" not in log


def test_the_start_line_and_status_name_the_config_file(corral):
    port = free_port()
    c = corral({"channels.webhook.hooks": {"url": f"http://127.0.0.1:{port}/"}})
    line = next(x for x in c.log().splitlines() if "corral is serving" in x)
    assert f"config {c.config_path}" in line
    assert f"http on 127.0.0.1:{c.port}" in line and f"webhook hooks on 127.0.0.1:{c.port}" in line
    assert f"metrics on 127.0.0.1:{c.metrics_port}" in line
    status = c.cli("status")
    assert status.returncode == 0, status.stderr
    assert any(x.split() == ["config:", str(c.config_path)] for x in status.stdout.splitlines())
