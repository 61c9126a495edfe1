"""corral.toml: defaults, units, and errors that name the key."""

from __future__ import annotations

import pytest

from corral.supervisor.config import Config, ConfigError, load_config, parse_config


def test_no_file_means_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.limits.turn_timeout == 600
    assert cfg.limits.rss_max == 1024**3
    assert cfg.channels.http.listen == "127.0.0.1:8787"
    assert cfg.control_socket_path == cfg.state_path / "control.sock"


def test_units_are_understood():
    cfg = parse_config(
        b'[limits]\nturn_timeout = "250ms"\nno_progress_timeout = "2m"\nrss_max = "512MiB"\n'
        b'output_per_turn = 4096\ncpu_time_per_turn = 1.5\nquarantine = "1h"\n'
    )
    assert cfg.limits.turn_timeout == 0.25
    assert cfg.limits.no_progress_timeout == 120
    assert cfg.limits.rss_max == 512 * 1024**2
    assert cfg.limits.output_per_turn == 4096
    assert cfg.limits.cpu_time_per_turn == 1.5
    assert cfg.limits.quarantine == 3600


def test_agent_options_are_any_table():
    cfg = parse_config(
        b'[agent.options]\nmodel = "m"\ntools = ["a:b"]\n[agent.options.nested]\nx = 1\n'
    )
    assert cfg.agent.options == {"model": "m", "tools": ["a:b"], "nested": {"x": 1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'[limits]\nrss_max = "lots"\n', "limits.rss_max: invalid size"),
        (b'[limits]\nturn_timeout = "soon"\n', "limits.turn_timeout: invalid duration"),
        (b"[limits]\nturn_timeout = -1\n", "limits.turn_timeout: duration must be positive"),
        (b"[limits]\nturn_timout = 5\n", "limits.turn_timout: unknown key"),
        (b"[limit]\n", "limit: unknown key"),
        (b"[supervisor]\nmax_workers = 0\n", "supervisor.max_workers"),
        (b'[supervisor]\nmax_workers = "many"\n', "supervisor.max_workers"),
        (b'[channels.http]\nlisten = "0.0.0.0:8787"\n', "channels.http.token: required"),
        (b'[channels.http]\nlisten = "nowhere"\n', "channels.http.listen"),
        (b'[agent]\nentrypoint = "no colon"\n', "agent.entrypoint"),
        (b'[channels.webhook.http]\nurl = "http://x"\n', "channels.webhook.http"),
        (b"[channels.webhook.ops]\n", "channels.webhook.ops.url: required, not set"),
        (b"[limits\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "corral.toml")
    assert str(e.value).startswith("corral.toml: ")
    assert message in str(e.value)


def test_non_loopback_listen_is_fine_with_a_token():
    cfg = parse_config(b'[channels.http]\nlisten = "0.0.0.0:8787"\ntoken = "s3cret"\n')
    assert cfg.channels.http.token == "s3cret"


def test_config_is_found_from_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corral.toml").write_text("[supervisor]\nmax_workers = 7\n")
    other = tmp_path / "other.toml"
    other.write_text("[supervisor]\nmax_workers = 9\n")
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    assert load_config(None).supervisor.max_workers == 7
    monkeypatch.setenv("CORRAL_CONFIG", str(other))
    assert load_config(None).supervisor.max_workers == 9
    assert load_config(str(tmp_path / "corral.toml")).supervisor.max_workers == 7
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.toml"))
