from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import LiveServer, run_server


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """One gateway with default settings, shared by the tests that need nothing special."""
    with run_server() as live:
        yield live


@pytest.fixture
def user() -> str:
    """A user of its own for each test, so that per-user limits never cross tests."""
    import uuid

    return f"user-{uuid.uuid4().hex[:10]}"
