"""The `corral` command."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import msgspec

from corral.cli import render
from corral.cli import top as top_view
from corral.cli.client import (
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_PENDING,
    ControlClient,
    ProgressNotes,
    Refused,
    new_message_id,
    post_message,
)
from corral.supervisor.config import (
    Config,
    ConfigError,
    SupervisorConfig,
    find_config_path,
    load_config,
)
from corral.supervisor.logs import logging_to_stderr

F = TypeVar("F", bound=Callable[..., Any])


CONFIG_PATH = "corral.config_path"


def _load(config_path: str | None) -> Config:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # which file it was, for `serve` to log and `status` to show
        found = find_config_path(config_path)
        ctx.meta[CONFIG_PATH] = None if found is None else found.absolute()
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def config_option(f: F) -> F:
    """`--config PATH`, handed to the command as the loaded `config: Config`."""
    return click.option(
        "--config",
        "config",
        metavar="PATH",
        callback=lambda ctx, param, path: _load(path),
        help="corral.toml (default: $CORRAL_CONFIG, then ./corral.toml, then built-in defaults)",
    )(f)


def timeout_option(f: F) -> F:
    return click.option(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds to wait for an answer.",
    )(f)


JSON_ERRORS = "corral.json_errors"


def _wants_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_ERRORS] = True  # eager: known before any other option can fail
    return value


def json_option(f: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=_wants_json,
        help='Print JSON for scripts (errors too: {"error": ...} on stdout).',
    )(f)


class Corral(click.Group):
    """With --json, a command's error is printed as {"error": MESSAGE} on stdout,
    with the exit code it has without --json."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if not ctx.meta.get(JSON_ERRORS):
                raise
            click.echo(render.as_json({"error": e.format_message()}))
            raise click.exceptions.Exit(e.exit_code) from None


EPILOG = f"""\b
Exit codes:
  0  done
  {EXIT_FAILED}  failed: corral refused (unknown session, bad key, ...), could not be
     reached or did not answer within --timeout; `send`: the turn ended with an error
  2  bad options or arguments; `serve`: could not start
  {EXIT_PENDING}  `send --wait`: no reply within the wait (the message is still queued)
With --json, errors are {{"error": MESSAGE}} on stdout, with the same exit codes.

\b
Shell completion (bash; zsh and fish alike):
  eval "$(_CORRAL_COMPLETE=bash_source corral)"    # in ~/.bashrc
  eval "$(_CORRAL_COMPLETE=zsh_source corral)"     # in ~/.zshrc
  _CORRAL_COMPLETE=fish_source corral > ~/.config/fish/completions/corral.fish
"""


@click.group(cls=Corral, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="corral")
def main() -> None:
    """corral: every AI-agent chat session in its own bounded worker process."""


@main.command()
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="corral.toml (default: $CORRAL_CONFIG, then ./corral.toml, then built-in defaults); "
    "re-read on SIGHUP and `corral reload`",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def serve(config_path: str | None, log_level: str) -> None:
    """Run the supervisor."""
    # imported here: the client commands need none of the supervisor
    from corral.supervisor.app import StartError, event_loop_factory
    from corral.supervisor.app import serve as run

    found = find_config_path(config_path)
    config = _load(str(found) if found else None)
    try:
        loop_factory = event_loop_factory()
    except StartError as e:
        click.echo(f"Error: cannot start: {e}", err=True)
        sys.exit(2)
    try:
        with (
            logging_to_stderr(log_level),
            asyncio.Runner(loop_factory=loop_factory) as runner,
        ):
            code = runner.run(run(config, found.resolve() if found else None))
    except KeyboardInterrupt:  # Ctrl-C before the supervisor's own handlers are in place
        click.echo("corral serve: interrupted", err=True)
        code = 130
    sys.exit(code)


@main.command()
@click.argument("session")
@click.argument("text")
@click.option(
    "--wait",
    type=float,
    metavar="SECONDS",
    help="Wait up to SECONDS for the replies and print them.",
)
@click.option(
    "--id", "message_id", metavar="ID", help="Idempotency key: the same id twice is one message."
)
@json_option
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for corral to answer (on top of --wait).",
)
@config_option
def send(
    session: str,
    text: str,
    wait: float | None,
    message_id: str | None,
    as_json: bool,
    timeout: float,
    config: Config,
) -> None:
    """Send TEXT to SESSION over the HTTP channel ("-": read TEXT from stdin)."""
    if text == "-":
        text = sys.stdin.read().removesuffix("\n")  # what `echo` adds
    message_id = message_id or new_message_id()
    if wait is not None and not as_json:
        with ProgressNotes(
            config, session, message_id, lambda note: click.echo(f"... {note}", err=True)
        ):
            answer = post_message(config, session, text, message_id, wait, timeout)
    else:
        answer = post_message(config, session, text, message_id, wait, timeout)
    if isinstance(answer, Refused):
        if as_json:
            click.echo(render.as_json(answer.plain))
        else:
            click.echo(f"error {answer.status}: {answer.error}", err=True)
        sys.exit(EXIT_FAILED)
    result = answer.body
    if as_json:
        click.echo(render.as_json(answer.plain))
    elif wait is None:
        click.echo(f"accepted {result.id}")
    else:
        replies = [] if result.replies is msgspec.UNSET else result.replies
        for reply in replies:
            click.echo(reply.text, err=reply.kind == "error")
        if result.status == "pending":
            click.echo(
                f"no reply within {wait:g}s (message {result.id} is still queued or running)",
                err=True,
            )
            sys.exit(EXIT_PENDING)
    if result.status == "error":
        sys.exit(EXIT_FAILED)


@main.command(name="ls")
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Also sessions the store knows with no worker (restarts, last exit, last message).",
)
@config_option
@timeout_option
@json_option
def ls(every: bool, config: Config, timeout: float, as_json: bool) -> None:
    """List sessions with a worker or queued messages."""
    client = ControlClient(config, timeout)
    answer = client.sessions_all() if every else client.sessions()
    if as_json:
        click.echo(render.as_json(answer.plain))
        return
    for line in render.session_table(answer.body.sessions, stored=every):
        click.echo(line)


@main.command()
@click.argument("session")
@config_option
@timeout_option
@json_option
def show(session: str, config: Config, timeout: float, as_json: bool) -> None:
    """Show one session in detail (live, or as the store knows it)."""
    answer = ControlClient(config, timeout).session(session)
    if as_json:
        click.echo(render.as_json(answer.plain))
        return
    for line in render.session_fields(answer.body):
        click.echo(line)


@main.command()
@click.argument("session")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    metavar="N",
    help="The last N messages (default 50), with their replies.",
)
@config_option
@timeout_option
@json_option
def history(session: str, limit: int | None, config: Config, timeout: float, as_json: bool) -> None:
    """Show a session's messages and replies, oldest first."""
    answer = ControlClient(config, timeout).history(session, limit)
    if as_json:
        click.echo(render.as_json(answer.plain))
        return
    for line in render.history_lines(answer.body.entries):
        click.echo(line)


@main.group(name="dead-letters", invoke_without_command=True)
@config_option
@timeout_option
@json_option
@click.pass_context
def dead_letters(ctx: click.Context, config: Config, timeout: float, as_json: bool) -> None:
    """List replies that could not be delivered (`retry` puts them back)."""
    if ctx.invoked_subcommand is not None:
        return
    answer = ControlClient(config, timeout).dead_letters(None)
    if as_json:
        click.echo(render.as_json(answer.plain))
        return
    for line in render.dead_letter_table(answer.body.dead_letters):
        click.echo(line)


@dead_letters.command(name="retry")
@click.argument("ids", nargs=-1, metavar="REPLY_ID...")
@click.option("--all", "every", is_flag=True, help="Every dead letter of a configured channel.")
@config_option
@timeout_option
@json_option
def retry(ids: tuple[str, ...], every: bool, config: Config, timeout: float, as_json: bool) -> None:
    """Put dead letters back into delivery, due now, with fresh attempts."""
    if every == bool(ids):
        raise click.UsageError("name reply ids or give --all (not both)")
    answer = ControlClient(config, timeout).retry_dead_letters(list(ids), every)
    result = answer.body
    if as_json:
        click.echo(render.as_json(answer.plain))
    else:
        click.echo(f"retrying {len(result.retried)} replies")
        for reply in result.not_retried:
            click.echo(f"{reply}: not dead-lettered, or its channel is not configured", err=True)
    if result.not_retried:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("session")
@click.option(
    "--force",
    is_flag=True,
    help="SIGKILL at once instead of SIGTERM, then SIGKILL after kill_grace.",
)
@config_option
@timeout_option
@json_option
def kill(session: str, force: bool, config: Config, timeout: float, as_json: bool) -> None:
    """Stop a session's worker (its running turn gets an error reply)."""
    client = ControlClient(config, timeout)
    notice = None
    grace = None
    if not force:
        # the server's kill_grace: its config may not be this command's
        grace = client.status().body.kill_grace
        shown = float(config.supervisor.kill_grace) if grace is None else grace
        wait = min(1.0, shown / 2)

        def waiting() -> None:
            click.echo(
                f"{session}: the worker has not exited {wait:g}s after SIGTERM; waiting, "
                f"SIGKILL follows {shown:g}s after SIGTERM (kill_grace)",
                err=True,
            )

        notice = (wait, waiting)
    answer = client.kill(session, force, grace, notice)
    result = answer.body
    if as_json:
        click.echo(render.as_json(answer.plain))
    elif result.reaped:
        click.echo(f"killed {result.session} (worker {result.pid})")
    else:
        click.echo(f"worker {result.pid} of {result.session} is still stopping", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("session")
@config_option
@timeout_option
@json_option
def release(session: str, config: Config, timeout: float, as_json: bool) -> None:
    """Lift a session's quarantine."""
    answer = ControlClient(config, timeout).release(session)
    click.echo(render.as_json(answer.plain) if as_json else f"released {answer.body.session}")


@main.command()
@config_option
@timeout_option
@json_option
def status(config: Config, timeout: float, as_json: bool) -> None:
    """Show the supervisor's state."""
    answer = ControlClient(config, timeout).status()
    if as_json:
        click.echo(render.as_json(answer.plain))
        return
    for line in render.status_fields(answer.body):
        click.echo(line)


@main.command()
@click.option(
    "--timeout",
    "drain_timeout",
    type=float,
    metavar="SECONDS",
    help="Time running turns get to finish (default: drain_timeout).",
)
@click.option(
    "--no-wait", is_flag=True, help="Return at once instead of waiting for the supervisor to exit."
)
@config_option
@json_option
def drain(drain_timeout: float | None, no_wait: bool, config: Config, as_json: bool) -> None:
    """Stop intake, let running turns finish, stop every worker, and exit."""
    client = ControlClient(config)
    grace = None if no_wait else client.status().body.kill_grace  # the server's, not ours
    answer = client.drain(drain_timeout)
    if as_json:
        click.echo(render.as_json(answer.plain))
    if no_wait:
        return
    drain_for = answer.body.drain_timeout
    kill_grace = float(config.supervisor.kill_grace) if grace is None else grace
    bound = drain_for + kill_grace + 10
    began = time.monotonic()
    shown: list[tuple[str, str]] = []

    def progress() -> None:  # what the drain waits for, whenever that changes
        try:
            sessions = ControlClient(config, 1.0).sessions().body.sessions
        except click.ClickException:
            return  # stopping: the socket goes away at the end
        waiting = sorted((s.session, s.state) for s in sessions if s.state in ("busy", "stopping"))
        if waiting == shown or not waiting:
            return
        shown[:] = waiting
        left = max(0.0, drain_for - (time.monotonic() - began))
        names = ", ".join(f"{key} ({state})" for key, state in waiting[:10])
        more = f" and {len(waiting) - 10} more" if len(waiting) > 10 else ""
        click.echo(
            f"waiting for {len(waiting)} sessions: {names}{more}; running turns get "
            f"{left:.0f}s more (drain_timeout), then SIGTERM, SIGKILL {kill_grace:g}s later",
            err=True,
        )

    if not client.wait_stopped(bound, None if as_json else (1.0, progress)):
        raise click.ClickException(f"corral has not stopped within {bound:g}s")
    if not as_json:
        click.echo("drained")


@main.command()
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes.",
)
@click.option(
    "--sort",
    type=click.Choice(list(top_view.SORTS)),
    default="session",
    show_default=True,
    help="The first sort key (`s` switches it, `r` reverses it).",
)
@click.option(
    "--count",
    type=click.IntRange(1),
    metavar="N",
    help="Not in a terminal: print N tables, then exit (default: until interrupted).",
)
@config_option
@timeout_option
def top(interval: float, sort: str, count: int | None, config: Config, timeout: float) -> None:
    """A live table of sessions: q quits, s switches the sort key, k kills the selected one.

    When stdout is not a terminal, the table is printed again every --interval."""
    if sys.stdout.isatty() and sys.stdin.isatty() and count is None:
        top_view.live(config, timeout, interval, sort)
    else:
        try:
            top_view.plain(config, timeout, interval, count, sort)
        except KeyboardInterrupt:
            pass


def _socket_config(path: str | None) -> Config:
    """The config, or, if it does not load, just where its control socket is: a reload
    of a broken file must still reach corral, which refuses it, logs why and keeps the
    old one."""
    try:
        return load_config(path)
    except ConfigError:
        pass
    found = find_config_path(path)
    try:
        raw = msgspec.toml.decode(found.read_bytes()) if found else {}
        table = raw.get("supervisor", {}) if isinstance(raw, dict) else {}
        where = {k: v for k, v in table.items() if k in ("state_dir", "control_socket")}
        return Config(supervisor=msgspec.convert(where, SupervisorConfig))
    except (OSError, msgspec.MsgspecError, AttributeError):
        return _load(path)  # not even that: the error names the file and the key


@main.command()
@click.option(
    "--config",
    "config",
    metavar="PATH",
    callback=lambda ctx, param, path: _socket_config(path),
    help="corral.toml (default: $CORRAL_CONFIG, then ./corral.toml): where corral's "
    "control socket is; corral re-reads the file it was started with",
)
@timeout_option
@json_option
def reload(config: Config, timeout: float, as_json: bool) -> None:
    """Re-read the config (as SIGHUP does): limits, agent, delivery and webhook url/secret
    apply from the next turn; anything else needs a restart and is refused."""
    answer = ControlClient(config, timeout).reload()
    result = answer.body
    if as_json:
        click.echo(render.as_json(answer.plain))
    elif result.error:
        click.echo(f"reload refused, the old config stays: {result.error}", err=True)
    elif result.changed:
        click.echo(f"reloaded {result.path}: {', '.join(result.changed)}")
    else:
        click.echo(f"reloaded {result.path}: nothing changed")
    if result.error:
        sys.exit(EXIT_FAILED)


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command(name="check")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
def config_check(path: str | None) -> None:
    """Check a corral.toml as `serve` would: every key known, every value valid, the agent
    importable with valid options, the addresses and state dir usable.

    With no PATH: the file `serve` would use ($CORRAL_CONFIG, then ./corral.toml, then
    the built-in defaults)."""
    # imported here: only this command loads agent code
    from corral.cli.check import deep_check

    found = find_config_path(path)
    cfg = _load(None if found is None else str(found))
    shown = str(found) if found is not None else "no config file, the built-in defaults"
    problems = deep_check(cfg)
    if problems:
        raise click.ClickException("\n".join(f"{shown}: {p}" for p in problems))
    click.echo(
        f"{shown}: ok (agent {cfg.agent.entrypoint}, state in {cfg.state_path}, "
        f"http on {cfg.channels.http.listen}, metrics on {cfg.metrics.listen})"
    )


if __name__ == "__main__":
    main()
