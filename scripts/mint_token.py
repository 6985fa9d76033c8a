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
import sys
from collections.abc import Sequence

from scripts.kit.args import positive_int
from scripts.kit.tokens import DEFAULT_TTL_S, NoSecretError, env_claim, mint, resolve_secret
from server.cli import DEV_SECRET_FILE

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mint_token.py",
        description="Mint a chat.v1 JWT for a user, signed with the gateway's HS256 secret.",
    )
    parser.add_argument("user", help="the user id (the token's 'sub' claim)")
    parser.add_argument(
        "--ttl",
        type=positive_int,
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
