"""Unit tests for relay.auth: connection tokens, Bearer headers, API keys."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from relay.auth import DEFAULT_LEEWAY, api_key_matches, bearer_token, verify_token
from relay.errors import AuthError
from relay.protocol import CloseCode

# HMAC keys at least as long as the hash (PyJWT warns below that; warnings are errors).
SECRET = "relay-test-secret-0123456789abcdef"
NEXT_SECRET = "relay-next-secret-fedcba9876543210"
LONG_SECRET = "relay-long-secret-" + "0123456789abcdef" * 3  # 66 bytes, enough for HS512


def make_token(
    sub: str | None = "cml",
    exp_in: float | None = 600,
    *,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token signed with PyJWT directly; None drops the claim."""
    payload: dict[str, Any] = dict(claims)
    if sub is not None:
        payload["sub"] = sub
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return jwt.encode(payload, secret, algorithm=algorithm)


def refused(token: str | None, secrets: list[str], client_id: str = "cml") -> AuthError:
    """The AuthError verify_token raises for this token."""
    with pytest.raises(AuthError) as excinfo:
        verify_token(token, secrets, client_id)
    assert not token or token not in str(excinfo.value)  # never echo the token
    return excinfo.value


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# -- verify_token --------------------------------------------------------------------------


def test_verify_token_valid_returns_expiry_plus_leeway() -> None:
    """A valid token returns its exp plus the leeway, as epoch seconds."""
    exp = int(time.time()) + 600
    token = jwt.encode({"sub": "cml", "exp": exp}, SECRET, algorithm="HS256")
    assert verify_token(token, [SECRET], "cml") == exp + DEFAULT_LEEWAY
    assert verify_token(token, [SECRET], "cml", leeway=5) == exp + 5


@pytest.mark.parametrize("token", [None, ""])
def test_verify_token_missing(token: str | None) -> None:
    """No token closes with 4001."""
    error = refused(token, [SECRET])
    assert error.close_code == CloseCode.UNAUTHORIZED and "missing" in str(error)


def test_verify_token_oversize() -> None:
    """A token over 4096 characters is refused with 4001 before decoding."""
    assert refused(make_token(pad="x" * 4096), [SECRET]).close_code == 4001


@pytest.mark.parametrize("token", ["junk", "a.b.c", "..", "eyJ.eyJ.sig"])
def test_verify_token_malformed(token: str) -> None:
    """A token that is not a JWT closes with 4001."""
    assert refused(token, [SECRET]).close_code == 4001


def test_verify_token_wrong_secret() -> None:
    """A token signed with another secret closes with 4001."""
    assert refused(make_token(secret=NEXT_SECRET), [SECRET]).close_code == 4001


def test_verify_token_sub_mismatch() -> None:
    """A valid token for another client_id closes with 4003."""
    error = refused(make_token(sub="someone-else"), [SECRET])
    assert error.close_code == CloseCode.FORBIDDEN


def test_verify_token_expired_beyond_leeway() -> None:
    """A token expired longer ago than the leeway closes with 4500."""
    error = refused(make_token(exp_in=-(DEFAULT_LEEWAY + 30)), [SECRET])
    assert error.close_code == CloseCode.TOKEN_EXPIRED


def test_verify_token_expired_within_leeway() -> None:
    """A token expired less than the leeway ago is still accepted."""
    exp = int(time.time()) - 10
    token = jwt.encode({"sub": "cml", "exp": exp}, SECRET, algorithm="HS256")
    assert verify_token(token, [SECRET], "cml") == exp + DEFAULT_LEEWAY


def test_verify_token_missing_exp() -> None:
    """A token without exp (it would never expire) closes with 4001."""
    assert refused(make_token(exp_in=None), [SECRET]).close_code == 4001


def test_verify_token_missing_sub() -> None:
    """A token without sub grants no client_id: 4001."""
    assert refused(make_token(sub=None), [SECRET]).close_code == 4001


def test_verify_token_not_yet_valid() -> None:
    """A token whose nbf is beyond the leeway in the future closes with 4001."""
    token = make_token(nbf=int(time.time() + 3600))
    assert refused(token, [SECRET]).close_code == 4001


def test_verify_token_alg_none() -> None:
    """An unsigned token (alg none) is refused with 4001."""
    token = jwt.encode({"sub": "cml", "exp": int(time.time()) + 600}, None, algorithm="none")
    assert refused(token, [SECRET]).close_code == 4001


def test_verify_token_alg_none_forged_header() -> None:
    """A hand-made alg-none token with an empty signature is refused with 4001."""
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'cml', 'exp': 2**40})}."
    assert refused(token, [SECRET]).close_code == 4001


def test_verify_token_hs512_refused() -> None:
    """A token signed with the right secret but HS512 is refused: only HS256 is allowed."""
    token = make_token(secret=LONG_SECRET, algorithm="HS512")
    assert refused(token, [LONG_SECRET]).close_code == 4001


def test_verify_token_tampered_payload() -> None:
    """Changing the sub of a signed token breaks its signature: 4001, not 4003 or success."""
    header, _, signature = make_token(sub="cml").split(".")
    forged = f"{header}.{b64({'sub': 'admin', 'exp': int(time.time()) + 600})}.{signature}"
    assert refused(forged, [SECRET], client_id="admin").close_code == 4001


def test_verify_token_tampered_header_alg() -> None:
    """Relabelling an HS256 token as HS512 makes it invalid: 4001."""
    _, payload, signature = make_token().split(".")
    forged = f"{b64({'alg': 'HS512', 'typ': 'JWT'})}.{payload}.{signature}"
    assert refused(forged, [SECRET]).close_code == 4001


@pytest.mark.parametrize("signer", [SECRET, NEXT_SECRET])
def test_verify_token_rotation_any_listed_secret(signer: str) -> None:
    """With two secrets configured, tokens signed by either are accepted."""
    assert verify_token(make_token(secret=signer), [SECRET, NEXT_SECRET], "cml") > time.time()


def test_verify_token_rotation_unknown_secret() -> None:
    """With two secrets configured, a third secret's token closes with 4001."""
    assert refused(make_token(secret=LONG_SECRET), [SECRET, NEXT_SECRET]).close_code == 4001


def test_verify_token_rotation_expired_under_second_secret() -> None:
    """An expired token signed by the second secret is reported expired (4500), not invalid."""
    token = make_token(secret=NEXT_SECRET, exp_in=-3600)
    assert refused(token, [SECRET, NEXT_SECRET]).close_code == 4500


def test_verify_token_no_secrets() -> None:
    """With no secret configured, nothing verifies: 4001."""
    assert refused(make_token(), []).close_code == 4001


# -- headers and API keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer ", None),
        ("Bearer", None),
        ("Basic dXNlcjpwdw==", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_parsing(header: str | None, expected: str | None) -> None:
    """Only 'Bearer <token>' (scheme case-insensitive) yields a token."""
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer k3y-secret", True),
        ("bearer k3y-secret", True),
        ("Bearer k3y-secreT", False),
        ("Bearer k3y-secret-and-more", False),
        ("Basic k3y-secret", False),
        ("k3y-secret", False),
        ("", False),
        (None, False),
    ],
)
def test_api_key_matches(header: str | None, expected: bool) -> None:
    """The key matches only in a Bearer header, exactly."""
    assert api_key_matches(header, "k3y-secret") is expected


def test_api_key_matches_non_ascii() -> None:
    """Non-ASCII keys compare by their UTF-8 bytes without raising."""
    assert api_key_matches("Bearer clé", "clé") is True
    assert api_key_matches("Bearer cle", "clé") is False


def test_api_key_matches_bytes_that_are_not_utf8() -> None:
    """A header aiohttp decoded from non-UTF-8 bytes (surrogates) is a mismatch, not a
    UnicodeEncodeError (which was an HTTP 500 and a traceback)."""
    assert api_key_matches("Bearer \udcff", "k3y-secret") is False


@pytest.mark.parametrize("token", ["\xff", "\udcff", "é.é.é", make_token() + "é"])
def test_verify_token_non_ascii_is_invalid(token: str) -> None:
    """A token that is not ASCII (a JWT never is) is 4001, not a UnicodeEncodeError."""
    error = refused(token, [SECRET])
    assert (error.close_code, str(error)) == (4001, "invalid token")


def test_verify_token_audience_refused_without_a_configured_audience() -> None:
    """A token with aud on a node without --token-audience: 4001 saying why."""
    error = refused(make_token(aud="relay"), [SECRET])
    assert error.close_code == 4001
    assert (
        str(error) == "token has an audience (aud); this node was started without --token-audience"
    )


def test_verify_token_audience_required_and_matched_when_configured() -> None:
    """With --token-audience, the token's aud must be it: missing or other is 4001."""
    assert verify_token(make_token(aud="relay"), [SECRET], "cml", audience="relay") > time.time()
    both = make_token(aud=["other", "relay"])
    assert verify_token(both, [SECRET], "cml", audience="relay") > time.time()
    for token, message in [
        (make_token(), "token has no audience (aud); this node requires one"),
        (make_token(aud="billing"), "token audience does not match this node's --token-audience"),
    ]:
        with pytest.raises(AuthError) as excinfo:
            verify_token(token, [SECRET], "cml", audience="relay")
        assert (excinfo.value.close_code, str(excinfo.value)) == (4001, message)
    with pytest.raises(AuthError) as excinfo:  # a wrong signature stays "invalid token"
        verify_token(make_token(aud="relay", secret=NEXT_SECRET), [SECRET], "cml", audience="relay")
    assert str(excinfo.value) == "invalid token"


def test_verify_token_lifetime_over_max_ttl_is_refused() -> None:
    """--max-token-ttl: exp - iat (exp - now without iat) longer than it is 4001."""
    now = time.time()
    ten_years = 10 * 365 * 86400
    long_lived = make_token(exp_in=ten_years, iat=int(now))
    assert verify_token(long_lived, [SECRET], "cml") > now  # no limit by default
    for token in (long_lived, make_token(exp_in=ten_years)):
        with pytest.raises(AuthError) as excinfo:
            verify_token(token, [SECRET], "cml", max_ttl=3600, now=now)
        assert excinfo.value.close_code == 4001
        assert str(excinfo.value) == "token lifetime exceeds this node's --max-token-ttl"
    hour = make_token(exp_in=3600, iat=int(now))
    assert verify_token(hour, [SECRET], "cml", max_ttl=3600, now=now) > now
