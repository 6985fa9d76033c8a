from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
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


# Hostile claims, crit headers, token size and query-token spellings ---------------


def signed(payload: str, header: str = '{"alg":"HS256","typ":"JWT"}', key: str = SECRET) -> str:
    """A correctly signed HS256 token over raw JSON text, which may hold what
    ``json.dumps`` would never write (``Infinity``, ``1e400``, 400-digit integers)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    sig = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def hostile_tokens(key: str) -> dict[str, str]:
    """Correctly signed tokens that must each be refused."""
    now = int(time.time())
    good = f'"sub":"alice","iat":{now},"exp":{now + 600}'
    tokens = {
        f"exp {exp}": signed(f'{{"sub":"alice","exp":{exp}}}', key=key)
        for exp in ("Infinity", "-Infinity", "NaN", "1e400", "1" + "0" * 400, '"soon"', "true")
    }
    tokens.update(
        {
            "iat 1e400": signed(f'{{"sub":"alice","exp":{now + 600},"iat":1e400}}', key=key),
            "nbf Infinity": signed(f'{{"sub":"alice","exp":{now + 600},"nbf":Infinity}}', key=key),
            "iat in an hour": signed(
                f'{{"sub":"alice","exp":{now + 600},"iat":{now + 3600}}}', key=key
            ),
            "nbf in an hour": signed(f'{{{good},"nbf":{now + 3600}}}', key=key),
            "crit": signed(
                f"{{{good}}}", header='{"alg":"HS256","typ":"JWT","crit":["exp"]}', key=key
            ),
            "empty crit": signed(f"{{{good}}}", header='{"alg":"HS256","crit":[]}', key=key),
            "nested 1200 deep": signed(f'{{{good},"x":{"[" * 1200}{"]" * 1200}}}', key=key),
            "sub with NUL": signed(f'{{"sub":"ali\\u0000ce","exp":{now + 600}}}', key=key),
            "sub of 300 characters": signed(f'{{"sub":"{"a" * 300}","exp":{now + 600}}}', key=key),
        }
    )
    return tokens


@pytest.mark.parametrize("label", list(hostile_tokens(SECRET)))
def test_hostile_claims_and_crit_are_refused(label: str) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    with pytest.raises(AuthError, match="invalid token"):
        auth.verify(hostile_tokens(SECRET)[label])


def test_the_leeway_applies_to_exp_nbf_and_iat() -> None:
    from server.auth import check_times

    now = 1_800_000_000.0
    assert check_times({"exp": now + 1}, now, 0) == now + 1
    assert check_times({"exp": now - 5, "iat": now + 5, "nbf": now + 5}, now, 10) == now - 5
    for claims_, message in [
        ({"exp": now - 11}, "token expired"),
        ({"exp": now + 60, "iat": now + 11}, "issued in the future"),
        ({"exp": now + 60, "nbf": now + 11}, "not valid yet"),
        ({"iat": now}, "no 'exp'"),
        ({"exp": 253_402_300_800}, "before the year 10000"),
    ]:
        with pytest.raises(AuthError, match=message):
            check_times(claims_, now, 10)


def test_a_token_over_the_size_limit_is_refused_before_decoding() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, max_token_bytes=2048))
    assert auth.verify(auth.mint("alice", pad="x" * 1000)).user_id == "alice"
    with pytest.raises(AuthError, match="token larger than 2048 bytes"):
        auth.verify(auth.mint("alice", pad="x" * 2000))


QUERY_TOKEN_SPELLINGS = (
    "access_token",
    "access%5Ftoken",
    "access%5ftoken",
    "%61ccess_token",
    "%61%63%63%65%73%73%5F%74%6F%6B%65%6E",
)


async def test_a_long_refusal_reason_is_cut_to_fit_the_close_frame() -> None:
    """A signed token whose ``exp`` has 4,400 digits is refused with a reason longer
    than a close frame holds: the socket still gets 4401, never 1006."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from tests.support import SECRET as SERVER_SECRET
    from tests.support import run_server

    token = signed('{"sub":"alice","exp":' + "9" * 4400 + "}", key=SERVER_SECRET)
    protocols: list[Any] = ["chat.v1", f"bearer.{token}"]
    with run_server() as srv, pytest.raises(ConnectionClosed) as info:
        async with connect(srv.ws, subprotocols=protocols) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4401
    reason = info.value.rcvd.reason
    assert reason.startswith("invalid token") and len(reason.encode()) <= 123, reason


def test_every_spelling_the_app_reads_is_redacted() -> None:
    from server.auth import redact_query_tokens, token_from_query

    for name in QUERY_TOKEN_SPELLINGS:
        query = f"x=1&{name}=SECRET&y=2"
        assert token_from_query(query) == "SECRET", name
        line = redact_query_tokens(f'GET /ws?{query} HTTP/1.1" 101')
        assert line == f'GET /ws?x=1&{name}=[redacted]&y=2 HTTP/1.1" 101', name
    assert redact_query_tokens("/ws?token=1&access=2") == "/ws?token=1&access=2"
    # Spellings the gateway does not read as the token stay out of the logs as well.
    for query in ("a=1;access_token=SECRET", "access_token%00=SECRET", "x=1&access_tokens=SECRET"):
        assert "SECRET" not in redact_query_tokens(f"GET /ws?{query} HTTP/1.1"), query


async def test_hostile_tokens_are_401_and_4401_on_a_real_server() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from tests.support import SECRET as SERVER_SECRET
    from tests.support import http_client, run_server, ws_client

    with run_server(max_token_bytes=4096) as srv:
        tokens = hostile_tokens(SERVER_SECRET)
        tokens["over max_token_bytes"] = srv.token("alice", pad="x" * 4000)
        async with http_client(srv) as http:
            for label, token in tokens.items():
                protocols: list[Any] = ["chat.v1", f"bearer.{token}"]
                with pytest.raises(ConnectionClosed) as info:
                    async with connect(srv.ws, subprotocols=protocols) as ws:
                        await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd is not None, label
                assert info.value.rcvd.code == 4401, (label, info.value.rcvd)
                reason = info.value.rcvd.reason
                where: dict[str, Any]
                for where in (
                    {"headers": {"Authorization": f"Bearer {token}"}},
                    {"params": {"access_token": token}},
                ):
                    resp = await http.get("/api/threads", **where)
                    assert resp.status_code == 401, (label, resp.text)
                    assert resp.json()["error"]["message"] == reason, label
        assert reason == "token larger than 4096 bytes"
        async with ws_client(srv, "fine") as client:  # a good token still works
            assert client.ready["data"]["user_id"] == "fine"
    # A token issued a little in the future is accepted within the leeway.
    with run_server(jwt_leeway_s=30) as srv:
        ahead = srv.token("ahead", iat=int(time.time()) + 20)
        async with ws_client(srv, token=ahead) as client:
            assert client.ready["data"]["user_id"] == "ahead"


async def test_query_tokens_are_redacted_from_a_real_servers_logs(tmp_path: Path) -> None:
    import httpx
    from websockets.asyncio.client import connect

    from tests.support import spawn_server

    seen = []
    with spawn_server(tmp_path, CHAT_LOG_LEVEL="info", PYTHONUNBUFFERED="1") as srv:
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as http:
            for i, name in enumerate(QUERY_TOKEN_SPELLINGS):
                token = srv.token(f"user{i}")
                seen.append(token)
                resp = await http.get(f"/api/threads?{name}={token}")
                assert resp.status_code == 200, name  # the app reads this spelling
                async with connect(f"{srv.ws}?x=1&{name}={token}") as ws:
                    ready = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert ready["data"]["user_id"] == f"user{i}", name
    log = srv.log()
    for name, token in zip(QUERY_TOKEN_SPELLINGS, seen, strict=True):
        signature = token.rsplit(".", 1)[1]
        assert signature not in log, name
        assert f"/api/threads?{name}=[redacted]" in log, name  # the access log
        assert f"/ws?x=1&{name}=[redacted]" in log, name  # uvicorn's WebSocket lines
