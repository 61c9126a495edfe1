"""The human-readable table of a run's figures (the JSON line carries the same, and more)."""

from __future__ import annotations

from typing import Any


def _n(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "no reply" if unit == " ms" else "-"
    if isinstance(value, float):
        value = f"{value:.{digits}f}"
    return f"{value}{unit}"


def _verdict(met: bool | None, detail: str = "") -> str:
    if met is None:
        return "n/a"
    return ("met" if met else "MISSED") + (f" ({detail})" if detail else "")


_CPU_NAMES = {
    "loop_thread": "loop",
    "other_threads": "threads",
    "zygote": "zygote",
    "healthy_workers": "healthy workers",
    "other_workers": "other workers",
    "bench_client": "client",
    "rest_of_machine": "rest of machine",
}


def cpu(parts: dict[str, float]) -> str:
    """{"loop_thread": 45, ...} -> "loop 45, threads 46, ... (% of a core)"."""
    if not parts:
        return "-"
    return ", ".join(f"{_CPU_NAMES.get(k, k)} {v:g}" for k, v in parts.items())


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def isolation(r: dict[str, Any]) -> list[str]:
    faults = ", ".join(f"{n}x {t}" for t, n in r["faulty_sessions"].items())
    out = [
        f"1. Isolation: {r['healthy_sessions']} healthy sessions in a closed loop, "
        f"{r['seconds_per_phase']:g} s per phase; faulty phase adds {faults}",
        "   (a healthy request not answered with its echo counts as infinitely slow)",
    ]
    rows = [
        [
            "",
            "fault-free p50 / p99",
            "faulty p50 / p99",
            "ratio p50 / p99",
            "healthy replies (ok/err/unanswered)",
        ]
    ]
    for name, key in (("corral", "corral"), ("single-process gateway", "baseline")):
        if key not in r:
            continue
        c, f = r[key]["fault_free"], r[key]["faulty"]
        rows.append(
            [
                name,
                f"{_n(c['p50_ms'], ' ms')} / {_n(c['p99_ms'], ' ms')}",
                f"{_n(f['p50_ms'], ' ms')} / {_n(f['p99_ms'], ' ms')}",
                f"{_n(r[key]['ratio_p50'])} / {_n(r[key]['ratio_p99'])}",
                f"{c['replies']}/{c['errors']}/{c['unanswered']} -> "
                f"{f['replies']}/{f['errors']}/{f['unanswered']}",
            ]
        )
    for fault, x in r["corral"].get("by_fault", {}).items():
        fired = ", ".join(f"{k} x{v}" for k, v in x["fault_replies"].items())
        rows.append(
            [
                f"corral, only 1x {fault}",
                "",
                f"{_n(x['p50_ms'], ' ms')} / {_n(x['p99_ms'], ' ms')}",
                f"{_n(x['ratio_p50'])} / {_n(x['ratio_p99'])}",
                f"{x['seconds']:g} s phase; {fired}",
            ]
        )
    out += _table(rows)
    out.append(
        "   CPU in % of one core (loop = the server's event-loop thread); "
        "corral's loop lag p99/max:"
    )

    def lag(x: dict[str, Any]) -> str:
        if "loop_lag_p99_ms" not in x:
            return ""
        return f"; lag {_n(x['loop_lag_p99_ms'])}/{_n(x['loop_lag_max_ms'])} ms"

    for name, key in (("corral", "corral"), ("gateway", "baseline")):
        if key in r:
            for phase in ("fault_free", "faulty"):
                x = r[key][phase]
                label = f"{name} {phase.replace('_', '-')}:"
                out.append(f"     {label:<27}{cpu(x.get('cpu_pct', {}))}{lag(x)}")
    for fault, x in r["corral"].get("by_fault", {}).items():
        label = f"corral, only {fault}:"
        out.append(f"     {label:<27}{cpu(x['cpu_pct'])}{lag(x)}")
    c = r["corral"]
    worst = max((x for x in (c["ratio_p50"], c["ratio_p99"]) if x is not None), default=None)
    if worst is None:
        verdict = _verdict(False, "healthy requests failed or went unanswered")
    else:
        verdict = _verdict(worst <= 1.2, f"worst {worst}")
    out.append(f"   goal: corral ratio <= 1.2: {verdict}")
    if "baseline" in r:
        out.append(f"   gateway with faults: {r['baseline']['outcome']}")
        server = r["baseline"]["faulty"].get("server", {})
        if server:
            out.append(
                f"   gateway process at the end: RSS {server.get('rss_mib_end')} MiB "
                f"(peak {server.get('rss_mib_peak')}), {server.get('threads_end')} threads"
            )
    if "faults" in c["faulty"]:
        fired = "; ".join(
            f"{t}: " + ", ".join(f"{k} x{v}" for k, v in kinds.items())
            for t, kinds in c["faulty"]["faults"].items()
        )
        out.append(f"   corral's faulty sessions got: {fired}")
    return out


def reaction(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            "bound",
            "reps",
            "p50",
            "max",
            "goal",
            "",
            "detect p50/max",
            "stop->reply p50/max",
            "reply-send-timeout p50/max",
        ]
    ]
    for bound, x in r.items():
        met = None if x["max_ms"] is None else x["max_ms"] <= x["goal_ms"]
        if x.get("unexpected_replies"):
            met = False
        rows.append(
            [
                bound,
                str(x["reps"]),
                _n(x["p50_ms"], " ms"),
                _n(x["max_ms"], " ms"),
                f"<= {x['goal_ms']:g} ms",
                _verdict(met, "max"),
                f"{_n(x.get('detect_p50_ms'), ' ms')} / {_n(x.get('detect_max_ms'), ' ms')}",
                f"{_n(x.get('stop_to_reply_p50_ms'), ' ms')} / "
                f"{_n(x.get('stop_to_reply_max_ms'), ' ms')}",
                f"{_n(x.get('from_send_p50_ms'), ' ms')} / {_n(x.get('from_send_max_ms'), ' ms')}"
                if "from_send_p50_ms" in x
                else "",
            ]
        )
    return [
        "2. Reaction: bound crossed -> user's error reply "
        "(detect: crossed -> the supervisor's stop decision, from its log)",
        *_table(rows),
    ]


def spawn(r: dict[str, Any]) -> list[str]:
    h = r["spawn_histogram"]
    return [
        f"3. Spawn: first message of a new session vs a warm one ({r['sessions']} sessions)",
        f"   new p50/p99 {_n(r['new_p50_ms'], ' ms')} / {_n(r['new_p99_ms'], ' ms')}; "
        f"warm {_n(r['warm_p50_ms'], ' ms')} / {_n(r['warm_p99_ms'], ' ms')}; "
        f"extra p50 {_n(r['extra_p50_ms'], ' ms')}, p99 {_n(r['extra_p99_ms'], ' ms')}",
        f"   bare fork+exit+waitpid p50 {_n(r['bare_fork_p50_ms'], ' ms', 2)}; "
        f"corral_worker_spawn_seconds mean {_n(h['mean_ms'], ' ms', 2)}, "
        f"p50 in bucket {h['p50_bucket_ms']} ms",
        f"   goal: extra p50 <= 10 ms: {_verdict(r['extra_p50_ms'] <= 10)}",
    ]


def throughput(r: dict[str, Any]) -> list[str]:
    rows = [["", "messages/s", "p50", "p99", "server CPU/msg", "CPU, % of one core"]]
    names = (
        ("corral", "corral"),
        ("corral, commits not synced", "corral_no_fsync"),
        ("bare aiohttp echo", "bare_aiohttp"),
    )
    for name, key in names:
        if key not in r:
            continue
        x = r[key]
        rows.append(
            [
                name,
                _n(x["messages_per_s"]),
                _n(x["p50_ms"], " ms", 2),
                _n(x["p99_ms"], " ms", 2),
                _n(x.get("server_cpu_us_per_message"), " us"),
                cpu(x["cpu_pct"]),
            ]
        )
    met = None if r["ratio"] is None else r["ratio"] >= r["goal_ratio"]
    return [
        f"4. Throughput: {r['sessions']} sessions, closed loop, {r['seconds']:g} s",
        *_table(rows),
        f"   ratio {r['ratio']} (not synced: {r.get('ratio_no_fsync')}); "
        f"goal >= {r['goal_ratio']}: {_verdict(met)}",
        *(
            [f"   note: {r['corral_no_fsync']['note']}"]
            if "note" in r.get("corral_no_fsync", {})
            else []
        ),
    ]


def scale(r: dict[str, Any]) -> list[str]:
    w = r.get("idle_window", {})
    u = r.get("idle_worker", {})
    m = r.get("while_scraping", {})
    s = r.get("stop_idle", {})
    p99 = w.get("lag_p99_ms")
    uss = u.get("uss_median_mib")
    return [
        f"5. Scale: {r.get('live_workers')} live workers ({r['workers_requested']} requested; "
        f"created in {r.get('create_seconds')} s, {r.get('create_per_s')}/s, "
        f"{r.get('create_failures')} failed; RLIMIT_NOFILE {r.get('nofile_limit')}"
        f"{', TOO LOW for this many workers' if r.get('nofile_limited') else ''})",
        f"   loop lag, {w.get('seconds')} s all idle ({w.get('ticks_seen')} ticks): "
        f"p50 {w.get('lag_p50_ms')} ms, p99 {p99} ms, max {w.get('lag_max_ms')} ms, "
        f"{w.get('ticks_over_10ms')} ticks > 10 ms; goal p99 <= 10 ms: "
        f"{_verdict(None if p99 is None else p99 <= 10)}",
        f"   supervisor: RSS {r.get('supervisor_rss_mib')} MiB, {r.get('supervisor_fds')} fds; "
        f"idle CPU: {cpu(w.get('cpu_pct', {}))}; zygote RSS {r.get('zygote_rss_mib')} MiB",
        f"   idle worker USS median {uss} MiB "
        f"(max {u.get('uss_max_mib')}, PSS {u.get('pss_median_mib')}, RSS "
        f"{u.get('rss_median_mib')}; {u.get('sampled')} sampled); goal <= 5 MiB: "
        f"{_verdict(None if uss is None else uss <= 5)}",
        f"   /metrics scrape: p50 {m.get('scrape_p50_ms')} ms, max {m.get('scrape_max_ms')} ms, "
        f"{m.get('bytes')} bytes, {m.get('series')} series; loop lag while scraping: "
        f"max {m.get('lag_max_ms')} ms, {m.get('ticks_over_10ms')} ticks > 10 ms",
        f"   stop with all idle: {s.get('seconds')} s, exit {s.get('exit_code')}, "
        f"{s.get('leftover_processes')} processes left",
    ]


def stop(r: dict[str, Any]) -> list[str]:
    out = ["6. Stop: SIGTERM -> exit with every worker in a hung turn"]
    rows = [["turn", "workers", "stop", "drain + grace", "over", "exit", "left at exit / +2 s"]]
    for name, x in r.items():
        rows.append(
            [
                name,
                f"{x.get('busy_at_sigterm')}/{x['hung_workers']} busy",
                f"{x['stop_seconds']:.2f} s",
                f"{x['bound_s']:g} s = {x['drain_timeout_s']:g} + {x['kill_grace_s']:g}",
                f"{x['over_bound_ms']:+.0f} ms",
                str(x["exit_code"]),
                f"{x['processes_left_at_exit']} / {x['processes_left_after_2s']}",
            ]
        )
    return out + _table(rows)


def durability(r: dict[str, Any]) -> list[str]:
    rows = [["", "accepted/s (202)", "failures"]]
    for name, key in (
        ("durable (fsync at commit)", "durable"),
        ("commits not synced", "not_synced"),
    ):
        rows.append([name, _n(r[key]["accepted_per_s"]), str(r[key]["failures"])])
    return [
        "7. Durability: accepts over HTTP, 32 clients, 64 sessions, turns running behind",
        *_table(rows),
        f"   durable / not synced: {r['ratio']}",
    ]


def sandbox(r: dict[str, Any]) -> list[str]:
    s, t, p = r["per_spawn"], r["per_turn"], r["per_spawn_corral_ports"]
    on, off = t["sandbox-on-files"], t["sandbox-off"]
    ports_on, files = t["sandbox-on"], t["sandbox-on-files"]
    c = r.get("peer_check", {})
    extra = s["enter_p50_ms"]
    return [
        f"8. Sandbox: Landlock ABI {s['abi']}, {s['rules']} rules (plan built once in "
        f"{_n(s['plan_once_ms'], ' ms', 2)})",
        f"   per spawn: fork+restrict p50 {_n(s['fork_sandboxed_p50_ms'], ' ms', 3)} vs bare "
        f"fork {_n(s['fork_bare_p50_ms'], ' ms', 3)}: extra {_n(s['extra_p50_ms'], ' ms', 3)}; "
        f"enter() p50/p99 {_n(s['enter_p50_ms'], ' ms', 3)} / {_n(s['enter_p99_ms'], ' ms', 3)}",
        f"   per turn (end to end, on vs off): new session p50 {_n(on['new_p50_ms'], ' ms')} "
        f"vs {_n(off['new_p50_ms'], ' ms')}; second {_n(on['second_p50_ms'], ' ms')} "
        f"vs {_n(off['second_p50_ms'], ' ms')}; warm p50 {_n(on['warm_p50_ms'], ' ms')} "
        f"vs {_n(off['warm_p50_ms'], ' ms')} (extra {_n(t['files_warm_extra_p50_ms'], ' ms', 3)})",
        f"   goal: enter() <= 1 ms per spawn: {_verdict(extra is not None and extra <= 1)}",
        "   HTTP peer check (the default without a token) per new connection, allowed p50/p99: "
        + "; ".join(
            f"{n} workers {_n(c.get(f'allowed_p50_ms_{n}_workers'), ' ms', 3)} / "
            f"{_n(c.get(f'allowed_p99_ms_{n}_workers'), ' ms', 3)}"
            for n in (0, 100, 500)
        )
        + f"; refused p50 {_n(c.get('refused_p50_ms_1_worker'), ' ms', 3)}",
        f'   with close_corral_ports = "always" (zygote\'s layer '
        f"{_n(p['zygote_layer_ms'], ' ms')} once): "
        f"enter() p50/p99 {_n(p['enter_p50_ms'], ' ms', 3)} / {_n(p['enter_p99_ms'], ' ms', 3)}, "
        f"kernel memory {_n(p['kernel_kb_per_worker'], ' kB')} per worker (files only: "
        f"{_n(s['kernel_kb_per_worker'], ' kB')}); new session p50 "
        f"{_n(ports_on['new_p50_ms'], ' ms')} vs {_n(files['new_p50_ms'], ' ms')} files only, "
        f"warm {_n(ports_on['warm_p50_ms'], ' ms')} vs {_n(files['warm_p50_ms'], ' ms')}; "
        f"goal: {_verdict(p['enter_p50_ms'] is not None and p['enter_p50_ms'] <= 1)}",
    ]


def floods(r: dict[str, Any]) -> list[str]:
    c = r["fault_free"]
    rows = [["", "bystander p50 / p99", "ratio p99", "loop lag p99 / max", "goal"]]
    rows.append(
        [
            "no flood",
            f"{_n(c['p50_ms'], ' ms')} / {_n(c['p99_ms'], ' ms')}",
            "",
            f"{_n(c.get('loop_lag_p99_ms'), ' ms')} / {_n(c.get('loop_lag_max_ms'), ' ms')}",
            "",
        ]
    )
    for kind in ("log", "progress"):
        f = r.get(f"{kind}_flood")
        if f is None:
            continue
        met = None if f["ratio_p99"] is None else f["ratio_p99"] <= r["goal_ratio_p99"]
        rows.append(
            [
                f"{r['flooding_sessions']}x {kind} flood",
                f"{_n(f['p50_ms'], ' ms')} / {_n(f['p99_ms'], ' ms')}",
                _n(f["ratio_p99"]),
                f"{_n(f.get('loop_lag_p99_ms'), ' ms')} / {_n(f.get('loop_lag_max_ms'), ' ms')}",
                _verdict(met, f"<= {r['goal_ratio_p99']:g}"),
            ]
        )
    return [
        f"1b. Frame floods: {r['bystanders']} bystanders echo in a closed loop, "
        f"{r['seconds_per_phase']:g} s per phase; {r['flooding_sessions']} sessions send "
        "60,000 empty log (or progress) frames per turn, turn after turn",
        *_table(rows),
        f"   frames dropped past frame_rate: {r.get('frames_dropped', {})}",
    ]


def cluster(r: dict[str, Any]) -> list[str]:
    rows = [["", "messages/s", "p50 ms", "p99 ms", "failures"]]
    for name, key in (
        ("1 node, SQLite", "sqlite_1"),
        ("1 node, PostgreSQL", "pg_1"),
        ("2 nodes, PostgreSQL", "pg_2"),
        ("3 nodes, PostgreSQL", "pg_3"),
    ):
        x = r[key]
        rows.append(
            [name, _n(x["messages_per_s"]), str(x["p50_ms"]), str(x["p99_ms"]), str(x["failures"])]
        )
    out = [
        f"9. Cluster: {r['sessions']} sessions, ?wait to a random node, echo agent, "
        f"{r['seconds']:g} s each",
        *_table(rows),
    ]
    for key in ("takeover_3s", "takeover_10s"):
        if (t := r.get(key)) is None:
            continue
        if "error" in t:
            out.append(f"   {key}: FAILED: {t['error']}")
            continue
        out.append(
            f"   takeover after kill -9 (lease_ttl {t['lease_ttl']}): {t['sessions_moved']} "
            f"sessions moved, {t['answered']} answered; kill to reply: first "
            f"{t['first_reply_s']} s, median {t['median_s']} s, last {t['last_reply_s']} s"
        )
    return out


def memory(r: dict[str, Any]) -> list[str]:
    rows = [["agent", "workers", "USS median/max", "PSS median/max", "RSS median", "zygote RSS"]]
    for name in ("echo", "openai"):
        m = r.get(name, {})
        if "error" in m or not m.get("sampled"):
            rows.append([name, "-", m.get("error", "no worker measured"), "", "", ""])
            continue
        rows.append(
            [
                name,
                str(m["workers"]),
                f"{m['uss_median_mib']:.2f} / {m['uss_max_mib']:.2f} MiB",
                f"{m['pss_median_mib']:.2f} / {m['pss_max_mib']:.2f} MiB",
                f"{m['rss_median_mib']:.2f} MiB",
                f"{m['zygote_rss_mib']:.2f} MiB",
            ]
        )
    more = [["agent", "workers", "USS median", "PSS median", "marginal (sum of PSS) per worker"]]
    for name in ("echo", "openai"):
        m = r.get(name, {}).get("more", {})
        if m.get("sampled"):
            marginal = m.get("marginal_pss_mib")
            more.append(
                [
                    name,
                    str(m["workers"]),
                    f"{m['uss_median_mib']:.2f} MiB",
                    f"{m['pss_median_mib']:.2f} MiB",
                    "-" if marginal is None else f"{marginal:.2f} MiB",
                ]
            )
    pss = r.get("openai", {}).get("pss_median_mib")
    goal = r["goal_openai_pss_mib"]
    met = None if pss is None else pss <= goal
    return [
        "10. Memory: one idle worker after one turn (openai: streamed, from a local fake endpoint)",
        *_table(rows),
        f"   goal: openai worker PSS <= {goal:g} MiB: {_verdict(met)}",
        *(
            ["   beside it, more workers on the same server:", *_table(more)]
            if len(more) > 1
            else []
        ),
    ]


SECTIONS = {
    "isolation": isolation,
    "floods": floods,
    "reaction": reaction,
    "spawn": spawn,
    "throughput": throughput,
    "scale": scale,
    "stop": stop,
    "durability": durability,
    "sandbox": sandbox,
    "cluster": cluster,
    "memory": memory,
}


def render(results: dict[str, Any]) -> str:
    lines = [
        f"corral benchmarks, {results['mode']} mode: {results['machine']['cpus']} CPUs, "
        f"load average {results['machine']['loadavg_start']} at start, "
        f"{results['elapsed_s']} s in all; corral at {results['corral_commit']}",
        "",
    ]
    for name, fn in SECTIONS.items():
        if name in results:
            value = results[name]
            if isinstance(value, dict) and "error" in value:
                lines.append(f"{name}: FAILED: {value['error']}")
            else:
                lines += fn(value)
            lines.append("")
    lines.append(f"processes of the run left at the end: {results['leftover_processes']}")
    return "\n".join(lines)
