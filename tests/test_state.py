"""The state store: records read while another process holds the database's write lock."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from thumbcli.targets.state import Origin, StateStore


def test_fetch_answers_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    first = StateStore(tmp_path, "state.sqlite")
    first.record("64/a.jpg.jpg", Origin(b"/src/a.jpg", 5, 10, "64", "d1"))
    first.close()
    store = StateStore(tmp_path, "state.sqlite")
    # Recorded, not yet written: fetch must see it without flushing.
    store.record("64/b.jpg.jpg", Origin(b"/src/b.jpg", 6, 11, "64", "d1"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("DELETE FROM folders")  # uncommitted: readers still see the committed rows
    try:
        contender = sqlite3.connect(path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            contender.execute("BEGIN IMMEDIATE")
        contender.close()
        with ThreadPoolExecutor(1) as pool:
            fetched = pool.submit(lambda: [store.fetch(f"64/{name}.jpg.jpg") for name in ("a", "b", "c")])
            assert fetched.result(timeout=5) == [(5, 10, "64", "d1"), (6, 11, "64", "d1"), None]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.close()
    reopened = StateStore(tmp_path, "state.sqlite")
    assert reopened.fetch("64/b.jpg.jpg") == (6, 11, "64", "d1")
    reopened.close()
