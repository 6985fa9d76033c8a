"""The gateway's signing secret, and chat.v1 tokens (HS256 JWTs) minted with it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from server.auth import Authenticator
from server.cli import DEV_SECRET_FILE
from server.settings import Settings

DEFAULT_TTL_S: Final = 3600


class NoSecretError(Exception):
    """No signing secret was given or found."""


def resolve_secret(
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    secret_file: Path = DEV_SECRET_FILE,
) -> tuple[str, str]:
    """The signing secret and where it came from (for messages).

    Order: ``explicit``, ``CHAT_JWT_SECRET``, then ``secret_file``.  An empty
    ``CHAT_JWT_SECRET`` counts as unset, as it does for the gateway.

    Raises:
        NoSecretError: none of them holds a secret.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        if not explicit.strip():
            raise NoSecretError("--secret is empty")
        return explicit, "--secret"
    from_env = env.get("CHAT_JWT_SECRET", "").strip()
    if from_env:
        return from_env, "CHAT_JWT_SECRET"
    try:
        from_file = secret_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        from_file = ""
    except OSError as exc:
        raise NoSecretError(f"cannot read {secret_file}: {exc.strerror or exc}") from None
    if from_file:
        return from_file, str(secret_file)
    raise NoSecretError(
        "no JWT secret: pass --secret, set CHAT_JWT_SECRET, or start the gateway in dev mode "
        f"(`chat-gateway` with no CHAT_JWT_SECRET) from this directory so that it writes "
        f"{secret_file}"
    )


def env_claim(value: str | None, name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``value`` when given, else the environment variable ``name`` (empty: unset)."""
    if value is not None:
        return value or None
    env = os.environ if environ is None else environ
    return env.get(name, "").strip() or None


def mint(
    user: str,
    secret: str,
    ttl_s: int = DEFAULT_TTL_S,
    *,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A token for ``user``, signed the way the gateway verifies it."""
    settings = Settings(jwt_secret=secret, jwt_audience=audience, jwt_issuer=issuer)
    return Authenticator(settings).mint(user, ttl_s)


class TokenCache:
    """Tokens minted once per user and kept, for clients that reconnect as the same user."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._auth = Authenticator(Settings(jwt_secret=secret))
        self._ttl_s = ttl_s
        self._cache: dict[str, str] = {}

    def __call__(self, user: str) -> str:
        token = self._cache.get(user)
        if token is None:
            token = self._cache[user] = self._auth.mint(user, self._ttl_s)
        return token
