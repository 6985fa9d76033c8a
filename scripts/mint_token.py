"""Mint a chat.v1 JWT (HS256) for a user, signed with the gateway's secret.

Usage (from the project root)::

    python scripts/mint_token.py USER [--ttl SECONDS] [--secret S] [--aud A] [--iss I]

The secret is, in this order: ``--secret``, the environment variable
``CHAT_JWT_SECRET``, or the file ``var/dev_secret`` (relative to the working
directory) that ``chat-gateway`` writes in dev mode.  With none of them, the
script says so and exits with status 2.  ``--aud`` / ``--iss`` default to
``CHAT_JWT_AUDIENCE`` / ``CHAT_JWT_ISSUER``; set them when the gateway checks
those claims.  Only the token is printed on stdout, so it can be captured::

    export CHAT_TOKEN=$(python scripts/mint_token.py alice --ttl 600)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.auth import Authenticator  # noqa: E402
from server.cli import DEV_SECRET_FILE  # noqa: E402
from server.settings import Settings  # noqa: E402

DEFAULT_TTL_S = 3600
EXIT_USAGE = 2


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mint_token.py",
        description="Mint a chat.v1 JWT for a user, signed with the gateway's HS256 secret.",
    )
    parser.add_argument("user", help="the user id (the token's 'sub' claim)")
    parser.add_argument(
        "--ttl",
        type=_positive_int,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help=f"lifetime of the token (default {DEFAULT_TTL_S})",
    )
    parser.add_argument(
        "--secret",
        default=None,
        help=f"HS256 secret (default: CHAT_JWT_SECRET, else the file {DEV_SECRET_FILE})",
    )
    parser.add_argument(
        "--aud", default=None, metavar="A", help="'aud' claim (default: CHAT_JWT_AUDIENCE)"
    )
    parser.add_argument(
        "--iss", default=None, metavar="I", help="'iss' claim (default: CHAT_JWT_ISSUER)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not args.user.strip():
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: the user id must not be empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        secret, _source = resolve_secret(args.secret)
    except NoSecretError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    token = mint(
        args.user,
        secret,
        args.ttl,
        audience=env_claim(args.aud, "CHAT_JWT_AUDIENCE"),
        issuer=env_claim(args.iss, "CHAT_JWT_ISSUER"),
    )
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
