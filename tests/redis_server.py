"""A throwaway redis-server for tests, on a free loopback port (the load kit's launcher)."""

from __future__ import annotations

from scripts.kit.launcher import redis_argv, redis_server, redis_server_bin

__all__ = ["redis_argv", "redis_server", "redis_server_bin"]
