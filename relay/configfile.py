"""``relay serve --config relay.toml``: settings from a TOML file, checked before use.

Keys are the setting names of docs/configuration.md (``redis_url``, ``max_payload``…),
at the top level of the file. A key Relay does not know is refused by name, with the
nearest known one: a misspelt limit silently left at its default is worse than a node
that does not start. Values must have the setting's type (TOML has them all); a list of
strings is accepted where a flag takes a comma-separated list. Flags and ``RELAY_*`` env
vars win over the file (see :func:`relay.config.resolve_settings`).
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import Field, fields
from typing import Any

from relay.config import Settings
from relay.errors import ConfigError

__all__ = ["load_config_file", "render_settings"]


def load_config_file(path: str) -> dict[str, Any]:
    """The typed settings of the TOML file at ``path``; ConfigError saying what is wrong."""
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} (or RELAY_CONFIG): no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path} (or RELAY_CONFIG): {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.replace("-", "_"), list(known), n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(
            f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)};"
            " the keys are the names in docs/configuration.md, e.g. redis_url"
        )
    return {name: _typed(known[name], value, path) for name, value in raw.items()}


def _kind(f: Field[Any]) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _typed(f: Field[Any], value: Any, path: str) -> Any:
    """``value`` as setting ``f`` takes it, or ConfigError naming the key (never a secret)."""
    kind = _kind(f)
    ok: Any = None
    if kind == "bool":
        ok = value if isinstance(value, bool) else None
    elif isinstance(value, bool):  # TOML's true is no number
        ok = None
    elif kind == "int":
        ok = value if isinstance(value, int) else None
    elif kind == "float":
        ok = float(value) if isinstance(value, int | float) else None
    elif kind.startswith("tuple"):
        if isinstance(value, str):
            ok = f.metadata["parse"](value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            ok = tuple(v.strip() for v in value if v.strip())
    elif isinstance(value, str):  # str, str | None
        ok = value
    if ok is None:
        shown = "a secret" if f.metadata.get("secret") else repr(value)
        want = {"tuple[str, ...]": "a list of strings"}.get(kind, kind.replace(" | None", ""))
        raise ConfigError(f"{path}: {f.name} must be {want}, not {shown}")
    choices = f.metadata.get("choices")
    if choices and ok not in choices:
        raise ConfigError(f"{path}: {f.name} must be one of {', '.join(choices)}, not {ok!r}")
    return ok


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def render_settings(settings: Settings, sources: dict[str, str]) -> str:
    """The effective settings as TOML a ``--config`` file could hold, secrets masked
    (``***``), each line saying where its value came from."""
    lines = ["# relay serve's effective settings; secrets masked. Source of each in its comment."]
    for name, value in settings.redacted().items():
        source = sources.get(name, "default")
        if name == "node_id" and source == "default":
            source = "default: the host name and a random suffix, new at each start"
        if value is None:
            lines.append(f"# {name} is unset  # {source}")
        else:
            lines.append(f"{name} = {_toml(value)}  # {source}")
    return "\n".join(lines) + "\n"
