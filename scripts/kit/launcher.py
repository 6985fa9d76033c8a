"""Start a server process on a free loopback port, wait until it answers, stop it.

One launcher for the gateway (``python -m server``), the comparison apps of the
benchmark and redis-server, used by the scripts and by the tests alike. Every
wait is bounded: a process that exits early or does not answer in time raises
:class:`LaunchError` with the tail of its log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HOST: Final = "127.0.0.1"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
#: How often a starting process is polled for readiness.
POLL_S: Final = 0.05
#: How much of a log an error message quotes.
LOG_TAIL_CHARS: Final = 4000

#: Answers whether the process is ready; called until it says so or time runs out.
Ready = Callable[[], bool]


class LaunchError(RuntimeError):
    """A server process exited early or did not become ready in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def clean_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) without any ``CHAT_*``, plus ``extra``."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("CHAT_")}
    env.update(extra)
    return env


def unlimited_gateway_env(secret: str) -> dict[str, str]:
    """``CHAT_*`` settings for a gateway under load: the token secret, warnings only,
    and the per-user limits out of the way (every load client is one user or a few)."""
    return {
        "CHAT_JWT_SECRET": secret,
        "CHAT_LOG_LEVEL": "warning",
        "CHAT_RATE_LIMIT_PER_MINUTE": "10000000",
        "CHAT_MAX_ACTIVE_RUNS_PER_USER": "100000",
        "CHAT_MAX_CONNECTIONS_PER_USER": "100000",
    }


def gateway_argv(port: int, *extra: str, host: str = HOST) -> list[str]:
    """The command line of a gateway process: ``python -m server`` on ``host:port``."""
    return [sys.executable, "-m", "server", "--host", host, "--port", str(port), *extra]


# Readiness probes ---------------------------------------------------------------------------


def tcp_ready(port: int, host: str = HOST) -> Ready:
    """Ready once the port accepts a TCP connection."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    return probe


def http_ready(port: int, path: str = "/health", host: str = HOST) -> Ready:
    """Ready once ``GET path`` answers 200 (no proxy is consulted: loopback only)."""

    def probe() -> bool:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return probe


# Processes ----------------------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status``, such as ``VmRSS`` or ``VmHWM``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process so far, over its live threads.

    From ``/proc/<pid>/task/*/schedstat`` (nanoseconds), else from
    ``/proc/<pid>/stat`` (clock ticks, too coarse for short measurements).
    """
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
        if total:
            return total / 1e9
    except OSError:
        pass
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Process:
    """A server process started by :func:`launch`."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return status_kib(self.pid, "VmHWM")

    def log(self, tail: int | None = None) -> str:
        """What the process wrote to its log (the last ``tail`` characters if given)."""
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def launch(
    argv: Sequence[str],
    *,
    port: int,
    ready: Ready,
    name: str = "server",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    start_timeout_s: float = 30.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[Process]:
    """Run ``argv`` until the block ends; yields once ``ready()`` holds.

    Output goes to ``log_path`` (else nowhere). On the way out the process gets
    SIGTERM, and SIGKILL if it has not exited after ``stop_timeout_s``.

    Raises:
        LaunchError: the process exited before it was ready, or was not ready
            within ``start_timeout_s``.
    """
    out: int | None = subprocess.DEVNULL
    with contextlib.ExitStack() as files:
        if log_path is not None:
            out = files.enter_context(log_path.open("wb")).fileno()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Process(name, port, proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready():
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited early:\n{server.log(LOG_TAIL_CHARS)}")
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{name} did not start within {start_timeout_s:g} s:\n"
                    f"{server.log(LOG_TAIL_CHARS)}"
                )
            time.sleep(POLL_S)
        yield server
    finally:
        stop(proc, stop_timeout_s)


# redis-server -------------------------------------------------------------------------------


def redis_server_bin() -> str | None:
    return shutil.which("redis-server")


def redis_argv(binary: str, port: int, workdir: str) -> list[str]:
    """A redis-server on loopback that keeps nothing on disk."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
    ]


def redis_ready(url: str) -> Ready:
    """Ready once the server answers ``PING``."""
    import redis

    def probe() -> bool:
        client = redis.Redis.from_url(url)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    return probe


@contextlib.contextmanager
def redis_server(start_timeout_s: float = 20.0) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL.

    Raises:
        LaunchError: redis-server is not installed, or did not start.
    """
    binary = redis_server_bin()
    if binary is None:
        raise LaunchError("redis-server is not installed")
    port = free_port()
    url = f"redis://{HOST}:{port}/0"
    workdir = tempfile.mkdtemp(prefix="chat-redis-")
    try:
        with launch(
            redis_argv(binary, port, workdir),
            port=port,
            ready=redis_ready(url),
            name="redis-server",
            start_timeout_s=start_timeout_s,
            stop_timeout_s=10,
        ):
            yield url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
