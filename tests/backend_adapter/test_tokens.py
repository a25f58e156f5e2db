"""issue_token: HS256 JWTs that a relay node accepts for exactly one client_id."""

from __future__ import annotations

import time

import jwt
import pytest

from backend_adapter import InvalidInput, issue_token
from relay.errors import InvalidClientId
from tests.backend_adapter.conftest import SECRET


def test_issue_token_decodes_to_client_id_and_expiry() -> None:
    """PyJWT verifies the token with the secret; sub, iat and exp are right."""
    before = int(time.time())
    token = issue_token(SECRET, "cml:42", ttl=600)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "cml:42"
    assert before <= claims["iat"] <= before + 2
    assert claims["exp"] == claims["iat"] + 600
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_issue_token_default_ttl_is_an_hour() -> None:
    """Without ttl a token lives 3600 s."""
    claims = jwt.decode(issue_token(SECRET, "cml"), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600


def test_issue_token_now_sets_the_clock() -> None:
    """`now` fixes iat; a token issued long ago is expired."""
    token = issue_token(SECRET, "cml", ttl=60, now=1_000_000.9)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (claims["iat"], claims["exp"]) == (1_000_000, 1_000_060)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, SECRET, algorithms=["HS256"])


def test_issue_token_extra_claims_are_added() -> None:
    """extra_claims travel in the token."""
    token = issue_token(SECRET, "cml", extra_claims={"tenant": 7})
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["tenant"] == 7


def test_issue_token_audience_is_the_aud_claim() -> None:
    """audience= sets aud (what a node started with --token-audience requires)."""
    token = issue_token(SECRET, "cml", audience="relay")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="relay")
    assert claims["aud"] == "relay"


def test_issue_token_wrong_secret_does_not_verify() -> None:
    """A token signed with another secret fails verification."""
    token = issue_token(SECRET, "cml")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-another-secret-0000", algorithms=["HS256"])


@pytest.mark.parametrize(
    ("secret", "client_id", "ttl", "extra", "error"),
    [
        ("", "cml", 60, None, InvalidInput),
        (SECRET, "no spaces", 60, None, InvalidClientId),
        (SECRET, "", 60, None, InvalidClientId),
        (SECRET, "cml", 0, None, InvalidInput),
        (SECRET, "cml", -5, None, InvalidInput),
        (SECRET, "cml", 60, {"sub": "someone-else"}, InvalidInput),
        (SECRET, "cml", 60, {"exp": 2**40}, InvalidInput),
        (SECRET, "cml", 60, {"aud": "relay"}, InvalidInput),  # audience= says it
    ],
)
def test_issue_token_rejects_bad_arguments(
    secret: str, client_id: str, ttl: int, extra: dict[str, object] | None, error: type[Exception]
) -> None:
    """Empty secret, bad client_id, non-positive ttl, or setting sub/iat/exp/aud: an error."""
    with pytest.raises(error):
        issue_token(secret, client_id, ttl, extra_claims=extra)


def test_issue_token_short_secret_warns() -> None:
    """PyJWT's warning about a short HMAC key reaches the caller."""
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        issue_token("short", "cml")
