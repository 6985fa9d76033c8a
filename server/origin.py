"""The WebSocket handshake's ``Origin`` check: cross-site hijacking stops here."""

from __future__ import annotations


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may open a session.

    No ``Origin`` (not a browser): allowed.  The server's own origin, whose host and
    port are those of the ``Host`` header (the scheme is not compared, so a TLS
    proxy in front changes nothing): allowed.  Otherwise only an origin listed in
    ``allowed``, or any when ``allowed`` holds ``*``.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in {a.strip().rstrip("/").lower() for a in allowed}:
        return True
    scheme, sep, netloc = origin.partition("://")
    if not sep or not host or origin == "null":
        return False
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default is not None and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return netloc == host.strip().lower()
