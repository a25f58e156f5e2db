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
    Settings(auth_secret=("s",)).check_auth()


def test_settings_redacted_hides_secrets() -> None:
    """Secrets never appear in the loggable view of the settings."""
    shown = Settings(auth_secret=("hunter2",), api_key="k3y").redacted()
    assert "hunter2" not in repr(shown) and "k3y" not in repr(shown)


def test_configuration_docs_match_settings() -> None:
    """docs/configuration.md is exactly what the Settings table generates."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown()
