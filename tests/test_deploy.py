"""The deployment files in deploy/: the systemd unit, the example config, the Prometheus
scrape config and alert rules (with their promtool unit tests), and the Grafana dashboard.

The external checkers (systemd-analyze, promtool) are skipped when missing, except under
CI (CI=true), where a missing checker fails: CI installs them with
`apt-get install -y --no-install-recommends systemd prometheus`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from corral.supervisor.config import parse_config
from corral.supervisor.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "corral.service"
EXAMPLE_CONFIG = DEPLOY / "corral.toml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "corral.json"

APT_PACKAGE = {"systemd-analyze": "systemd", "promtool": "prometheus"}

# What corral exports (supervisor/metrics.py): base name -> type. prometheus_client
# appends _total to counters; histograms are exposed as _bucket, _sum and _count.
EXPORTED = {
    "corral_session_rss_bytes": "gauge",
    "corral_session_cpu_seconds": "counter",
    "corral_session_tasks": "gauge",
    "corral_session_queue_depth": "gauge",
    "corral_session_state": "gauge",
    "corral_workers": "gauge",
    "corral_worker_exits": "counter",
    "corral_worker_spawn_seconds": "histogram",
    "corral_turn_duration_seconds": "histogram",
    "corral_loop_lag_seconds": "histogram",
    "corral_messages_accepted": "counter",
    "corral_replies_delivered": "counter",
    "corral_delivery_failures": "counter",
    "corral_dead_letters": "counter",
    "corral_inbox_depth": "gauge",
}
SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
# Series a query may use: corral's own, and Prometheus' `up` for the scrape itself.
ALLOWED_SERIES = {name + s for name, kind in EXPORTED.items() for s in SUFFIXES[kind]} | {"up"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """A checker is not installed: skip, except under CI, which must install it."""
    if in_ci():
        pytest.fail(f"{message} (CI must install it)")
    pytest.skip(message)


def tool(name: str) -> str:
    """The checker's path; skip (fail under CI) with the install hint when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if not path:
        missing(f"{name} not found: apt-get install -y {APT_PACKAGE[name]}")
    return path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


# --- systemd unit -----------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (keys such as Environment= may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {raw!r}"
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values, f"{key}= is not set"
    return values[-1]


def seconds(span: str) -> float:
    """A systemd time span such as "45s", "1min 30s", "500ms" or "30" (seconds)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_settings(UNIT.read_text())


def verify_root(tmp_path: Path, unit_text: str, with_executable: bool = True) -> Path:
    """A root for `systemd-analyze verify --root`: the unit, the host's own units (for
    sysinit.target and friends) and, unless told otherwise, an executable at the
    ExecStart path. verify checks that ExecStart's program exists and is executable;
    /opt/corral/venv/bin/corral exists only on an installed machine, so the check runs
    against this root instead of rewriting the unit."""
    root = tmp_path / "root"
    for units in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(units, "sysinit.target").is_file():
            shutil.copytree(units, root / units.lstrip("/"), symlinks=True)
            break
    else:
        missing("no sysinit.target on this machine: apt-get install -y systemd")
    dest = root / "etc/systemd/system/corral.service"
    dest.parent.mkdir(parents=True)
    dest.write_text(unit_text)
    if with_executable:
        program = one(unit_settings(unit_text), "Service.ExecStart").split()[0]
        exe = root / program.lstrip("/")
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    root = verify_root(tmp_path, UNIT.read_text())
    r = run(analyze, "verify", f"--root={root}", "corral.service")
    assert r.returncode == 0, r.stdout + r.stderr
    # Unknown keys, bad values and deprecated settings are warnings with exit 0.
    assert (r.stdout + r.stderr).strip() == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("no-executable", r"/opt/corral/venv/bin/corral is not executable"),
        ("Delegat=yes", r"Unknown key.*'Delegat'"),
        ("KillMode=gentle", r"(?i)failed to parse kill mode.*gentle"),
    ],
)
def test_verify_check_catches_a_broken_unit(tmp_path: Path, change: str, complaint: str) -> None:
    """The check above would notice: a missing program, a misspelt key, a bad value."""
    analyze = tool("systemd-analyze")
    text = UNIT.read_text()
    if change != "no-executable":
        text = text.replace("[Service]\n", f"[Service]\n{change}\n", 1)
    root = verify_root(tmp_path, text, with_executable=change != "no-executable")
    r = run(analyze, "verify", f"--root={root}", "corral.service")
    assert re.search(complaint, r.stdout + r.stderr), r.stdout + r.stderr


def test_unit_hardening_exposure_stays_low(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    root = verify_root(tmp_path, UNIT.read_text())
    # --threshold is the exposure level times ten: fail above 2.5 (the unit scores 1.9).
    r = run(
        analyze, "security", "--offline=yes", f"--root={root}", "--threshold=25", "corral.service"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Overall exposure level for corral.service" in r.stdout


def test_unit_settings(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert (
        one(unit, "Service.ExecStart")
        == "/opt/corral/venv/bin/corral serve --config /etc/corral/corral.toml"
    )
    assert "CORRAL_CONFIG=/etc/corral/corral.toml" in unit["Service.Environment"]
    assert one(unit, "Service.KillMode") == "mixed"
    assert one(unit, "Service.Restart") == "on-failure"
    assert seconds(one(unit, "Service.WatchdogSec")) >= 10
    assert one(unit, "Service.OOMPolicy") == "continue"
    assert one(unit, "Service.User") == one(unit, "Service.Group") == "corral"
    assert one(unit, "Service.Delegate") == "yes"
    # Delegate= hands corral a cgroup subtree; ProtectControlGroups=yes would make it
    # read-only.
    assert unit.get("Service.ProtectControlGroups", ["no"])[-1] == "no"
    assert one(unit, "Service.NoNewPrivileges") == "yes"
    assert one(unit, "Service.ProtectSystem") == "strict"
    assert set(one(unit, "Service.RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }


def test_unit_fits_the_example_config(unit: dict[str, list[str]]) -> None:
    cfg = parse_config(EXAMPLE_CONFIG.read_bytes(), str(EXAMPLE_CONFIG))
    sup = cfg.supervisor
    # systemd's SIGKILL must come after corral's own drain and kill grace.
    stop = seconds(one(unit, "Service.TimeoutStopSec"))
    assert stop >= float(sup.drain_timeout) + float(sup.kill_grace) + 5
    # Per worker: a socket and a pidfd in the supervisor; at least a task in the cgroup.
    assert int(one(unit, "Service.LimitNOFILE")) >= 4 * sup.max_workers + 1024
    assert int(one(unit, "Service.TasksMax")) >= 4 * sup.max_workers
    # The directories systemd creates for the service are the ones the config uses.
    assert cfg.state_path == Path("/var/lib") / one(unit, "Service.StateDirectory")
    assert cfg.control_socket_path.parent == Path("/run") / one(unit, "Service.RuntimeDirectory")
    assert one(unit, "Service.RuntimeDirectoryMode") == "0750"


def expand_syscalls(analyze: str, names: list[str], seen: set[str] | None = None) -> set[str]:
    """Syscall names in filter sets, with nested @groups expanded."""
    seen = set() if seen is None else seen
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        r = run(analyze, "syscall-filter", name)
        assert r.returncode == 0, r.stderr
        body = [
            line.strip()
            for line in r.stdout.splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")
        ]
        calls |= expand_syscalls(analyze, body, seen)
    return calls


def test_unit_syscall_filter_allows_what_corral_calls(unit: dict[str, list[str]]) -> None:
    analyze = tool("systemd-analyze")
    filters = unit.get("Service.SystemCallFilter", [])
    if not filters:
        return  # no filter: nothing to break
    assert not any(f.startswith("~") for f in filters), "deny lists are not checked here"
    allowed = expand_syscalls(analyze, [n for f in filters for n in f.split()])
    assert len(allowed) > 100, sorted(allowed)  # the expansion worked
    needed = {
        "fork",
        "clone",
        "clone3",
        "execve",
        "setsid",
        "setpgid",
        "prctl",
        "pidfd_open",
        "pidfd_send_signal",
        "socketpair",
        "sendmsg",
        "recvmsg",
        "setrlimit",
        "prlimit64",
        "setpriority",
        "kill",
        "wait4",
        "waitid",
        "flock",
        "epoll_wait",
        "mmap",
        # each worker's sandbox ([sandbox], worker/landlock.py)
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
        "capget",
        "capset",
    }
    assert needed <= allowed, f"blocked by SystemCallFilter: {sorted(needed - allowed)}"


# --- example config ---------------------------------------------------------------------


def test_example_config_is_valid_and_documents_every_section() -> None:
    cfg = parse_config(EXAMPLE_CONFIG.read_bytes(), str(EXAMPLE_CONFIG))
    assert cfg.state_path == Path("/var/lib/corral")
    assert cfg.control_socket_path == Path("/run/corral/control.sock")
    assert cfg.supervisor.control_socket_mode == 0o660  # the corral group may use the CLI
    assert cfg.metrics.listen == "127.0.0.1:9464"
    text = EXAMPLE_CONFIG.read_text()
    for section in ("supervisor", "agent", "agent.options", "limits", "channels.http"):
        assert f"\n[{section}]\n" in text
    for section in ("delivery", "metrics", "sandbox", "retention"):
        assert f"\n[{section}]\n" in text
    # Every key of the config is shown, set or commented out.
    for section, obj in [
        ("supervisor", cfg.supervisor),
        ("limits", cfg.limits),
        ("delivery", cfg.delivery),
        ("sandbox", cfg.sandbox),
        ("channels.http", cfg.channels.http),
        ("retention", cfg.retention),
        ("store", cfg.store),
        ("cluster", cfg.cluster),
    ]:
        for key in obj.__struct_fields__:
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{section}.{key} is not shown"


# --- Prometheus -------------------------------------------------------------------------


def rule_exprs(text: str) -> Iterator[tuple[str, str]]:
    """(rule name, expr) from a rules file (block scalars and one-line exprs)."""
    lines = text.splitlines()
    name = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- (?:alert|record): (\S+)", line):
            name = m[1]
        m = re.match(r"(\s*)expr: (.*)$", line)
        if not m:
            continue
        indent, value = len(m[1]), m[2].strip()
        if value[:1] in ("|", ">"):
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt.strip())
            value = " ".join(body).strip()
        elif value[:1] in ("'", '"'):
            value = value[1:-1]
        yield name, value


def test_prometheus_config_is_valid() -> None:
    promtool = tool("promtool")
    r = run(promtool, "check", "config", PROM_CONFIG)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr
    text = PROM_CONFIG.read_text()
    assert re.search(r"job_name: corral\b", text)
    assert re.search(r"^\s*- alerts\.yml\b", text, re.M)
    # Scrapes the address the example config serves /metrics on.
    listen = parse_config(EXAMPLE_CONFIG.read_bytes()).metrics.listen
    assert f'targets: ["{listen}"]' in text


def test_alert_rules_are_valid() -> None:
    promtool = tool("promtool")
    r = run(promtool, "check", "rules", ALERTS)
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = re.findall(r"^\s*- alert: (\S+)", ALERTS.read_text(), re.M)
    assert f"SUCCESS: {len(alerts)} rules found" in r.stdout
    for name in (
        "CorralDown",
        "CorralLoopLagHigh",
        "CorralWorkersHittingMemoryLimit",
        "CorralWorkersMakingNoProgress",
        "CorralSessionQuarantined",
        "CorralDeadLetters",
    ):
        assert name in alerts


def test_every_alert_has_for_severity_and_annotations() -> None:
    blocks = re.split(r"^\s*- alert: ", ALERTS.read_text(), flags=re.M)[1:]
    assert len(blocks) >= 6
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"^\s+severity: (warning|critical)$", block, re.M), name
        assert re.search(r"^\s+summary: \S", block, re.M), name
        assert re.search(r"^\s+description: \S", block, re.M), name
        if name != "CorralDeadLetters":  # a dead letter is news at once
            assert re.search(r"^\s+for: \d+[smh]$", block, re.M), name


def test_alert_unit_tests_pass() -> None:
    promtool = tool("promtool")
    r = run(promtool, "test", "rules", ALERTS_TEST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize(
    "alert", ["CorralLoopLagHigh", "CorralWorkersHittingMemoryLimit", "CorralDown"]
)
def test_alert_unit_tests_see_the_alert_fire(tmp_path: Path, alert: str) -> None:
    """With the alert renamed away, alerts_test.yml fails: it does expect it to fire."""
    promtool = tool("promtool")
    text = ALERTS.read_text()
    assert f"- alert: {alert}\n" in text
    (tmp_path / "alerts.yml").write_text(
        text.replace(f"- alert: {alert}\n", f"- alert: {alert}Renamed\n")
    )
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    r = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert f"alertname: {alert}," in r.stdout + r.stderr


# --- metric names -----------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords and labels dropped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", s):
        if re.match(r"\s*\(", s[m.end() :]) or m[0].lower() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m[0])
    return names


def test_metric_names_of_a_query() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(foo_bucket{le!="1e3", x="y(z)"}'
        "[$__rate_interval]))) > 0.25 and on (instance) max(bar:rate5m offset 5m) "
        'or sum(baz) without (a) > bool 1e3 unless absent(up{job="c"})'
    )
    assert metric_names(expr) == {"foo_bucket", "bar:rate5m", "baz", "up"}


def test_listed_metrics_are_the_ones_corral_exports() -> None:
    metrics = Metrics()
    families = {f.name: f.type for f in metrics.registry.collect()}
    assert {n: families.get(n) for n in EXPORTED} == EXPORTED


def dashboard_queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every panel target, and the query variables."""

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            yield f"${var['name']}", m[1] if m else q


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_structure(dashboard: dict) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_shows_what_the_operator_needs(dashboard: dict) -> None:
    exprs = [e for _, e in dashboard_queries(dashboard)]
    used = set().union(*(metric_names(e) for e in exprs))
    assert {
        "corral_session_rss_bytes",
        "corral_session_cpu_seconds_total",
        "corral_worker_exits_total",
        "corral_loop_lag_seconds_bucket",
        "corral_turn_duration_seconds_bucket",
        "corral_workers",
        "corral_inbox_depth",
        "corral_dead_letters_total",
    } <= used
    joined = "\n".join(exprs)
    for hist in ("corral_loop_lag_seconds_bucket", "corral_turn_duration_seconds_bucket"):
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\({q}, [^\n]*\b{hist}\b", joined), (hist, q)
    assert re.search(r"rate\(corral_session_cpu_seconds_total\b", joined)
    assert re.search(r"sum by \(reason\) \(rate\(corral_worker_exits_total\b", joined)


def test_queries_use_only_exported_metrics(dashboard: dict) -> None:
    queries = list(dashboard_queries(dashboard)) + list(rule_exprs(ALERTS.read_text()))
    alerts = re.findall(r"^\s*- alert: ", ALERTS.read_text(), re.M)
    assert len(list(rule_exprs(ALERTS.read_text()))) == len(alerts)
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - ALLOWED_SERIES
        assert not unknown, f"{where}: {sorted(unknown)} not exported by corral in {expr!r}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path, dashboard: dict) -> None:
    """promtool parses every dashboard query (Grafana's variables filled in)."""
    promtool = tool("promtool")
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries(dashboard)):
        filled = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        assert "$" not in filled, f"{where}: unknown variable in {expr!r}"
        rules.append({"record": f"dashboard:query{i}", "expr": filled})
    assert len(rules) >= 8
    # JSON is YAML: promtool reads this file as it is.
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run(promtool, "check", "rules", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout
