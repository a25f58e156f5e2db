"""Connection tokens and API keys. Pure: no I/O.

A token is an HS256 JWT with ``sub`` = client_id and ``exp``, issued by the backend with
``backend_adapter.issue_token``. Nodes only verify; several secrets may be valid at once
so a secret can be rotated without a flag day. Error messages never echo the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import jwt

from relay.errors import AuthError
from relay.protocol import CloseCode

__all__ = ["DEFAULT_LEEWAY", "api_key_matches", "bearer_token", "verify_token"]

DEFAULT_LEEWAY = 30.0
"""Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""


def verify_token(
    token: str | None,
    secrets: Sequence[str],
    client_id: str,
    *,
    leeway: float = DEFAULT_LEEWAY,
) -> float:
    """Check ``token`` grants ``client_id``; return its expiry (epoch seconds).

    Raises AuthError whose ``close_code`` is 4001 (missing, invalid, or ``nbf`` still
    in the future), 4003 (another client_id) or 4500 (expired). ``leeway`` is the
    clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (``--token-leeway``).
    """
    if not token:
        raise AuthError("missing token", CloseCode.UNAUTHORIZED)
    if len(token) > 4096:
        raise AuthError("invalid token", CloseCode.UNAUTHORIZED)
    expired = immature = False
    for secret in secrets:
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                leeway=leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            expired = True
            continue
        except jwt.ImmatureSignatureError:
            immature = True
            continue
        except jwt.PyJWTError:
            continue
        if claims.get("sub") != client_id:
            raise AuthError("token does not grant this client_id", CloseCode.FORBIDDEN)
        return float(claims["exp"]) + leeway
    if expired:
        raise AuthError("token expired", CloseCode.TOKEN_EXPIRED)
    if immature:
        raise AuthError("token not yet valid", CloseCode.UNAUTHORIZED)
    raise AuthError("invalid token", CloseCode.UNAUTHORIZED)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def api_key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header."""
    presented = bearer_token(header) or ""
    return hmac.compare_digest(presented.encode(), api_key.encode())
