"""`relay serve --config relay.toml` and `relay config check` (relay/configfile.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from relay.config import add_arguments, resolve_settings
from relay.configfile import load_config_file
from relay.errors import ConfigError
from tests.support.ports import free_port, wait_port
from tests.support.timing import MS

RELAY = [sys.executable, "-m", "relay"]
ROOT = Path(__file__).resolve().parents[1]
SECRET = "a-connection-token-secret-of-40-bytes!!!"
PASSWORD = "redis-password-in-the-file"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _write(tmp_path: Path, text: str, name: str = "relay.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [*RELAY, *argv],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )


def test_configfile_flags_win_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    """Each source wins over the next, and each value says where it came from."""
    path = _write(
        tmp_path,
        "port = 9001\nheartbeat = 7\nhistory_size = 50\n"
        'allowed_origins = ["https://a.example", "https://b.example"]\n',
    )
    env = {"RELAY_PORT": "9002", "RELAY_HEARTBEAT": "8.5"}
    settings, sources = resolve_settings(
        _parse("--port", "9003"), env, load_config_file(path), path
    )
    assert (settings.port, sources["port"]) == (9003, "flag --port")
    assert (settings.heartbeat, sources["heartbeat"]) == (8.5, "env RELAY_HEARTBEAT")
    assert (settings.history_size, sources["history_size"]) == (50, f"file {path}")
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.history_ttl, sources["history_ttl"]) == (3600, "default")


def test_configfile_unknown_keys_are_refused_by_name(tmp_path: Path) -> None:
    """Every unknown key is named, with the nearest known setting."""
    path = _write(tmp_path, 'max_paylod = 10\nredis-url = "redis://x"\nport = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(caught.value).startswith(
        f"{path}: unknown settings max_paylod (did you mean max_payload?),"
        " redis-url (did you mean redis_url?);"
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('max_payload = "64k"', "max_payload must be int, not '64k'"),
        ("allow_anonymous = 1", "allow_anonymous must be bool"),
        ('log_format = "xml"', "log_format must be one of json, console"),
        ("heartbeat = true", "heartbeat must be float"),
        (f'api_key = ["{SECRET}"]', "api_key must be str, not a secret"),
        ("port = ", "not valid TOML"),
    ],
)
def test_configfile_wrong_values_name_the_key_never_the_secret(
    tmp_path: Path, text: str, needle: str
) -> None:
    """A value of the wrong type names its key; a secret's value is never echoed."""
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match="^" + path) as caught:
        load_config_file(path)
    assert needle in str(caught.value) and SECRET not in str(caught.value)


def test_config_check_prints_effective_settings_masked_with_sources(tmp_path: Path) -> None:
    """`relay config check` shows what serve would use, secrets masked, each value's source;
    its output is itself a valid config file."""
    path = _write(
        tmp_path,
        f'redis_url = "redis://:{PASSWORD}@db.internal:6379/0"\n'
        f'auth_secret = ["{SECRET}"]\napi_key = "{SECRET}-api"\nport = 9001\n',
    )
    out = _run("config", "check", "--config", path, "--port", "9005", env={"RELAY_HEARTBEAT": "9"})
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout and SECRET not in out.stdout
    lines = out.stdout.splitlines()
    assert f'redis_url = "redis://:***@db.internal:6379/0"  # file {path}' in lines
    assert f'auth_secret = "***"  # file {path}' in lines
    assert "port = 9005  # flag --port" in lines
    assert "heartbeat = 9.0  # env RELAY_HEARTBEAT" in lines
    assert "history_size = 100  # default" in lines
    again = _write(tmp_path, out.stdout, "effective.toml")
    assert load_config_file(again)["port"] == 9005
    assert tomllib.loads(out.stdout)["max_payload"] == 65536


def test_config_check_refuses_what_serve_refuses(tmp_path: Path) -> None:
    """No secret and no --allow-anonymous, or a short secret in the file: one line, exit 2."""
    bare = _run("config", "check")
    assert bare.returncode == 2 and "--allow-anonymous" in bare.stderr
    weak = _write(tmp_path, 'auth_secret = "short"\n')
    out = _run("config", "check", "--config", weak)
    assert out.returncode == 2 and "shorter than 32 bytes" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    missing = _run("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert (
        missing.stderr
        == f"relay: --config {tmp_path / 'nope.toml'} (or RELAY_CONFIG): no such file\n"
    )


def test_serve_with_config_file_listens_where_the_file_says(tmp_path: Path) -> None:
    """A node started with only --config takes its port, API key and mode from the file."""
    port = free_port()
    path = _write(
        tmp_path,
        f'host = "127.0.0.1"\nport = {port}\nallow_anonymous = true\napi_key = "from-file"\n'
        'log_level = "error"\n',
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    node = subprocess.Popen([*RELAY, "serve"], cwd=ROOT, env={**clean, "RELAY_CONFIG": path})
    try:
        wait_port(port, 20_000 * MS)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/nodes", headers={"Authorization": "Bearer from-file"}
        )
        with urllib.request.urlopen(request, timeout=10_000 * MS) as response:
            assert response.status == 200 and "nodes" in json.loads(response.read())
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(20_000 * MS) == 0
