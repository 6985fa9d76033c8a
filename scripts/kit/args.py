"""Command-line helpers: argparse value types, and the loopback-only target of a load test."""

from __future__ import annotations

import argparse
import ipaddress
import math
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

SSE_PATH: Final = "/api/chat/stream"


class UsageError(Exception):
    """A bad option or a target this tool refuses: exit status 2."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str  # with the query string

    @property
    def ws_url(self) -> str:
        return f"ws://{self.netloc}{self.path}"

    @property
    def http_url(self) -> str:
        return f"http://{self.netloc}{self.path}"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_target(url: str, *, sse: bool = False) -> Target:
    """The target of ``url``, refusing anything but plain ws/http to a loopback address.

    With ``sse``, a WebSocket URL (or one with no path) stands for the same
    server's ``POST /api/chat/stream``.

    Raises:
        UsageError: not a ws:// or http:// URL, or not a loopback host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        raise UsageError(
            f"--url must be a ws:// or http:// URL (TLS is not needed on loopback), got {url!r}"
        )
    host = parts.hostname or ""
    if not is_loopback(host):
        raise UsageError(
            f"refusing to load-test {host or url!r}: only loopback targets are allowed "
            "(127.0.0.0/8, ::1, localhost)"
        )
    if host.lower() == "localhost":
        host = "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if sse and (parts.scheme == "ws" or path in ("", "/")):
        path = SSE_PATH
    if parts.query:
        path += "?" + parts.query
    return Target(host, port, path)


# argparse value types -----------------------------------------------------------------------


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative(text: str) -> float:
    """A finite number of at least 0."""
    value = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive(text: str) -> float:
    """A finite number above 0."""
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` (an environment variable to set), as the pair."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"wants NAME=VALUE, not {text!r}")
    return name, value
