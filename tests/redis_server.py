"""A throwaway redis-server for tests, on a free loopback port (the load kit's launcher)."""

from __future__ import annotations

import asyncio

from scripts.kit.launcher import redis_argv, redis_server, redis_server_bin

__all__ = ["RestartableRedis", "redis_argv", "redis_server", "redis_server_bin"]


class RestartableRedis:
    """A redis-server the test stops and starts again on the same port (asyncio)."""

    def __init__(self, binary: str, port: int, workdir: str) -> None:
        self.argv = redis_argv(binary, port, workdir)
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
