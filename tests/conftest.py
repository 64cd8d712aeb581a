"""Shared fixtures (the helpers they use live in imagekit.py, which tests import directly)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
