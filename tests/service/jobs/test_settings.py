"""Where the job store lives by default, and how a deployment points it elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs.migrations import LATEST_VERSION
from service.jobs.sqlite import SqliteJobStore
from service.jobs.store import open_store
from service.settings import ServiceSettings


def test_the_default_store_is_a_sqlite_file_in_the_jobs_folder(tmp_path: Path) -> None:
    settings = ServiceSettings(jobs_dir=tmp_path / "data" / "jobs")
    url = settings.jobs_store_url()
    store = open_store(url)
    try:
        assert isinstance(store, SqliteJobStore)
        assert store.migrate() == LATEST_VERSION
        assert (tmp_path / "data" / "jobs" / "jobs.db").is_file()
    finally:
        store.close()


def test_the_default_jobs_folder_follows_xdg_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("CMAMBA_JOBS_DIR", raising=False)
    assert ServiceSettings().jobs_dir == tmp_path / "cmamba" / "jobs"


def test_a_database_url_from_the_environment_wins_and_stays_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgresql://cmamba:s3cret@db.internal:5432/jobs"
    monkeypatch.setenv("CMAMBA_JOBS_DATABASE_URL", url)
    monkeypatch.setenv("CMAMBA_JOBS_LEASE_S", "12.5")
    settings = ServiceSettings()
    assert settings.jobs_store_url() == url
    assert settings.jobs_lease_s == 12.5
    assert "s3cret" not in repr(settings)
