"""JWT verification with python-jose, and where tokens are found on a request.

Only the configured algorithm is accepted: HS256 with ``CHAT_JWT_SECRET`` by
default, RS256 alone when ``CHAT_JWT_PUBLIC_KEY`` is set.  The algorithm list is
pinned, so ``alg: none`` and an HS256 token signed with the RSA public key are
both rejected.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from jose import jwt
from jose.exceptions import ExpiredSignatureError, JOSEError

from server.errors import AuthError
from server.settings import Settings

SUBPROTOCOL = "chat.v1"
BEARER_PREFIX = "bearer."


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    user_id: str
    expires_at: float
    claims: Mapping[str, Any]


class Authenticator:
    def __init__(self, settings: Settings, *, dev_secret: str | None = None) -> None:
        public_key = settings.public_key_pem()
        if public_key is not None:
            self.algorithm = "RS256"
            self._verify_key = public_key
            self._sign_key: str | None = None
        else:
            secret = settings.jwt_secret or dev_secret
            if not secret:
                raise ValueError("no JWT secret or public key is configured")
            self.algorithm = "HS256"
            self._verify_key = secret
            self._sign_key = secret
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s

    @property
    def leeway_s(self) -> float:
        return self._leeway

    def verify(self, token: str | None) -> Principal:
        """Check a token's signature, algorithm, ``exp``, ``sub`` and, when set, ``aud``/``iss``.

        Raises:
            AuthError: with a message fit for the client (never the token itself).
        """
        if not token:
            raise AuthError("no token")
        options = {
            "require_exp": True,
            "require_sub": True,
            "verify_aud": self._audience is not None,
            "require_aud": self._audience is not None,
            "require_iss": self._issuer is not None,
            "leeway": self._leeway,
        }
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=options,
            )
        except ExpiredSignatureError:
            raise AuthError("token expired") from None
        except (JOSEError, ValueError, TypeError, KeyError) as exc:
            raise AuthError(f"invalid token: {_reason(exc)}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid token: 'sub' must be a non-empty string")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError("invalid token: 'exp' must be a number")
        return Principal(sub, float(exp), claims)

    def mint(self, user_id: str, ttl_s: float = 3600.0, **claims: Any) -> str:
        """Sign a token for ``user_id`` with the configured secret (HS256 only)."""
        if self._sign_key is None:
            raise ValueError("tokens can only be minted with an HS256 secret")
        now = int(time.time())
        body: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl_s)}
        if self._audience is not None:
            body["aud"] = self._audience
        if self._issuer is not None:
            body["iss"] = self._issuer
        body.update(claims)
        return str(jwt.encode(body, self._sign_key, algorithm="HS256"))


def new_dev_secret() -> str:
    return secrets.token_urlsafe(32)


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".").lower()


# Where tokens are found -----------------------------------------------------------


def bearer_from_headers(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_from_query(query_string: bytes | str) -> str | None:
    text = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    values = parse_qs(text).get("access_token")
    return values[0] if values else None


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    raw = headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def token_for_websocket(
    headers: Mapping[str, str], query_string: bytes | str
) -> tuple[str | None, str | None]:
    """The token of a WebSocket handshake and the subprotocol to answer.

    In this order: the ``Authorization`` header, a ``bearer.<jwt>`` subprotocol, the
    ``access_token`` query parameter.  The answered subprotocol is ``chat.v1`` when
    offered, never the token.
    """
    offered = offered_subprotocols(headers)
    selected = SUBPROTOCOL if SUBPROTOCOL in offered else None
    token = bearer_from_headers(headers)
    if token is None:
        for proto in offered:
            if proto.startswith(BEARER_PREFIX) and len(proto) > len(BEARER_PREFIX):
                token = proto[len(BEARER_PREFIX) :]
                break
    if token is None:
        token = token_from_query(query_string)
    return token, selected


def token_for_http(headers: Mapping[str, str], query_string: bytes | str) -> str | None:
    return bearer_from_headers(headers) or token_from_query(query_string)
