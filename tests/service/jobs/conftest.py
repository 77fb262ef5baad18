"""Job store fixtures: a store of each backend on a fresh database, with a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jobstores import FakeClock

from service.jobs.store import JobStore, open_store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[[], JobStore]


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> str:
    """A URL of an empty database of ``backend``."""
    return f"sqlite:///{tmp_path / 'jobs.db'}"


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
