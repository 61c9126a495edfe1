"""Reload: SIGHUP and `corral reload` re-read the config while serving."""

from __future__ import annotations

import json
import signal
import threading
import time
import tomllib
from typing import Any

import psutil

from corral.supervisor.spawner import PING_INTERVAL
from tests.harness import REPO, Corral, running, to_toml, wait_for

CHAOS = "corral.worker.agents.chaos:agent"
PID_ECHO = "tests.agents:pid_echo"


def rewrite(c: Corral, changes: dict[str, dict[str, Any]]) -> None:
    """Change tables of the running corral's config file ("limits", "channels.http", ...)."""
    tables: dict[str, dict[str, Any]] = {}

    def flatten(prefix: str, table: dict[str, Any]) -> None:
        plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if plain or not prefix:
            tables[prefix] = plain
        for k, v in table.items():
            if isinstance(v, dict):
                flatten(f"{prefix}.{k}" if prefix else k, v)

    flatten("", tomllib.loads(c.config_path.read_text()))
    tables.pop("", None)
    for table, values in changes.items():
        tables.setdefault(table, {}).update(values)
    c.config_path.write_text(to_toml(tables))


def hangup(c: Corral, mark: str) -> None:
    """SIGHUP, and wait for the reload's log line containing `mark`."""
    assert c.proc is not None
    seen = c.log().count(mark)
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: c.log().count(mark) > seen, timeout=30)


def test_sighup_with_a_shorter_turn_timeout_applies_to_the_next_turn_in_the_same_process(corral):
    c = corral({"limits": {"turn_timeout": "30s"}}, agent=CHAOS)
    assert c.texts("alice", "sleep 2; echo slow but fine") == ["slow but fine"]
    pid = c.proc.pid

    rewrite(c, {"limits": {"turn_timeout": "1s"}})
    hangup(c, "reloaded")
    assert "limits.turn_timeout" in c.log()

    replies = c.send("alice", "sleep 5; echo too slow now")
    assert replies["status"] == "error"
    assert "[turn_timeout]" in replies["replies"][-1]["text"]
    assert c.proc.pid == pid and c.proc.poll() is None  # the same process, still serving


def test_a_running_turn_keeps_the_deadline_it_started_with(corral):
    c = corral({"limits": {"turn_timeout": "30s"}}, agent=CHAOS)
    answer: dict[str, Any] = {}
    t = threading.Thread(target=lambda: answer.update(c.send("bob", "sleep 4; echo made it")))
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    rewrite(c, {"limits": {"turn_timeout": "1s"}})
    result = c.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "limits.turn_timeout" in result.stdout
    t.join(60)
    assert answer["status"] == "done", answer
    assert [r["text"] for r in answer["replies"]] == ["made it"]


def test_a_bad_config_on_sighup_keeps_the_old_one_and_names_the_key(corral):
    c = corral({"limits": {"turn_timeout": "30s"}}, agent=CHAOS)
    good = c.config_path.read_text()
    rewrite(c, {"limits": {"turn_timeout": "banana"}})
    hangup(c, "reload refused")
    line = next(x for x in c.log().splitlines() if "reload refused" in x)
    assert "limits.turn_timeout" in line and "old config stays" in line

    # the old limits still hold: a 2 s turn is fine under 30 s
    assert c.texts("carol", "sleep 2; echo still 30s") == ["still 30s"]

    refusals = c.log().count("reload refused")
    result = c.cli("reload")  # the broken file does not stop the CLI from asking corral
    assert result.returncode == 1
    assert "limits.turn_timeout" in result.stderr and "old config stays" in result.stderr
    assert c.log().count("reload refused") == refusals + 1
    as_json = c.cli("reload", "--json")
    assert as_json.returncode == 1
    assert "limits.turn_timeout" in json.loads(as_json.stdout)["error"]

    c.config_path.write_text(good)  # and it recovers once the file is fixed
    assert c.cli("reload").returncode == 0


def test_reload_refuses_listen_address_state_dir_and_store_changes_by_name(corral, tmp_path):
    c = corral({"limits": {"turn_timeout": "30s"}})
    good = c.config_path.read_text()
    rewrite(
        c,
        {
            "limits": {"turn_timeout": "1s"},
            "metrics": {"listen": "127.0.0.1:1"},
            "store": {"url": "postgresql://corral@127.0.0.1:1/corral"},
        },
    )
    result = c.cli("reload")
    assert result.returncode == 1
    assert "metrics.listen" in result.stderr and "store.url" in result.stderr
    assert "restart" in result.stderr
    assert "limits.turn_timeout" not in result.stderr  # that one could change: not named
    assert "metrics.listen" in c.log()
    # nothing was applied: the old metrics listener answers, the old limits hold
    assert "corral_workers" in " ".join(c.metrics())
    assert c.texts("dave", "sleep 0; hi") == ["sleep 0; hi"]

    # the state dir (the CLI would look for the socket there: SIGHUP it is)
    c.config_path.write_text(good)
    rewrite(c, {"supervisor": {"state_dir": str(tmp_path / "elsewhere")}})
    hangup(c, "reload refused")
    assert "supervisor.state_dir" in c.log()
    assert not (tmp_path / "elsewhere").exists()
    c.config_path.write_text(good)
    assert c.texts("dave", "still") == ["still"]


def test_a_new_agent_runs_the_next_turn_and_idle_workers_are_retired(corral):
    c = corral(agent=PID_ECHO)
    first = c.texts("erin", "hello")[0]
    old_pid = int(first.split()[0])
    zygote = c.cli("status", "--json")
    old_zygote = json.loads(zygote.stdout)["zygote_pid"]

    rewrite(c, {"agent": {"entrypoint": "corral.worker.agents.echo:agent"}})
    result = c.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "agent.entrypoint" in result.stdout

    # the idle worker of the old agent is retired without a message; the zygote is new
    wait_for(lambda: not running([old_pid]))
    status = json.loads(c.cli("status", "--json").stdout)
    assert status["zygote_pid"] != old_zygote
    wait_for(lambda: not psutil.pid_exists(old_zygote))
    assert c.texts("erin", "hello") == ["hello"]  # echo: no pid in front any more
    # the old zygote stays gone: past a few health pings, one zygote is left, the new one
    time.sleep(3 * PING_INTERVAL)
    assert c.proc is not None
    zygotes = [p.pid for p in psutil.Process(c.proc.pid).children() if "zygote" in p.name()]
    assert zygotes == [status["zygote_pid"]]


def test_a_busy_worker_finishes_its_turn_on_the_old_agent_then_the_new_one_runs(corral):
    c = corral(agent=CHAOS)
    answer: dict[str, Any] = {}
    t = threading.Thread(target=lambda: answer.update(c.send("fay", "sleep 3; echo old agent")))
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    rewrite(c, {"agent": {"entrypoint": "corral.worker.agents.echo:agent"}})
    assert c.cli("reload").returncode == 0
    t.join(60)
    assert [r["text"] for r in answer["replies"]] == ["old agent"]
    assert c.texts("fay", "sleep 1; echo x") == ["sleep 1; echo x"]  # echoed, not run


def test_a_new_agent_that_cannot_load_is_refused_and_the_old_one_keeps_serving(corral):
    c = corral()
    rewrite(c, {"agent": {"entrypoint": "no_such_module_here:agent"}})
    result = c.cli("reload")
    assert result.returncode == 1
    assert "agent.entrypoint" in result.stderr
    assert c.texts("gus", "still here") == ["still here"]


def test_webhook_url_change_applies_without_a_restart_but_a_new_channel_is_refused(corral):
    c = corral({"channels.webhook.hooks": {"url": "http://127.0.0.1:9/a"}})
    rewrite(c, {"channels.webhook.hooks": {"url": "http://127.0.0.1:9/b", "secret": "s3"}})
    result = c.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "channels.webhook.hooks.url" in result.stdout
    rewrite(c, {"channels.webhook.other": {"url": "http://127.0.0.1:9/c"}})
    result = c.cli("reload")
    assert result.returncode == 1
    assert "channels.webhook.other" in result.stderr


def test_the_unit_reloads_with_corral_reload_so_systemctl_reload_reports_a_refusal():
    unit = (REPO / "deploy" / "systemd" / "corral.service").read_text()
    reload_lines = [x for x in unit.splitlines() if x.startswith("ExecReload=")]
    start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    program = start.removeprefix("ExecStart=").split()[0]
    assert reload_lines == [f"ExecReload={program} reload"]


def test_a_lower_rss_max_spares_the_running_turn_and_bounds_the_next(corral):
    c = corral({"limits": {"rss_max": "400MiB"}}, agent=CHAOS)
    answer: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: answer.update(c.send("hal", "balloon 120; sleep 3; echo big but allowed"))
    )
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["rss"] > 100 * 1024 * 1024], timeout=30)
    rewrite(c, {"limits": {"rss_max": "60MiB"}})
    assert c.cli("reload").returncode == 0
    t.join(60)
    assert answer["status"] == "done", answer
    replies = c.send("hal", "balloon 120; echo too big now")
    assert replies["status"] == "error"
    assert "[rss_limit]" in replies["replies"][-1]["text"]
