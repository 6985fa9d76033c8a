"""``chat-gateway``: a thin CLI over :class:`Settings` and uvicorn.

Every setting is a flag (``--max-message-bytes``) that wins over its ``CHAT_*``
variable.  With no JWT secret or public key configured, the gateway runs in dev
mode: a random secret, a token for user ``dev``, and a URL that signs the
browser client in.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.app import create_app
from server.auth import Authenticator, new_dev_secret
from server.logs import configure_logging, use_json
from server.serve import GatewayServer, tune_gc, uvicorn_config
from server.settings import ENV_PREFIX, Settings, parse_value
from server.workers import run_workers

DEV_USER = "dev"
DEV_TOKEN_TTL_S = 12 * 3600
#: Where dev mode leaves its secret, so ``scripts/mint_token.py`` can mint more tokens.
DEV_SECRET_FILE = Path("var") / "dev_secret"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-gateway",
        description="Realtime streaming gateway for AI agents (protocol chat.v1).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the port (more than 1 needs CHAT_BROKER_URL=redis://…)",
    )
    settings = parser.add_argument_group("settings (each also read from CHAT_<NAME>)")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        settings.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar=ENV_PREFIX + f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    base = Settings.from_env()
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name)
        if raw is not None:
            changes[f.name] = parse_value(f, raw, "--" + f.name.replace("_", "-"))
    settings = base.replace(**changes)
    settings.check()
    return settings


def write_dev_secret(secret: str, path: Path = DEV_SECRET_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not (settings.broker_url or "").startswith(("redis", "unix")):
        parser.error(
            "--workers > 1 needs a shared broker: set CHAT_BROKER_URL=redis://host:port/0 "
            "(with the in-memory broker each worker would see only its own runs)"
        )
    if settings.log_format == "json":
        use_json(settings)
    else:
        configure_logging(settings.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev_secret = None
    if settings.dev_mode:
        dev_secret = new_dev_secret()
        write_dev_secret(dev_secret)
        token = Authenticator(settings, dev_secret=dev_secret).mint(DEV_USER, DEV_TOKEN_TTL_S)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        print(
            "chat-gateway: dev mode (no CHAT_JWT_SECRET): tokens are signed with a random "
            f"secret, kept in {DEV_SECRET_FILE} while this process runs.\n"
            f"  Open the chat:   http://{host}:{args.port}/#token={token}\n"
            f"  Token for '{DEV_USER}' (valid {DEV_TOKEN_TTL_S // 3600} h): {token}",
            flush=True,
        )

    def forget_dev_secret() -> None:
        # Tokens of this process's secret mean nothing to the next one.
        if dev_secret is not None:
            DEV_SECRET_FILE.unlink(missing_ok=True)

    if args.workers > 1:
        try:
            return run_workers(settings, args.host, args.port, args.workers, dev_secret)
        finally:
            forget_dev_secret()
    try:
        app = create_app(settings, dev_secret=dev_secret)
    except (ValueError, RuntimeError) as exc:
        forget_dev_secret()
        parser.error(str(exc))
    config = uvicorn_config(app, settings, args.host, args.port)
    if settings.log_format == "json":
        use_json(settings)  # uvicorn's config set up its own handlers
    tune_gc(settings)
    try:
        GatewayServer(config, after_shutdown=forget_dev_secret).run()
    finally:
        forget_dev_secret()  # also when the server never started (uvicorn exits on that)
    return 0


if __name__ == "__main__":
    sys.exit(main())
