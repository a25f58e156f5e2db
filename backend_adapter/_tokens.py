"""Connection tokens: what a backend hands its clients so a relay node lets them in.

A token is an HS256 JWT signed with the secret the nodes are started with
(``relay serve --auth-secret``): ``sub`` is the client_id it grants, ``iat`` and ``exp``
bound its life. A node closes a connection with 4001 for a bad token, 4003 when ``sub``
is not the client_id in the URL and 4500 once it expired, so a client fetches a fresh
token from the backend and reconnects. Issue tokens only after authenticating the user
who will connect as ``client_id``: a token is the whole of Relay's access control.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

import jwt

from relay.errors import InvalidInput
from relay.wire import validate_client_id

__all__ = ["TOKEN_ALGORITHM", "issue_token"]

TOKEN_ALGORITHM: Final = "HS256"
_RESERVED: Final = frozenset({"sub", "iat", "exp", "aud"})


def issue_token(
    secret: str,
    client_id: str,
    ttl: int = 3600,
    *,
    now: float | None = None,
    audience: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign a token granting ``client_id`` a connection for ``ttl`` seconds from ``now``.

    ``secret`` is the nodes' ``--auth-secret``: at least 32 random bytes (a node refuses
    to start with a shorter one). ``now`` (Unix seconds, default the current time) is for
    tests and clock-skewed issuers. ``audience`` sets ``aud``: nodes accept it only when
    started with the same ``--token-audience`` (which then requires it), and refuse a
    token with an ``aud`` otherwise. ``extra_claims`` are added as they are; they may not
    set ``sub``, ``iat``, ``exp`` or ``aud``.

    Raises InvalidInput for an empty secret, a non-positive ttl or a reserved claim, and
    InvalidClientId for a malformed client_id.
    """
    if not isinstance(secret, str) or not secret:
        raise InvalidInput("secret must be a non-empty string")
    validate_client_id(client_id)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise InvalidInput("ttl must be a positive number of seconds")
    claims = dict(extra_claims or {})
    clash = _RESERVED.intersection(claims)
    if clash:
        raise InvalidInput(f"extra_claims may not set {', '.join(sorted(clash))}")
    issued = int(time.time() if now is None else now)
    claims.update(sub=client_id, iat=issued, exp=issued + ttl)
    if audience is not None:
        if not isinstance(audience, str) or not audience:
            raise InvalidInput("audience must be a non-empty string")
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM)
