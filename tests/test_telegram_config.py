"""[channels.telegram.NAME]: defaults, validation, and the token read at start."""

from __future__ import annotations

import pytest

from corral.supervisor.config import ConfigError, TelegramConfig, parse_config, telegram_tokens

TOKEN = "123456789:AAFakeTokenForCorralTests_0123456789x"


def test_any_number_of_bots_with_defaults():
    cfg = parse_config(
        b"[channels.telegram.support]\n"
        b'[channels.telegram.ops]\ntoken_env = "OPS_TOKEN"\napi_url = "http://127.0.0.1:8081"\n'
        b'sessions = "topic"\nallowed_chats = [-1001234567890, 42]\n'
    )
    assert cfg.channels.telegram["support"] == TelegramConfig()
    assert TelegramConfig().token_env == "TELEGRAM_BOT_TOKEN"
    assert TelegramConfig().api_url == "https://api.telegram.org"
    ops = cfg.channels.telegram["ops"]
    assert (ops.token_env, ops.sessions, ops.allowed_chats) == (
        "OPS_TOKEN",
        "topic",
        [-1001234567890, 42],
    )
    assert parse_config(b"").channels.telegram == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'[channels.telegram.main]\nsessions = "thread"\n', "sessions: Invalid enum value"),
        (b'[channels.telegram.main]\ntoken = "123:abc"\n', "token: unknown key"),
        (b'[channels.telegram.main]\nallowed_chats = ["@x"]\n', "allowed_chats[0]"),
        (
            b'[channels.telegram.main]\ntoken_env = "123:abcdef"\n',
            "channels.telegram.main.token_env",
        ),
        (
            b'[channels.telegram.main]\napi_url = "api.telegram.org"\n',
            "channels.telegram.main.api_url",
        ),
        (b'[channels.telegram."a b"]\n', "channels.telegram.a b: names are"),
        (
            b"[channels.telegram.a]\n[channels.telegram.b]\n",
            "channels.telegram.b.token_env: TELEGRAM_BOT_TOKEN is also the token of "
            "channels.telegram.a",
        ),
        (
            b'[channels.telegram.a]\n[channels.webhook.telegram]\nurl = "http://x"\n',
            "channels.webhook.telegram: the name is taken",
        ),
    ],
)
def test_bad_telegram_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "corral.toml")
    assert str(e.value).startswith("corral.toml: ")
    assert message in str(e.value)


def test_the_token_is_read_from_its_variable_at_start():
    cfg = parse_config(b'[channels.telegram.main]\ntoken_env = "MAIN_TOKEN"\n')
    assert telegram_tokens(cfg, {"MAIN_TOKEN": f" {TOKEN}\n"}) == {"main": TOKEN}


def test_a_missing_or_malformed_token_names_the_key_and_never_shows_the_value():
    cfg = parse_config(b'[channels.telegram.main]\ntoken_env = "MAIN_TOKEN"\n')
    with pytest.raises(ConfigError) as missing:
        telegram_tokens(cfg, {})
    assert str(missing.value).startswith("channels.telegram.main.token_env: ")
    assert "MAIN_TOKEN is not set" in str(missing.value)
    with pytest.raises(ConfigError) as malformed:
        telegram_tokens(cfg, {"MAIN_TOKEN": "not-a-token-s3cr3t"})
    assert str(malformed.value).startswith("channels.telegram.main.token_env: ")
    assert "s3cr3t" not in str(malformed.value)


def test_two_bots_with_the_same_token_are_refused():
    cfg = parse_config(
        b'[channels.telegram.a]\ntoken_env = "A"\n[channels.telegram.b]\ntoken_env = "B"\n'
    )
    with pytest.raises(ConfigError, match=r"channels\.telegram\.b\.token_env: .*same token"):
        telegram_tokens(cfg, {"A": TOKEN, "B": TOKEN})
