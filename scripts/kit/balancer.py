"""HAProxy in front of gateway processes: docs/deploy/haproxy.cfg with its placeholders
filled in, run in the foreground until the block ends (used by the tests and the bench)."""

from __future__ import annotations

import contextlib
import resource
import shutil
import string
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from scripts.kit import launcher

ROOT: Final = Path(__file__).resolve().parent.parent.parent
CONFIG: Final = ROOT / "docs" / "deploy" / "haproxy.cfg"


def haproxy_bin() -> str | None:
    return shutil.which("haproxy")


def render(
    frontend_port: int,
    gateways: Sequence[str],
    *,
    bind_host: str = launcher.HOST,
    maxconn: int | None = None,
) -> str:
    """The sample configuration with ``${...}`` filled in; ``gateways`` are ``host:port``.

    ``maxconn`` defaults to what the open-files limit allows (HAProxy needs two
    descriptors a connection and refuses to start above the hard limit).
    """
    if maxconn is None:
        maxconn = default_maxconn()
    if len(gateways) != 2:
        raise ValueError("the sample configuration names two gateway processes")
    template = string.Template(CONFIG.read_text())
    return template.substitute(
        BIND_HOST=bind_host,
        FRONTEND_PORT=str(frontend_port),
        GATEWAY_1=gateways[0],
        GATEWAY_2=gateways[1],
        MAXCONN=str(maxconn),
    )


def default_maxconn() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 100_000
    return max(256, (hard - 200) // 2)


@contextlib.contextmanager
def haproxy(gateways: Sequence[str], *, maxconn: int | None = None) -> Iterator[launcher.Process]:
    """HAProxy on a free loopback port in front of ``gateways``; yields the process.

    Raises:
        launcher.LaunchError: haproxy is not installed, the configuration is refused, or
            it does not start.
    """
    binary = haproxy_bin()
    if binary is None:
        raise launcher.LaunchError("haproxy is not installed")
    port = launcher.free_port()
    workdir = Path(tempfile.mkdtemp(prefix="chat-haproxy-"))
    try:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(render(port, gateways, maxconn=maxconn))
        with launcher.launch(
            [binary, "-db", "-f", str(cfg)],
            port=port,
            ready=launcher.http_ready(port),
            name="haproxy",
            log_path=workdir / "haproxy.log",
            stop_timeout_s=10,
        ) as proc:
            yield proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
