"""The `corral` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import click

from corral.protocol.config import Config, ConfigError, load_config, split_listen

DEFAULT_TIMEOUT = 5.0


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: every AI-agent chat session in its own bounded worker process."""


@main.command()
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="corral.toml (default: $CORRAL_CONFIG, ./corral.toml)",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def serve(config_path: str | None, log_level: str) -> None:
    """Run the supervisor."""
    from corral.supervisor.app import serve as run

    config = _load(config_path)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    sys.exit(asyncio.run(run(config)))


def _http_base(config: Config) -> str:
    host, port = split_listen(config.channels.http.listen, "channels.http.listen")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _post_message(
    config: Config, body: dict[str, Any], wait: float | None, timeout: float
) -> tuple[int, Any]:
    import aiohttp

    url = _http_base(config) + "/v1/messages"
    params = {"wait": str(wait)} if wait is not None else {}
    headers = {}
    token = os.environ.get("CORRAL_TOKEN") or config.channels.http.token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    client_timeout = aiohttp.ClientTimeout(total=timeout + (wait or 0))
    async with aiohttp.ClientSession(timeout=client_timeout) as http:
        async with http.post(url, json=body, params=params, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


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
@click.option("--json", "as_json", is_flag=True, help="Print the response body as JSON.")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for corral to answer (on top of --wait).",
)
@click.option("--config", "config_path", metavar="PATH")
def send(
    session: str,
    text: str,
    wait: float | None,
    message_id: str | None,
    as_json: bool,
    timeout: float,
    config_path: str | None,
) -> None:
    """Send TEXT to SESSION over the HTTP channel."""
    import aiohttp

    config = _load(config_path)
    body: dict[str, Any] = {"session": session, "text": text}
    if message_id:
        body["id"] = message_id
    try:
        status, data = asyncio.run(_post_message(config, body, wait, timeout))
    except (aiohttp.ClientConnectionError, OSError) as e:
        raise click.ClickException(
            f"cannot reach corral at {_http_base(config)}: {e}. Is 'corral serve' running?"
        ) from None
    except TimeoutError:
        raise click.ClickException(
            f"corral did not answer within {timeout + (wait or 0):g}s"
        ) from None
    if as_json:
        click.echo(json.dumps(data))
    if status >= 400:
        if not as_json:
            click.echo(f"error {status}: {data.get('error', data)}", err=True)
        sys.exit(1)
    if as_json:
        sys.exit(1 if data.get("status") == "error" else 0)
    if wait is None:
        click.echo(f"accepted {data['id']}")
        return
    for reply in data.get("replies", []):
        click.echo(reply["text"], err=reply["kind"] == "error")
    if data.get("status") == "pending":
        click.echo(
            f"no reply within {wait:g}s (message {data['id']} is still queued or running)", err=True
        )
        sys.exit(3)
    if data.get("status") == "error":
        sys.exit(1)


if __name__ == "__main__":
    main()
