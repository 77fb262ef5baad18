"""Job store fixtures: a store of each backend on a fresh database, with a clock the test moves."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jobstores import FakeClock
from pg import PostgresServer

from service.jobs.store import JobStore, open_store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[[], JobStore]


# The PostgreSQL runs start a server (the session's, through getfixturevalue): integration.
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of ``backend``: a SQLite file, or a fresh database on the
    session's PostgreSQL server (dropped after the test)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"jobs_{uuid.uuid4().hex[:16]}"
    url = server.create_database(name)
    yield url
    server.drop_database(name)


@pytest.fixture
def open_test_store(store_url: str, clock: FakeClock) -> Iterator[StoreFactory]:
    """Opens (more) stores on the test's database; all are closed at the end."""
    opened: list[JobStore] = []

    def factory() -> JobStore:
        store = open_store(store_url, clock=clock)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_test_store: StoreFactory) -> JobStore:
    """A migrated store on an empty database."""
    store = open_test_store()
    store.migrate()
    return store
