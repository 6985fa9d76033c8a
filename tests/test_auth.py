from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from server.auth import Authenticator, token_for_http, token_for_websocket
from server.errors import AuthError
from server.settings import Settings

SECRET = "unit-secret-unit-secret-unit-secret"


def rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 60, **extra}


def unsigned(body: dict[str, object]) -> str:
    import base64

    import orjson

    def part(data: object) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body)}."


def test_hs256_round_trip() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    principal = auth.verify(auth.mint("alice", 60))
    assert principal.user_id == "alice"
    assert principal.expires_at > time.time()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no token"),
        ("", "no token"),
        ("garbage", "invalid token"),
        (jwt.encode(claims(), "another-secret", algorithm="HS256"), "invalid token"),
        (jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256"), "expired"),
        (jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "invalid token"),
        (jwt.encode(claims(sub=None), SECRET, algorithm="HS256"), "invalid token"),
        (jwt.encode(claims(sub=""), SECRET, algorithm="HS256"), "invalid token"),
        (jwt.encode(claims(), SECRET, algorithm="HS512"), "invalid token"),
        (unsigned(claims()), "invalid token"),
    ],
)
def test_hs256_rejects(token: str | None, reason: str) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    with pytest.raises(AuthError, match=reason):
        auth.verify(token)


def test_audience_and_issuer_are_checked_when_configured() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_audience="chat", jwt_issuer="idp"))
    assert auth.verify(auth.mint("alice")).user_id == "alice"
    for body in (
        claims(),
        claims(aud="other", iss="idp"),
        claims(aud="chat", iss="other"),
        claims(aud="chat"),
    ):
        with pytest.raises(AuthError):
            auth.verify(jwt.encode(body, SECRET, algorithm="HS256"))


def test_rs256_only_and_no_hs_rs_confusion(tmp_path: object) -> None:
    private, public = rsa_pair()
    auth = Authenticator(Settings(jwt_public_key=public))
    assert auth.algorithm == "RS256"
    good = jwt.encode(claims(), private, algorithm="RS256")
    assert auth.verify(good).user_id == "alice"
    # The classic confusion: an HS256 token whose HMAC key is the RSA public key.
    confused = jwt.encode(claims(), SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        auth.verify(confused)
    import base64
    import hashlib
    import hmac

    import orjson

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(orjson.dumps(claims()))
    sig = hmac.new(public.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError):
        auth.verify(f"{head}.{body}.{b64(sig)}")
    with pytest.raises(AuthError):
        auth.verify(unsigned(claims()))
    with pytest.raises(ValueError):
        auth.mint("alice")


def test_public_key_from_a_file(tmp_path: pytest.TempPathFactory) -> None:
    private, public = rsa_pair()
    path = tmp_path / "key.pem"  # type: ignore[operator]
    path.write_text(public)
    auth = Authenticator(Settings(jwt_public_key=str(path)))
    assert auth.verify(jwt.encode(claims(), private, algorithm="RS256")).user_id == "alice"


def test_token_sources_and_their_order() -> None:
    headers = {"authorization": "Bearer H", "sec-websocket-protocol": "chat.v1, bearer.P"}
    assert token_for_websocket(headers, b"access_token=Q") == ("H", "chat.v1")
    headers = {"sec-websocket-protocol": "chat.v1, bearer.P"}
    assert token_for_websocket(headers, b"access_token=Q") == ("P", "chat.v1")
    assert token_for_websocket({}, b"access_token=Q") == ("Q", None)
    assert token_for_websocket({"sec-websocket-protocol": "bearer.P"}, b"") == ("P", None)
    assert token_for_websocket({}, b"") == (None, None)
    assert token_for_http({"authorization": "Bearer H"}, b"access_token=Q") == "H"
    assert token_for_http({"authorization": "Basic x"}, b"access_token=Q") == "Q"
    assert token_for_http({}, "") is None
