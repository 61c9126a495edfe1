"""Under systemd, with no state_dir or control_socket in the config, corral uses the
directories systemd made for it ($STATE_DIRECTORY, $RUNTIME_DIRECTORY)."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

from corral.supervisor import config as config_module
from corral.supervisor.config import parse_config
from tests.harness import Corral, to_toml


class UnitCorral(Corral):
    """A corral started as the unit starts it: systemd's directories in its environment."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.state_directory = tmp / "var-lib-corral"
        self.runtime_directory = tmp / "run-corral"
        for d in (self.state_directory, self.runtime_directory):
            d.mkdir(mode=0o750)
        tables = tomllib.loads(self.config_path.read_text())
        del tables["supervisor"]["state_dir"]  # the config sets no directory
        flat = {
            "supervisor": tables["supervisor"],
            "agent": tables["agent"],
            "channels.http": tables["channels"]["http"],
            "metrics": tables["metrics"],
        }
        self.config_path.write_text(to_toml(flat))

    def env(self) -> dict[str, str]:
        env = super().env()
        env["STATE_DIRECTORY"] = str(self.state_directory)
        env["RUNTIME_DIRECTORY"] = str(self.runtime_directory)
        return env


def test_a_config_without_state_dir_stores_in_state_directory_under_systemd(tmp_path):
    c = UnitCorral(tmp_path).start()
    try:
        assert c.texts("alice", "hi") == ["hi"]
        assert (c.state_directory / "corral.db").exists()
        assert (c.state_directory / "sessions" / "alice.jsonl").exists()
        sock = c.runtime_directory / "control.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert not (c.state / "corral.db").exists()
        # the CLI run with the service's environment finds the socket
        status = c.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state_dir"] == str(c.state_directory)
    finally:
        assert c.stop() == 0


def test_the_cli_finds_the_units_runtime_directory_from_an_operators_shell(tmp_path, monkeypatch):
    unit_dir = tmp_path / "run" / "corral"
    unit_dir.mkdir(parents=True)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no socket in ~/.local/state/corral
    monkeypatch.setattr(config_module, "UNIT_RUNTIME_DIR", str(unit_dir))
    cfg = parse_config("[agent]\nentrypoint = 'corral.worker.agents.echo:agent'\n")
    assert cfg.find_control_socket() == cfg.control_socket_path  # nothing there yet
    (unit_dir / "control.sock").touch()
    assert cfg.find_control_socket() == unit_dir / "control.sock"
    # a config that names a directory is taken at its word
    named = parse_config(f"[supervisor]\nstate_dir = '{tmp_path / 'mine'}'\n")
    assert named.find_control_socket() == tmp_path / "mine" / "control.sock"
