"""Shared fixtures (the helpers they use live in imagekit.py, which tests import directly)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagekit import make_photo


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 600x400 JPEG in its own source folder."""
    return make_photo(tmp_path / "src" / "photo.jpg")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder that the `nobody` user can enter and write."""
    path = Path(tempfile.mkdtemp(prefix="thumbcli-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 endpoint (moto's server) on 127.0.0.1 for a test module's bucket tests."""
    from s3kit import moto_running  # only the bucket tests need moto and obstore

    with moto_running(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(moto_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """An empty bucket on `moto_server`, the AWS environment pointing at it."""
    from s3kit import fresh_bucket

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where a bucket destination keeps its records
    return fresh_bucket(moto_server, monkeypatch)
