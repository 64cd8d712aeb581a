"""The command line's own behaviour: what it checks and creates before the library runs."""

from __future__ import annotations

from pathlib import Path

from imagekit import load, make_photo, run_cli
from servekit import get, running_server


def test_serve_source_creates_a_missing_cache_folder_as_generate_does(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "photo.jpg", 400, 300)
    config = tmp_path / "thumbcli.toml"
    config.write_text('[presets.small]\nsize = "64"\n')
    cache = tmp_path / "new" / "cache"
    with running_server(cache, config=config, source_root=tmp_path / "src") as server:
        response = get(server, "/small/photo.jpg")
    assert response.status == 200
    assert cache.is_dir() and (cache / "v1" / "small" / "photo.jpg.jpg").is_file()
    assert load(cache / "v1" / "small" / "photo.jpg.jpg").width == 64


def test_serve_without_source_still_wants_an_existing_cache_folder(tmp_path: Path) -> None:
    run = run_cli("serve", tmp_path / "nothing", "--port", "0")
    assert run.rc == 2 and f"Directory '{tmp_path / 'nothing'}' does not exist" in run.stderr
    assert not (tmp_path / "nothing").exists()


def test_serve_refuses_a_folder_that_is_neither_a_cache_nor_empty(tmp_path: Path) -> None:
    make_photo(tmp_path / "photos" / "a.jpg", 120, 80)
    assert run_cli("generate", tmp_path / "photos", "-o", tmp_path / "tree", "-s", "64").rc == 0
    for folder in (tmp_path / "photos", tmp_path / "tree"):
        run = run_cli("serve", folder, "--port", "0")
        assert run.rc == 3, run.stderr
        (line,) = run.stderr.splitlines()
        assert line == (
            f"thumbcli: error: {folder} is not a thumbcli cache (no thumbcli-cache.json): serve a folder that "
            "`generate --cache` wrote, an empty one, or give --source to make thumbnails into it"
        )
    # An empty folder is a cache yet to be filled; --source makes one of any folder.
    (tmp_path / "empty").mkdir()
    with running_server(tmp_path / "empty") as server:
        assert get(server, "/healthz").status == 200
    config = tmp_path / "thumbcli.toml"
    config.write_text('[presets.small]\nsize = "64"\n')
    with running_server(tmp_path / "tree", config=config, source_root=tmp_path / "photos") as server:
        assert get(server, "/small/a.jpg").status == 200
