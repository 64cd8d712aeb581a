"""The command line's own behaviour: what it checks and creates before the library runs."""

from __future__ import annotations

import json
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


def test_prune_removes_the_thumbnails_of_deleted_sources_from_an_output_tree(tmp_path: Path) -> None:
    make_photo(tmp_path / "src" / "keep.jpg", 120, 80)
    make_photo(tmp_path / "src" / "gone" / "old.jpg", 120, 80, seed=2)
    out = tmp_path / "out"
    assert run_cli("generate", tmp_path / "src", "-o", out, "-s", "64", "-s", "32").rc == 0
    (tmp_path / "src" / "gone" / "old.jpg").unlink()
    planned = run_cli("prune", "-o", out, "--dry-run")
    assert planned.rc == 0, planned.stderr
    listed = sorted(line.split("\t")[0] for line in planned.stdout.splitlines())
    assert listed == [str(out / size / "gone" / "old.jpg.jpg") for size in ("32", "64")]
    assert (out / "64" / "gone" / "old.jpg.jpg").exists()
    pruned = run_cli("prune", "-o", out, "--json")
    assert (pruned.rc, json.loads(pruned.stdout)["files"]) == (0, 2)
    assert not (out / "64" / "gone").exists() and (out / "64" / "keep.jpg.jpg").exists()
    again = run_cli("generate", tmp_path / "src", "-o", out, "-s", "64", "-s", "32", "--json")
    assert (again.rc, again.summary["made"], again.summary["skipped"]) == (0, 0, 1)
