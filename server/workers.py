"""``--workers N``: several gateway processes on one listening socket.

The parent binds the socket once and starts N workers (each a whole gateway with
its own event loop, sharing runs through the Redis broker); the kernel spreads
new connections between them.  A worker that dies is started again; SIGTERM or
SIGINT to the parent is passed on to every worker, each of which shuts down
gracefully (runs end, then 1012), and the parent waits for them.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from server.logs import configure_logging
from server.settings import Settings

log = logging.getLogger("chat.workers")

#: How long the parent waits for workers after passing on a signal.
STOP_TIMEOUT_PAD_S = 20.0


def _worker(
    settings: Settings, host: str, port: int, sock: socket.socket, secret: str | None
) -> None:
    from server.app import create_app
    from server.logs import use_json
    from server.serve import GatewayServer, tune_gc, uvicorn_config

    if settings.log_format == "json":
        use_json(settings)
    else:
        configure_logging(
            settings.log_level, "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        )
    app = create_app(settings, dev_secret=secret)
    config = uvicorn_config(app, settings, host, port)
    if settings.log_format == "json":
        use_json(settings)  # uvicorn's config set up its own handlers
    tune_gc(settings)
    GatewayServer(config).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_workers(settings: Settings, host: str, port: int, workers: int, secret: str | None) -> int:
    """Run ``workers`` gateway processes until a signal; the exit status."""
    sock = bind(host, port)
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        proc = ctx.Process(
            target=_worker, args=(settings, host, port, sock, secret), name="chat-gateway-worker"
        )
        proc.start()
        return proc

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = [start() for _ in range(workers)]
    log.info("started %d workers on %s:%d: %s", workers, host, port, [p.pid for p in procs])
    try:
        while not stopping:
            time.sleep(0.25)
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stopping:
                    log.warning(
                        "worker %s exited with %s; starting another", proc.pid, proc.exitcode
                    )
                    procs[i] = start()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: each worker drains gracefully
        deadline = time.monotonic() + settings.shutdown_grace_s + STOP_TIMEOUT_PAD_S
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
    return 0
