from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import LiveServer, run_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server for the whole session, or a skip where none is installed."""
    from tests.redis_server import redis_server, redis_server_bin

    if redis_server_bin() is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session", params=["memory", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """One gateway with default settings, on each broker, shared by the tests that need
    nothing special: the integration tests run against both brokers."""
    overrides = {}
    if request.param == "redis":
        overrides["broker_url"] = request.getfixturevalue("redis_url")
    with run_server(**overrides) as live:
        yield live


@pytest.fixture
def user() -> str:
    """A user of its own for each test, so that per-user limits never cross tests."""
    import uuid

    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL server for the whole session, or a skip where none is installed."""
    from tests.pg import find_bin, postgres_server

    if find_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    import asyncio
    import uuid

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/chat.db"
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    yield dsn.rsplit("/", 1)[0] + "/" + name
