"""Settings: one frozen object, built once from flags and ``RELAY_*`` environment variables.

Every setting has a flag ``--some-name`` and an env var ``RELAY_SOME_NAME``; the flag wins.
docs/configuration.md is generated from the same table (``relay serve --help`` shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from relay.auth import DEFAULT_LEEWAY, MIN_SECRET_BYTES
from relay.engine import EngineOptions
from relay.errors import ConfigError

__all__ = [
    "Settings",
    "add_arguments",
    "configuration_markdown",
    "mask_url",
    "resolve_settings",
    "setting_rows",
    "settings_from_args",
]


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&#\s]*(?:password|secret|token|key)[^=&#\s]*=)[^&#\s]*", re.IGNORECASE
)


def mask_url(url: str) -> str:
    """``url`` with its password (``user:***@``; a lone userinfo may be one, so ``***@``)
    and any password-like query value replaced, whatever the scheme: ``redis://``,
    ``rediss://``, ``redis+sentinel://`` and ``redis+cluster://`` with several hosts."""

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"

    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(userinfo, url))


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part for part in (p.strip() for p in text.split(",")) if part)


_POSITIVE = (
    "history_size",
    "history_ttl",
    "max_payload",
    "publish_batch_max",
    "send_queue_max",
    "handshake_timeout",
    "heartbeat",
    "client_frame_rate",
    "client_frame_burst",
    "client_ping_rate",
    "max_fragments",
    "max_request_head",
    "close_timeout",
    "redis_replica_timeout",
)
_NOT_NEGATIVE = (
    "token_leeway",
    "max_since_age",
    "max_token_ttl",
    "gap_repair_timeout",
    "start_timeout",  # 0: for ever
    "status_feeds",  # 0: no status page
    "max_early_messages",
    "redis_min_replicas",
    "compress_min_size",
    "sched_slice_ms",  # 0: the kernel's default
)


SCHED_SLICE_MS = (0.1, 100.0)
"""Linux's bounds for a task's own slice (it clamps to them silently; we refuse instead)."""


def _invalid(name: str, value: Any, rule: str) -> ConfigError:
    """The error for one setting, naming its flag and env var: what an operator edits."""
    return ConfigError(f"{_flag(name)} (or {_env(name)}) {rule}, not {value!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to know. Built once; never mutated."""

    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port to listen on"})
    redis_url: str | None = field(
        default=None,
        metadata={
            "help": "Redis URL (redis://, rediss://, unix://, redis+sentinel://hosts/service,"
            " redis+cluster://hosts);"
            " none means the single-node memory engine",
            "url": True,
        },
    )
    redis_min_replicas: int = field(
        default=0,
        metadata={
            "help": "replicas that must hold a publish (Redis WAIT) before the API acknowledges"
            " it; 0: the master's word"
        },
    )
    redis_replica_timeout: float = field(
        default=0.5,
        metadata={
            "help": "seconds a publish waits for --redis-min-replicas; then it fails (503,"
            " retry with the same mid)"
        },
    )
    node_id: str = field(default="", metadata={"help": "this node's id (default: host-random)"})
    auth_secret: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "HS256 secret(s) for connection tokens, comma-separated (rotation)",
            "parse": _comma_list,
            "secret": True,
        },
    )
    allow_anonymous: bool = field(
        default=False, metadata={"help": "accept connections without a token (demo only)"}
    )
    allow_weak_secret: bool = field(
        default=False,
        metadata={"help": f"start with an --auth-secret shorter than {MIN_SECRET_BYTES} bytes"},
    )
    token_audience: str | None = field(
        default=None,
        metadata={
            "help": "the aud claim every token must carry; unset, tokens with an aud are refused"
        },
    )
    max_token_ttl: float = field(
        default=0.0,
        metadata={"help": "longest token lifetime (exp - iat) accepted, in seconds; 0: no limit"},
    )
    api_key: str | None = field(
        default=None,
        metadata={"help": "Bearer key for /api/*; without one the API is off", "secret": True},
    )
    workers: int = field(default=1, metadata={"help": "node processes sharing the port"})
    worker_restart_delay: float = field(
        default=0.5,
        metadata={
            "help": "--workers: seconds before a crashed worker is restarted; doubles on each"
            " crash in a row"
        },
    )
    worker_restart_delay_max: float = field(
        default=30.0,
        metadata={
            "help": "--workers: longest restart delay; a worker that ran this long starts"
            " the doubling afresh"
        },
    )
    sched_slice_ms: float = field(
        default=0.0,
        metadata={
            "help": "CPU time slice in ms (0.1-100) each node process asks Linux's scheduler"
            " for (Linux 6.12+, no privilege needed): shorter, a woken node preempts busier"
            " processes on its cores sooner; 0: the kernel's default"
        },
    )
    log_format: str = field(
        default="console", metadata={"help": "json or console", "choices": ("json", "console")}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    bad_request_log_rate: float = field(
        default=1.0,
        metadata={
            "help": "http.bad_request log lines per second at most (the rest are counted);"
            " 0: every one"
        },
    )
    duplicates: str = field(
        default="replace",
        metadata={
            "help": "one session per client_id (replace) or fan-out to all (allow)",
            "choices": ("replace", "allow"),
        },
    )
    heartbeat: float = field(default=25.0, metadata={"help": "seconds between server pings"})
    history_size: int = field(default=100, metadata={"help": "history entries per BizId"})
    history_ttl: int = field(default=3600, metadata={"help": "seconds history lives"})
    dedupe_window: int = field(default=600, metadata={"help": "seconds a publish mid is kept"})
    key_prefix: str = field(default="relay", metadata={"help": "Redis key prefix"})
    max_payload: int = field(default=65536, metadata={"help": "bytes per published payload"})
    publish_batch_max: int = field(
        default=100,
        metadata={"help": 'events one POST /api/publish {"events": [...]} may carry (400 beyond)'},
    )
    max_message_size: int = field(
        default=65536, metadata={"help": "bytes per inbound WebSocket message (1009 beyond)"}
    )
    replay_limit: int = field(default=1000, metadata={"help": "entries replayed on resume at most"})
    gap_repair_timeout: float = field(
        default=5.0,
        metadata={
            "help": "seconds to retry history reads that fill a live-feed gap before the "
            "BizId's sessions end with 4509 (reconnect and resume)"
        },
    )
    send_queue_max: int = field(
        default=2000, metadata={"help": "frames queued per session before 4508"}
    )
    send_queue_max_bytes: int = field(
        default=8 * 1024 * 1024, metadata={"help": "bytes queued per session before 4508"}
    )
    send_timeout: float = field(
        default=10.0, metadata={"help": "seconds one socket write may block before abort"}
    )
    max_connections: int = field(
        default=20000, metadata={"help": "connections per node (1013 beyond)"}
    )
    max_pending_connects: int = field(
        default=10000,
        metadata={"help": "handshakes in progress per node; beyond, 1013 (herd control)"},
    )
    client_rate: float = field(
        default=20.0, metadata={"help": "inbound frames per second per session"}
    )
    client_burst: int = field(default=60, metadata={"help": "inbound frame burst per session"})
    client_frame_rate: float = field(
        default=100.0,
        metadata={
            "help": "WebSocket frames per second per connection, pings, pongs and fragments"
            " included (1008 beyond the burst)"
        },
    )
    client_frame_burst: int = field(
        default=300, metadata={"help": "WebSocket frame burst per connection"}
    )
    client_ping_rate: float = field(
        default=5.0,
        metadata={"help": "WebSocket pings answered per second per connection (others dropped)"},
    )
    max_request_head: int = field(
        default=32 * 1024,
        metadata={"help": "bytes of a WebSocket request head, however they arrive (400 beyond)"},
    )
    max_early_messages: int = field(
        default=32,
        metadata={
            "help": "client messages kept while its session opens (max-message-size bytes in"
            " all); later ones dropped"
        },
    )
    max_fragments: int = field(
        default=128,
        metadata={"help": "frames one inbound WebSocket message may span (1009 beyond)"},
    )
    close_timeout: float = field(
        default=2.0, metadata={"help": "seconds to wait for the client's close frame after ours"}
    )
    max_errors: int = field(
        default=10, metadata={"help": "error frames sent to a session before 1008"}
    )
    drain_grace: float = field(
        default=10.0,
        metadata={
            "help": "seconds from SIGTERM to exit: sessions closed 1012 over the first 60 %,"
            " what is still open in the last second left to the kernel as the process exits"
        },
    )
    close_flush_timeout: float = field(
        default=1.0, metadata={"help": "seconds to flush a session's queue before closing"}
    )
    close_linger: float = field(
        default=0.25, metadata={"help": "pause after the last frame before a close frame"}
    )
    token_leeway: float = field(
        default=DEFAULT_LEEWAY,
        metadata={"help": "seconds of clock skew tolerated on a token's exp and nbf"},
    )
    start_timeout: float = field(
        default=0.0,
        metadata={
            "help": "seconds a starting node waits for Redis (readyz 503 meanwhile), then"
            " exits 2; 0: for ever"
        },
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata={
            "help": "seconds a connection may take to send a whole request head;"
            " idle keep-alive connections close after as long"
        },
    )
    max_since_age: float = field(
        default=86400.0,
        metadata={"help": "a since older than this many seconds gets recovered=false; 0: no limit"},
    )
    status_feeds: int = field(
        default=16,
        metadata={
            "help": "status pages (GET /) open at once on this node, each one live feed"
            " (503 beyond); 0: no status page"
        },
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "browser Origins allowed to open /ws, comma-separated (HTTP 403 for others);"
            " empty: any",
            "parse": _comma_list,
        },
    )
    compress: bool = field(
        default=False,
        metadata={"help": "answer permessage-deflate offers (RFC 7692); off: never compress"},
    )
    compress_min_size: int = field(
        default=256,
        metadata={"help": "server frames shorter than this many bytes are sent uncompressed"},
    )
    compress_context_takeover: bool = field(
        default=False,
        metadata={
            "help": "a compressor per connection whose client allows it (smaller frames,"
            " more memory); off: each frame compressed on its own, once per event"
        },
    )
    compress_window_bits: int = field(
        default=12,
        metadata={"help": "LZ77 window (9-15 bits) of a per-connection compressor"},
    )

    def __post_init__(self) -> None:
        if not self.node_id:
            object.__setattr__(self, "node_id", f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise _invalid(name, getattr(self, name), "must be positive")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise _invalid(name, getattr(self, name), "must not be negative")
        if not 0 <= self.port <= 65535:
            raise _invalid("port", self.port, "must be 0-65535")
        if not 9 <= self.compress_window_bits <= 15:
            raise _invalid("compress_window_bits", self.compress_window_bits, "must be 9-15")
        low, high = SCHED_SLICE_MS
        if self.sched_slice_ms and not low <= self.sched_slice_ms <= high:
            raise _invalid(
                "sched_slice_ms",
                self.sched_slice_ms,
                f"must be 0 (the kernel's default) or {low:g}-{high:g} (ms)",
            )
        if self.duplicates not in ("replace", "allow"):
            raise _invalid("duplicates", self.duplicates, "must be 'replace' or 'allow'")
        if self.redis_min_replicas and not self.redis_url:
            raise _invalid(
                "redis_min_replicas",
                self.redis_min_replicas,
                "needs --redis-url: the memory engine has no replicas",
            )

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            dedupe_window=self.dedupe_window,
            max_payload=self.max_payload,
            node_ttl=max(3.0, 2 * self.heartbeat / 5),
            key_prefix=self.key_prefix,
            min_replicas=self.redis_min_replicas,
            replica_timeout=self.redis_replica_timeout,
        )

    def check_auth(self) -> None:
        """Refuse to run open by accident: a strong secret or an explicit anonymous mode."""
        if not self.auth_secret and not self.allow_anonymous:
            raise ConfigError(
                "no connection-token secret: pass --auth-secret SECRET (or RELAY_AUTH_SECRET),"
                " or --allow-anonymous to accept anyone (demo only)"
            )
        weak = [s for s in self.auth_secret if len(s.encode()) < MIN_SECRET_BYTES]
        if weak and not self.allow_weak_secret:
            raise ConfigError(
                f"--auth-secret: {len(weak)} secret(s) shorter than {MIN_SECRET_BYTES} bytes;"
                " tokens signed with a short secret can be forged by brute force. Use"
                " `openssl rand -hex 32`, or --allow-weak-secret for a test"
            )

    def __repr__(self) -> str:
        # The dataclass's own repr would print the secrets wherever settings are shown.
        shown = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({shown})"

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets replaced by '***'."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif f.metadata.get("url") and value:
                value = mask_url(value)
            out[f.name] = value
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "RELAY_" + name.upper()


def _shown_default(f: Any) -> str:
    """`` (default: X)`` for --help; nothing for secrets and for an empty default."""
    if f.metadata.get("secret") or f.default in (None, "", ()):
        return ""
    if isinstance(f.default, bool):
        return f" (default: {'on' if f.default else 'off'})"
    return f" (default: {f.default})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, defaulting to its env var."""
    for f in fields(Settings):
        help_text = f"{f.metadata.get('help', '')}{_shown_default(f)} [env {_env(f.name)}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kwargs)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a TOML file of these settings (keys as in docs/configuration.md, e.g."
        " redis_url); flags and env vars win over it [env RELAY_CONFIG]",
    )


def _convert(f: Any, raw: Any) -> Any:
    if "parse" in f.metadata and isinstance(raw, str):
        return f.metadata["parse"](raw)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ConfigError(
            f"{_flag(f.name)} (or {_env(f.name)}): {raw!r} is not a valid {kind}"
        ) from None
    return raw


def resolve_settings(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    file: Mapping[str, Any] | None = None,
    file_name: str = "file",
) -> tuple[Settings, dict[str, str]]:
    """The settings, and where each one came from: ``flag --x``, ``env RELAY_X``,
    ``file <name>`` or ``default``. Flags win over env vars, over the file, over defaults.

    ``file`` holds typed values already checked by :func:`relay.configfile.load_config_file`.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        source = f"flag {_flag(f.name)}"
        if raw is None and _env(f.name) in env:
            raw, source = env[_env(f.name)], f"env {_env(f.name)}"
        if raw is not None:
            values[f.name] = _convert(f, raw)
        elif file is not None and f.name in file:
            values[f.name], source = file[f.name], f"file {file_name}"
        else:
            source = "default"
        sources[f.name] = source
    return Settings(**values), sources


def settings_from_args(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    file: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """Flags win over ``RELAY_*`` env vars, over the config file's values, over defaults."""
    settings, _ = resolve_settings(args, env, file)
    return dataclasses.replace(settings, **overrides) if overrides else settings


def setting_rows() -> Sequence[tuple[str, str, str, str]]:
    """(flag, env, default, help) for docs and --help."""
    rows = []
    for f in fields(Settings):
        default = "" if f.metadata.get("secret") else repr(f.default)
        rows.append((_flag(f.name), _env(f.name), default, str(f.metadata.get("help", ""))))
    return rows


_CONFIG_NOTES = """
Notes:

- Boolean flags also have a `--no-…` form; env values `1 true yes on` mean true.
- `--auth-secret` takes several secrets, comma-separated: a token signed with any of them
  is accepted, so a secret can be rotated (add the new one, re-issue tokens, drop the old).
- `relay serve` refuses to start with neither `--auth-secret` nor `--allow-anonymous`.
- `--token-leeway` is added to a token's `exp` (and allowed on `nbf`): a session lives
  until `exp + leeway`. Tokens are checked only by the nodes, so keep clocks in sync.
- Each `--auth-secret` must be at least 32 bytes (`openssl rand -hex 32`); a shorter one
  stops the node at start unless `--allow-weak-secret` (tests only).
- `--token-audience relay`: tokens must carry `aud` "relay" (`issue_token(...,
  audience="relay")`); without it, a token with any `aud` is refused (4001).
  `--max-token-ttl` refuses tokens whose `exp - iat` is longer (0: no limit).
- The WebSocket limits (`--client-frame-rate`, `--client-frame-burst`,
  `--client-ping-rate`, `--max-fragments`, `--max-message-size`) bound what one client
  costs; docs/security.md gives the bound per connection and what happens beyond each.
- The Redis URL is logged with its password masked (`redis://:***@host/0`).
- `--handshake-timeout` bounds the time from TCP accept (or the end of the previous
  response) to a complete request head, so a client that sends half a request is cut
  off. It is aiohttp's keep-alive timeout, so an idle keep-alive HTTP connection also
  closes after it: a load balancer that keeps upstream connections open (nginx
  `keepalive` in an `upstream` block) should use a shorter `keepalive_timeout` there.
  An upgraded WebSocket is not affected.
- `--allowed-origins` entries are exact origins (`https://app.example.com`, compared
  case-insensitively, no path). A request without `Origin` is always let through:
  browsers always send one, WebSocketSharp and the SDKs do not.
- `--history-ttl` must be no longer on the nodes than on the publishers (both default to
  3600 s): the node's proof of `recovered` assumes a stream lives at least that long.
- Memory per BizId in Redis: the Stream keeps about `history_size` entries (`MAXLEN ~`
  trims whole radix nodes, so up to ~`history_size + 100`); each entry costs its payload
  plus ~40 bytes (id, `prev`, field names). With 200-byte payloads and the default 100
  entries that is ~25-50 KB per active BizId, released `history_ttl` after its last
  publish. A `mid` costs one small key for `dedupe_window` seconds.
- `--sched-slice-ms` (Linux 6.12 or later): each node process, and each `--workers`
  worker, asks the kernel's scheduler for this time slice at start (`sched_setattr`, no
  privilege needed) and logs `node.sched_slice` with the slice it got. Where the kernel
  refuses or ignores it (older than 6.12, a real-time or idle policy, a seccomp filter),
  one `node.sched_slice_refused` warning says why and the node runs on with the default
  slice (1.4 ms on 2 CPUs, 2.1 ms on 4). A shorter slice lets a woken process preempt a
  running one sooner. It is off by default: on a shared 2-CPU machine (2026-12-06,
  docs/benchmarks.md) 0.1 and 0.3 ms did not change the latency tail measurably; a
  node is mostly asleep, and a process waking from sleep already preempts.
- `--compress`: the same listener serves compressed and plain connections; a client that
  offers permessage-deflate gets it, others are not affected. By default every frame is
  compressed on its own (no context kept between frames), so one shared compressor
  serves the whole node and an event sent to several sessions is compressed once: no
  memory per connection (measured: 3.2-3.4 KB per idle connection, as without
  compression). That saves little on small events (a 116-byte event becomes ~92 bytes,
  for ~5 µs of CPU), hence `--compress-min-size`. With `--compress-context-takeover`, a
  connection whose client did not offer `server_no_context_takeover` gets its own
  compressor, made with its first compressed frame: small events then shrink to a fifth
  (116 → ~19 bytes), but each such connection holds ~30 KB more (measured 33 KB per
  connection in all, `--compress-window-bits 12`; a compressor takes ~18 KB at 10 bits,
  ~270 KB at 15). A client that compresses what it sends without
  `client_no_context_takeover` (browsers) makes its connection keep a ~43 KB inflater
  from its first compressed message on.
"""

_CONFIG_FILE = """
## Config file

`relay serve --config /etc/relay/relay.toml` (or `RELAY_CONFIG=…`) reads settings from a
TOML file. Its keys are the flags' names without `--`, with underscores, at the top level;
lists may be TOML arrays:

```toml
host = "0.0.0.0"
port = 8080
redis_url = "redis://:PASSWORD@redis.internal:6379/0"
auth_secret = ["NEW-SECRET-OF-32-BYTES-OR-MORE...", "OLD-SECRET-OF-32-BYTES-OR-MORE..."]
api_key = "…"
max_payload = 65536
allowed_origins = ["https://app.example.com"]
```

- A key Relay does not know stops the node, naming it and the nearest known one
  (`unknown setting max_paylod (did you mean max_payload?)`); so does a value of the wrong
  type (`max_payload must be int, not '64k'`), a missing file and invalid TOML. Each is one
  line on stderr and exit code 2.
- The file holds secrets: make it readable by the relay's user only (`chmod 600`), or keep
  the secrets in the environment (`RELAY_AUTH_SECRET`, `RELAY_API_KEY`), which wins.
- `relay config check` takes the same flags, environment and `--config` as `relay serve`
  and prints the settings a node would run with, as TOML with secrets shown as `***`, each
  line saying where its value came from (`# flag --port`, `# env RELAY_REDIS_URL`,
  `# file relay.toml`, `# default`). It exits 2 with the reason when `relay serve` would
  refuse to start (an unknown key, a weak secret, no secret and no `--allow-anonymous`).
"""


def configuration_markdown() -> str:
    """docs/configuration.md, generated so the docs cannot drift from the code."""
    out = [
        "# Configuration",
        "",
        "Every `relay serve` setting is a flag, an environment variable and a key of the",
        "config file (`--config relay.toml`, below): a flag wins over the environment, which",
        "wins over the file, which wins over the default.",
        "This table is generated from `relay/config.py` (`Settings`) by",
        "`python -c 'import relay.config as c; print(c.configuration_markdown(), end=\"\")'`;",
        "a test fails when it drifts.",
        "",
        "| flag | env | default | meaning |",
        "|---|---|---|---|",
    ]
    out += [f"| `{f}` | `{e}` | `{d}` | {h} |" for f, e, d, h in setting_rows()]
    return "\n".join(out) + "\n" + _CONFIG_NOTES + _CONFIG_FILE
