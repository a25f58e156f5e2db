"""Connection tokens and API keys. Pure: no I/O.

A token is an HS256 JWT with ``sub`` = client_id and ``exp``, issued by the backend with
``backend_adapter.issue_token``. Nodes only verify; several secrets may be valid at once
so a secret can be rotated without a flag day. Error messages never echo the token.

An ``aud`` claim is accepted only by a node started with ``--token-audience`` (which then
requires it), so a token minted for another service is never taken for one of ours.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

import jwt

from relay.errors import AuthError
from relay.protocol import CloseCode

__all__ = [
    "DEFAULT_LEEWAY",
    "MIN_SECRET_BYTES",
    "api_key_matches",
    "bearer_token",
    "verify_token",
]

DEFAULT_LEEWAY = 30.0
"""Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

MIN_SECRET_BYTES = 32
"""Shortest HS256 secret a node starts with (RFC 7518 §3.2: a key of the hash's size)."""


def verify_token(
    token: str | None,
    secrets: Sequence[str],
    client_id: str,
    *,
    leeway: float = DEFAULT_LEEWAY,
    audience: str | None = None,
    max_ttl: float = 0.0,
    now: float | None = None,
) -> float:
    """Check ``token`` grants ``client_id``; return its expiry (epoch seconds).

    Raises AuthError whose ``close_code`` is 4001 (missing, invalid, ``nbf`` still in the
    future, an ``aud`` other than ``audience``, a lifetime over ``max_ttl``), 4003
    (another client_id) or 4500 (expired). ``leeway`` is the clock skew tolerated on
    ``exp``, ``nbf`` and ``iat`` (``--token-leeway``). With ``audience``
    (``--token-audience``) the token must carry that ``aud``; without it, any ``aud`` is
    refused. ``max_ttl`` (``--max-token-ttl``, 0: no limit) bounds ``exp - iat`` (``exp -
    now`` for a token without ``iat``).
    """
    if not token:
        raise AuthError("missing token", CloseCode.UNAUTHORIZED)
    # A JWT is ASCII (base64url and dots); PyJWT raises UnicodeEncodeError on the rest.
    if len(token) > 4096 or not token.isascii():
        raise AuthError("invalid token", CloseCode.UNAUTHORIZED)
    required = ["exp", "sub", "aud"] if audience else ["exp", "sub"]
    expired = immature = False
    refusal: str | None = None
    for secret in secrets:
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                leeway=leeway,
                audience=audience,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            expired = True
            continue
        except jwt.ImmatureSignatureError:
            immature = True
            continue
        except jwt.InvalidAudienceError:  # signed with this secret: the claims are checked last
            refusal = (
                "token audience does not match this node's --token-audience"
                if audience
                else "token has an audience (aud); this node was started without --token-audience"
            )
            continue
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "aud":
                refusal = "token has no audience (aud); this node requires one"
            continue
        except jwt.PyJWTError:
            continue
        if claims.get("sub") != client_id:
            raise AuthError("token does not grant this client_id", CloseCode.FORBIDDEN)
        expires = float(claims["exp"])
        if max_ttl > 0:
            issued = claims.get("iat")
            start = float(issued) if isinstance(issued, int | float) else _now(now)
            if expires - start > max_ttl + leeway:
                raise AuthError(
                    "token lifetime exceeds this node's --max-token-ttl", CloseCode.UNAUTHORIZED
                )
        return expires + leeway
    if expired:
        raise AuthError("token expired", CloseCode.TOKEN_EXPIRED)
    if refusal is not None:
        raise AuthError(refusal, CloseCode.UNAUTHORIZED)
    if immature:
        raise AuthError("token not yet valid", CloseCode.UNAUTHORIZED)
    raise AuthError("invalid token", CloseCode.UNAUTHORIZED)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


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
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: compare them as bytes.
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), api_key.encode())
