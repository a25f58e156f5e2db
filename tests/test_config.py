"""Settings from flags and RELAY_* env vars; the generated docs stay in step."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from relay.config import Settings, add_arguments, configuration_markdown, settings_from_args
from relay.errors import ConfigError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_settings_flag_wins_over_env() -> None:
    """A flag overrides RELAY_<FLAG>, which overrides the default."""
    env = {"RELAY_PORT": "9001", "RELAY_HEARTBEAT": "7.5", "RELAY_REDIS_URL": "redis://x"}
    settings = settings_from_args(_parse("--port", "9002"), env)
    assert settings.port == 9002
    assert settings.heartbeat == 7.5
    assert settings.redis_url == "redis://x"


def test_settings_secrets_list_and_booleans_from_env() -> None:
    """Comma-separated secrets become a tuple; boolean env values are parsed."""
    env = {"RELAY_AUTH_SECRET": "old, new", "RELAY_ALLOW_ANONYMOUS": "true"}
    settings = settings_from_args(_parse(), env)
    assert settings.auth_secret == ("old", "new")
    assert settings.allow_anonymous is True


def test_settings_invalid_number_names_the_flag() -> None:
    """A non-numeric value is a ConfigError that names the flag."""
    with pytest.raises(ConfigError, match="--port"):
        settings_from_args(_parse(), {"RELAY_PORT": "eighty"})


def test_settings_refuse_open_node_without_secret() -> None:
    """No secret and no --allow-anonymous: the error says which flag to add."""
    with pytest.raises(ConfigError, match=r"--auth-secret .* --allow-anonymous"):
        Settings().check_auth()
    Settings(allow_anonymous=True).check_auth()
    Settings(auth_secret=("s" * 32,)).check_auth()


def test_settings_refuse_a_secret_shorter_than_32_bytes() -> None:
    """--auth-secret abc (or one short secret of a rotation) is refused at start, unless
    --allow-weak-secret; the message says how to make a strong one."""
    strong = "0123456789abcdef" * 2
    for secrets in (("abc",), (strong, "x" * 31)):
        with pytest.raises(ConfigError, match=r"shorter than 32 bytes.*openssl rand"):
            Settings(auth_secret=secrets).check_auth()
        Settings(auth_secret=secrets, allow_weak_secret=True).check_auth()
    env = {"RELAY_AUTH_SECRET": "abc", "RELAY_ALLOW_WEAK_SECRET": "1"}
    settings_from_args(_parse(), env).check_auth()


def test_settings_redacted_hides_secrets() -> None:
    """Secrets never appear in the loggable view of the settings."""
    shown = Settings(auth_secret=("hunter2",), api_key="k3y").redacted()
    assert "hunter2" not in repr(shown) and "k3y" not in repr(shown)


def test_settings_repr_hides_secrets() -> None:
    """repr(settings) (an f-string, a traceback's argument, a log's value) shows no secret."""
    settings = Settings(auth_secret=("hunter2",), api_key="k3y", redis_url="redis://:PW@db/0")
    assert "hunter2" not in repr(settings) and "k3y" not in repr(settings)
    assert "PW" not in repr(settings) and "redis://:***@db/0" in repr(settings)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:PASSWORD@db.internal/0", "redis://:***@db.internal/0"),
        ("rediss://relay:PASSWORD@db:6380/0", "rediss://relay:***@db:6380/0"),
        (
            "redis+sentinel://:PASSWORD@s1:26379,s2:26379/mymaster/0?sentinel_password=PASSWORD",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0?sentinel_password=***",
        ),
        ("redis+cluster://u:PASS@WORD@c1:7000,c2:7000", "redis+cluster://u:***@c1:7000,c2:7000"),
        ("redis://db:6379/0?password=PASSWORD&db=1", "redis://db:6379/0?password=***&db=1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_settings_redacted_masks_redis_url_passwords(url: str, shown: str) -> None:
    """The loggable settings keep the Redis URL's hosts but never its password."""
    assert Settings(redis_url=url).redacted()["redis_url"] == shown


def test_configuration_docs_match_settings() -> None:
    """docs/configuration.md is exactly what the Settings table generates."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown()


def test_settings_sched_slice_is_milliseconds_within_linux_bounds() -> None:
    """--sched-slice-ms takes 0 or 0.1-100 (ms) from a flag, env or the file; beyond, a
    ConfigError names the flag, the env var and the range instead of Linux's silent clamp."""
    assert settings_from_args(_parse()).sched_slice_ms == 0.0
    assert settings_from_args(_parse("--sched-slice-ms", "0.3")).sched_slice_ms == 0.3
    assert settings_from_args(_parse(), {"RELAY_SCHED_SLICE_MS": "100"}).sched_slice_ms == 100
    assert settings_from_args(_parse(), file={"sched_slice_ms": 0.1}).sched_slice_ms == 0.1
    for bad in ("0.05", "150", "nan"):
        with pytest.raises(ConfigError) as info:
            settings_from_args(_parse("--sched-slice-ms", bad))
        assert str(info.value) == (
            f"--sched-slice-ms (or RELAY_SCHED_SLICE_MS) must be 0 (the kernel's default)"
            f" or 0.1-100 (ms), not {float(bad)!r}"
        )
    with pytest.raises(ConfigError, match=r"RELAY_SCHED_SLICE_MS.*must not be negative"):
        settings_from_args(_parse(), {"RELAY_SCHED_SLICE_MS": "-1"})
    with pytest.raises(ConfigError, match=r"--sched-slice-ms .*'fast' is not a valid float"):
        settings_from_args(_parse(), {"RELAY_SCHED_SLICE_MS": "fast"})
