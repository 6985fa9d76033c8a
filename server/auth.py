"""JWT verification with python-jose, and where tokens are found on a request.

Only the configured algorithm is accepted: HS256 with ``CHAT_JWT_SECRET`` by
default, RS256 alone when ``CHAT_JWT_PUBLIC_KEY`` is set.  The algorithm list is
pinned, so ``alg: none`` and an HS256 token signed with the RSA public key are
both rejected.  A token longer than ``CHAT_MAX_TOKEN_BYTES`` is refused before it
is decoded, and one with a ``crit`` header is refused: this gateway understands
no critical extension (RFC 7515, section 4.1.11).  The time claims are checked
here rather than by python-jose, which converts them with ``int()`` (so that
``exp: 1e400`` raises OverflowError) and does not check that ``iat`` is past.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote_plus

from jose import jwt
from jose.exceptions import JOSEError

from server.errors import AuthError
from server.settings import Settings

SUBPROTOCOL = "chat.v1"
BEARER_PREFIX = "bearer."
#: The query parameter a token may come in, after percent-decoding its name.
TOKEN_PARAM: Final = "access_token"
#: The largest NumericDate accepted in ``exp``, ``nbf`` and ``iat``: 9999-12-31T23:59:59Z.
MAX_NUMERIC_DATE: Final = 253_402_300_799
#: The longest user id (``sub``) accepted; it names the user in keys and rows.
MAX_SUB_CHARS: Final = 256


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
        self._max_token_bytes = settings.max_token_bytes

    @property
    def leeway_s(self) -> float:
        return self._leeway

    def verify(self, token: str | None) -> Principal:
        """Check a token's size, header, signature, algorithm, ``sub``, ``exp``, ``nbf``,
        ``iat`` and, when set, ``aud``/``iss``.

        Raises:
            AuthError: with a message fit for the client (never the token itself).
        """
        if not token:
            raise AuthError("no token")
        if len(token.encode("utf-8", "surrogatepass")) > self._max_token_bytes:
            raise AuthError(f"token larger than {self._max_token_bytes} bytes")
        options = {
            "require_sub": True,
            "verify_aud": self._audience is not None,
            "require_aud": self._audience is not None,
            "require_iss": self._issuer is not None,
            # exp, nbf and iat: see check_times.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        try:
            if "crit" in jwt.get_unverified_header(token):
                raise AuthError("invalid token: critical header parameters ('crit') are refused")
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=options,
            )
        except (JOSEError, ValueError, TypeError, KeyError, OverflowError) as exc:
            raise AuthError(f"invalid token: {_reason(exc)}") from None
        except RecursionError:  # a payload nested deeper than the JSON parser goes
            raise AuthError("invalid token: payload nested too deep") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid token: 'sub' must be a non-empty string")
        if len(sub) > MAX_SUB_CHARS or not sub.isprintable():
            raise AuthError(
                f"invalid token: 'sub' must be at most {MAX_SUB_CHARS} printable characters"
            )
        exp = check_times(claims, time.time(), self._leeway)
        return Principal(sub, exp, claims)

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


def check_times(claims: Mapping[str, Any], now: float, leeway: float) -> float:
    """Check ``exp`` (required), ``nbf`` and ``iat`` against ``now``; ``exp`` as a float.

    Each must be a NumericDate: an int or a float, finite, of at most
    :data:`MAX_NUMERIC_DATE` either way (JSON's ``1e400``, ``Infinity``, ``NaN``
    and huge integers are not).  ``leeway`` is the clock skew allowed on each:
    expired means ``exp < now - leeway``, not yet valid ``nbf > now + leeway``,
    issued in the future ``iat > now + leeway``.

    Raises:
        AuthError: naming the claim.
    """
    if claims.get("exp") is None:
        raise AuthError("invalid token: no 'exp' claim")
    exp = _numeric_date(claims, "exp")
    if exp < now - leeway:
        raise AuthError("token expired")
    if claims.get("nbf") is not None and _numeric_date(claims, "nbf") > now + leeway:
        raise AuthError("invalid token: not valid yet ('nbf' is in the future)")
    if claims.get("iat") is not None and _numeric_date(claims, "iat") > now + leeway:
        raise AuthError("invalid token: issued in the future ('iat')")
    return exp


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"invalid token: {name!r} must be a number")
    # Compared before any conversion: float() of a huge int raises OverflowError.
    if not -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE or not math.isfinite(value):
        raise AuthError(f"invalid token: {name!r} is not a date before the year 10000")
    return float(value)


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
    values = parse_qs(text).get(TOKEN_PARAM)
    return values[0] if values else None


# A query parameter: its raw name, after ``?``, ``&`` or ``;``, and its value up to the
# next ``&``, ``;`` or whitespace (which ends a path in a log line).
_QUERY_PARAM: Final = re.compile(r"(?<=[?&;])([^=&;?\s]*)=([^&;\s]*)")


def redact_query_tokens(text: str) -> str:
    """``text`` with the value of every query parameter that :func:`token_from_query`
    could read as the token replaced by ``[redacted]``, however its name is spelled
    (``access%5Ftoken``, ``%61ccess_token``): names are decoded as ``parse_qs`` does.
    Names that only contain the token's name (``access_token%00``), and parameters after
    a ``;``, are redacted too: what a client meant as a token stays out of the logs
    even where the gateway does not read it as one."""
    if "=" not in text:
        return text

    def redact(match: re.Match[str]) -> str:
        if TOKEN_PARAM not in unquote_plus(match.group(1)):
            return match.group(0)
        return match.group(1) + "=[redacted]"

    return _QUERY_PARAM.sub(redact, text)


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
