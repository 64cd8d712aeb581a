"""Several sources: the same names under two roots never collide, in an output tree or the served cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from imagekit import draw_photo, load, make_photo, mean_abs_difference, output_files, run_cli
from servekit import fetch, running_server, wait_until

from thumbcli.cache import cache_path, read_manifest, resolve_url, url_path_for
from thumbcli.config import ConfigError, load_config
from thumbcli.discover import DirBatch, is_image_name, walk_batches
from thumbcli.errors import SpecError
from thumbcli.fsutil import open_folder
from thumbcli.spec import SizeBox, ThumbSpec, WalkOptions
from thumbcli.targets.state import StateStore
from thumbcli.targets.tree import OutputTree, source_folders

#: Camera names repeat on every card: set1 and set2 hold the same three names, different pictures.
NAMES = ("IMG_0001.JPG", "IMG_0002.JPG", "photo_0000.jpg")


def two_cards(root: Path, *folders: str) -> dict[Path, int]:
    """The same file names in each folder, each file a different picture; source path -> its drawing's seed."""
    seeds = {}
    for index, folder in enumerate(folders or ("set1", "set2")):
        for number, name in enumerate(NAMES):
            seed = index * 10 + number
            seeds[make_photo(root / folder / name, 240, 160, seed=seed)] = seed
    return seeds


def origins(root: Path) -> dict[str, bytes]:
    """Output relpath -> the absolute source path its state record names."""
    folder = open_folder(root, ".thumbcli")
    try:
        store = StateStore(folder, "state.sqlite", root / ".thumbcli" / "state.sqlite")
    finally:
        os.close(folder)
    try:
        return {out: origin.source for out, origin in store.origins()}
    finally:
        store.close()


def assert_each_made_from_its_own_source(out: Path, seeds: dict[Path, int]) -> None:
    """Every thumbnail's record names one of the sources, and its pixels are that source's picture."""
    recorded = origins(out)
    assert sorted(recorded.values()) == sorted(os.fsencode(path) for path in seeds)
    for relative, source in recorded.items():
        seed = seeds[Path(os.fsdecode(source))]
        assert mean_abs_difference(load(out / relative), draw_photo(240, 160, seed=seed)) < 12, relative


# --- the reported case: generate big/set1 big/set2 -o t ---------------------------------------


def test_two_folders_with_the_same_names_all_get_thumbnails_none_overwritten(tmp_path: Path) -> None:
    seeds = two_cards(tmp_path / "big")
    run = run_cli("generate", tmp_path / "big/set1", tmp_path / "big/set2", "-o", tmp_path / "t", "-s", "64", "--json")
    assert run.rc == 0, run.stderr
    assert run.failure_lines == []
    assert (run.summary["made"], run.summary["failed"]) == (6, 0)
    assert [p.relative_to(tmp_path / "t").as_posix() for p in output_files(tmp_path / "t")] == [
        f"64/{folder}/{name}.jpg" for folder in ("set1", "set2") for name in sorted(NAMES)
    ]
    assert_each_made_from_its_own_source(tmp_path / "t", seeds)


def test_a_rerun_of_several_sources_skips_everything_and_knows_each_folder_fresh(tmp_path: Path) -> None:
    two_cards(tmp_path / "big")
    args = ("generate", tmp_path / "big/set1", tmp_path / "big/set2", "-o", tmp_path / "t", "-s", "64", "--json")
    assert run_cli(*args).summary["made"] == 6
    # As if written a while ago: a folder's signature is recorded only once its thumbnails have settled.
    then = time.time() - 10
    for folder in [tmp_path / "t", *(p for p in (tmp_path / "t").rglob("*") if p.is_dir())]:
        os.utime(folder, (then, then))
    again = run_cli(*args)
    assert (again.rc, again.summary["made"], again.summary["skipped"]) == (0, 0, 6)
    # The folder signatures of the fast path hold for each source folder, under its own output folder.
    sources = (str(tmp_path / "big/set1"), str(tmp_path / "big/set2"))
    tree = OutputTree(
        tmp_path / "t", (ThumbSpec(SizeBox.parse("64")),), locked=False, source_folders=source_folders(sources)
    )
    try:
        batches = [b for b in walk_batches(sources, WalkOptions(processes=1), is_image_name) if isinstance(b, DirBatch)]
        assert len(batches) == 2
        assert all(tree.known_fresh(batch) for batch in batches)
        fresh, todo = tree.plan_batch(batches[1], force=False)
        assert (fresh, todo) == (3, [])
    finally:
        tree.close()
    # A changed picture in one card is remade there only.
    make_photo(tmp_path / "big/set2/IMG_0001.JPG", 240, 160, seed=99)
    changed = run_cli(*args)
    assert (changed.summary["made"], changed.summary["skipped"]) == (1, 5)
    assert mean_abs_difference(load(tmp_path / "t/64/set2/IMG_0001.JPG.jpg"), draw_photo(240, 160, seed=99)) < 12
    assert mean_abs_difference(load(tmp_path / "t/64/set1/IMG_0001.JPG.jpg"), draw_photo(240, 160, seed=0)) < 12


def test_one_source_and_files_of_one_folder_keep_the_one_source_layout(tmp_path: Path) -> None:
    two_cards(tmp_path / "big")
    files = [tmp_path / "big/set1" / name for name in NAMES[:2]]
    run = run_cli("generate", *files, "-o", tmp_path / "t", "-s", "64")
    assert run.rc == 0, run.stderr
    assert [p.relative_to(tmp_path / "t").as_posix() for p in output_files(tmp_path / "t")] == [
        "64/IMG_0001.JPG.jpg",
        "64/IMG_0002.JPG.jpg",
    ]


def test_files_named_from_two_folders_go_under_their_folders(tmp_path: Path) -> None:
    seeds = two_cards(tmp_path / "big")
    files = [tmp_path / "big" / folder / "IMG_0001.JPG" for folder in ("set1", "set2")]
    run = run_cli("generate", *files, "-o", tmp_path / "t", "-s", "64")
    assert run.rc == 0, run.stderr
    assert_each_made_from_its_own_source(tmp_path / "t", {path: seeds[path] for path in files})
    assert sorted(origins(tmp_path / "t")) == ["64/set1/IMG_0001.JPG.jpg", "64/set2/IMG_0001.JPG.jpg"]


def test_two_roots_of_one_name_take_their_parents_names(tmp_path: Path) -> None:
    seeds = two_cards(tmp_path, "card1/DCIM", "card2/DCIM")
    run = run_cli("generate", tmp_path / "card1/DCIM", tmp_path / "card2/DCIM", "-o", tmp_path / "t", "-s", "64")
    assert run.rc == 0, run.stderr
    assert {out.split("/")[1] for out in origins(tmp_path / "t")} == {"card1-DCIM", "card2-DCIM"}
    assert_each_made_from_its_own_source(tmp_path / "t", seeds)


def test_the_root_template_field_is_the_sources_folder(tmp_path: Path) -> None:
    two_cards(tmp_path, "a/photos", "b/photos")
    template = "{root}/{size}/{relpath}.{ext}"
    run = run_cli(
        "generate", tmp_path / "a/photos", tmp_path / "b/photos", "-o", tmp_path / "t", "-s", "64", "--name", template
    )
    assert run.rc == 0, run.stderr
    assert {out.split("/")[0] for out in origins(tmp_path / "t")} == {"a-photos", "b-photos"}


# --- source_folders: deterministic, unique, stable ----------------------------------------------


def test_source_folders_are_empty_for_one_root_and_unique_for_several(tmp_path: Path) -> None:
    for folder in ("big/set1", "big/set2", "x/photos", "y/photos", "z/x/photos", ".hidden"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "big/set1/a.jpg").write_bytes(b"")
    assert source_folders([str(tmp_path / "big/set1")]) == {}
    assert source_folders([str(tmp_path / "big/set1/a.jpg"), str(tmp_path / "big/set1/")]) == {}
    roots = [str(tmp_path / f) for f in ("big/set1", "big/set2/", "x/photos", "y/photos", ".hidden")]
    folders = source_folders(roots)
    assert folders == {
        str(tmp_path / "big/set1"): "set1",
        str(tmp_path / "big/set2"): "set2",
        str(tmp_path / "x/photos"): "x-photos",
        str(tmp_path / "y/photos"): "y-photos",
        str(tmp_path / ".hidden"): "hidden",
    }
    # Adding a source renames only the folder whose name it now shares.
    more = source_folders([*roots, str(tmp_path / "z/x/photos")])
    assert more[str(tmp_path / "y/photos")] == "y-photos"
    assert more[str(tmp_path / "big/set1")] == "set1"
    assert len(set(more.values())) == len(more) == 6
    assert more[str(tmp_path / "x/photos")].startswith("photos-") and more == source_folders(
        [str(tmp_path / "z/x/photos"), *reversed(roots)]
    )


def test_source_folders_use_config_names_and_a_named_cache_refuses_an_unnamed_source(tmp_path: Path) -> None:
    for folder in ("phone", "camera", "other"):
        (tmp_path / folder).mkdir()
    names = {"mine": str(tmp_path / "phone"), "cam": str(tmp_path / "camera") + "/"}
    assert source_folders([str(tmp_path / "phone")], names) == {}
    assert source_folders([str(tmp_path / "phone")], names, named_only=True) == {str(tmp_path / "phone"): "mine"}
    assert source_folders([str(tmp_path / "phone"), str(tmp_path / "camera")], names) == {
        str(tmp_path / "phone"): "mine",
        str(tmp_path / "camera"): "cam",
    }
    with pytest.raises(SpecError, match=r"source .*other is not one of the config's \[sources\] \(cam, mine\)"):
        source_folders([str(tmp_path / "phone"), str(tmp_path / "other")], names, named_only=True)


# --- the config's [sources] table -----------------------------------------------------------


def test_config_sources_table_names_sources_and_supplies_the_default_sources(tmp_path: Path) -> None:
    path = tmp_path / "thumbcli.toml"
    path.write_text('[sources]\nphone = "/srv/phone"\n"card 1" = "/srv/card1"\n')
    config = load_config(path)
    assert config.sources == {"phone": "/srv/phone", "card 1": "/srv/card1"}
    assert config.defaults["generate"]["sources"] == ["/srv/phone", "/srv/card1"]
    path.write_text('sources = ["/srv/a"]\n')
    assert load_config(path).sources == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[sources]\nphone = "/a"\n"a/b" = "/b"\n', ":3: sources.a/b: a source name is one folder name"),
        ('[sources]\n".phone" = "/a"\n', ":2: sources..phone: a source name cannot start with '.'"),
        ('[sources]\nphone = "/a"\ncard = "/a/"\n', ":3: sources.card: names the same folder as sources.phone"),
        ("[sources]\nphone = 3\n", ":2: sources.phone: must be a path: expected a string, got 3 (an integer)"),
        ('[sources]\nphone = ""\n', ":2: sources.phone: the path cannot be empty"),
        ('sources = "/a"\n', ":1: sources: must be a list of paths or a [sources] table"),
    ],
)
def test_config_sources_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


# --- the served cache -----------------------------------------------------------------------


def named_config(tmp_path: Path, *names: str, table: bool = True) -> Path:
    """A config with one preset and the cache; `names` as a [sources] table of tmp_path/<name>, or a list."""
    path = tmp_path / "thumbcli.toml"
    text = f'cache = "{tmp_path / "cache"}"\n'
    if table:
        text += "[sources]\n" + "".join(f'{name} = "{tmp_path / name}"\n' for name in names)
    else:
        text += "sources = [" + ", ".join(f'"{tmp_path / name}"' for name in names) + "]\n"
    text += '[presets.small]\nsize = "64"\nformat = "webp"\n'
    path.write_text(text)
    return path


def test_named_sources_map_to_preset_name_relpath_in_the_cache_and_the_url(tmp_path: Path) -> None:
    seeds = two_cards(tmp_path, "phone", "camera")
    config = named_config(tmp_path, "phone", "camera")
    run = run_cli("--config", config, "generate", "--json")
    assert run.rc == 0, run.stderr
    assert run.summary["made"] == 6
    cache = tmp_path / "cache"
    for source, seed in seeds.items():
        name = source.parent.name
        thumb = resolve_url(cache, url_path_for("small", source.name, source_name=name), read_manifest(cache))
        assert thumb is not None
        assert thumb.path == cache_path(cache, "small", source.name, "webp", source_name=name)
        assert thumb.path == cache / "v1/small" / name / f"{source.name}.webp"
        assert mean_abs_difference(load(thumb.path), draw_photo(240, 160, seed=seed)) < 12
    # One named source alone keeps its name in the layout: the URLs do not depend on what a run walks.
    (cache / "v1/small/phone/IMG_0001.JPG.webp").unlink()
    alone = run_cli("--config", config, "generate", tmp_path / "phone", "--json")
    assert (alone.rc, alone.summary["made"], alone.summary["skipped"]) == (0, 1, 2)
    assert (cache / "v1/small/phone/IMG_0001.JPG.webp").is_file()


def test_an_unnamed_source_into_a_cache_of_named_sources_is_a_usage_error(tmp_path: Path) -> None:
    two_cards(tmp_path, "phone", "other")
    run = run_cli("--config", named_config(tmp_path, "phone"), "generate", tmp_path / "other")
    assert run.rc == 2
    assert "other is not one of the config's [sources] (phone)" in run.stderr
    assert not (tmp_path / "cache").exists()


def test_a_single_unnamed_source_keeps_the_existing_cache_layout(tmp_path: Path) -> None:
    two_cards(tmp_path, "photos")
    run = run_cli("--config", named_config(tmp_path, "photos", table=False), "generate", "--json")
    assert run.rc == 0, run.stderr
    assert sorted(origins(tmp_path / "cache")) == [f"v1/small/{name}.webp" for name in sorted(NAMES)]


def test_prune_moves_a_cache_made_before_its_sources_were_named_and_generate_then_makes_nothing(
    tmp_path: Path,
) -> None:
    seeds = two_cards(tmp_path, "phone")
    cache = tmp_path / "cache"
    assert run_cli("--config", named_config(tmp_path, "phone", table=False), "generate").rc == 0
    before = sorted(origins(cache))
    assert before == [f"v1/small/{name}.webp" for name in sorted(NAMES)]
    config = named_config(tmp_path, "phone")
    planned = run_cli("--config", config, "prune", "--cache", cache, "--dry-run")
    assert planned.rc == 0, planned.stderr
    assert planned.stdout.count("\tmoved to v1/small/phone/") == 3
    assert sorted(origins(cache)) == before
    moved = run_cli("--config", config, "prune", "--cache", cache)
    assert moved.rc == 0, moved.stderr
    assert sorted(origins(cache)) == [f"v1/small/phone/{name}.webp" for name in sorted(NAMES)]
    assert [p.relative_to(cache).as_posix() for p in output_files(cache / "v1")] == sorted(origins(cache))
    again = run_cli("--config", config, "generate", "--json")
    assert (again.rc, again.summary["made"], again.summary["skipped"]) == (0, 0, 3)
    for source, seed in seeds.items():
        assert (
            mean_abs_difference(load(cache / f"v1/small/phone/{source.name}.webp"), draw_photo(240, 160, seed=seed))
            < 12
        )


def test_prune_with_named_sources_removes_a_gone_source_and_sources_no_longer_named(tmp_path: Path) -> None:
    two_cards(tmp_path, "phone", "camera")
    cache = tmp_path / "cache"
    assert run_cli("--config", named_config(tmp_path, "phone", "camera"), "generate").rc == 0
    (tmp_path / "phone/IMG_0002.JPG").unlink()
    config = named_config(tmp_path, "phone")  # camera is no longer a source of this cache
    run = run_cli("--config", config, "prune", "--cache", cache, "--dry-run")
    reasons = sorted(line.split("\t")[2] for line in run.stdout.splitlines())
    assert reasons == ["source is gone"] + ["source is not one of the config's [sources]"] * 3
    assert run_cli("--config", config, "prune", "--cache", cache).rc == 0
    assert sorted(origins(cache)) == ["v1/small/phone/IMG_0001.JPG.webp", "v1/small/phone/photo_0000.jpg.webp"]
    assert not (cache / "v1/small/camera").exists()


# --- serve --named-sources ------------------------------------------------------------------


def test_serve_named_sources_makes_each_sources_thumbnail_under_its_name(tmp_path: Path) -> None:
    seeds = two_cards(tmp_path, "phone", "camera")
    config = named_config(tmp_path, "phone", "camera")
    cache = tmp_path / "cache"
    with running_server(cache, config=config, named_sources=True) as server:
        for source, seed in seeds.items():
            url = url_path_for("small", source.name, source_name=source.parent.name)
            status, body = fetch(server, url)
            assert status == 200, url
            assert body == cache_path(cache, "small", source.name, "webp", source_name=source.parent.name).read_bytes()
            assert (
                mean_abs_difference(
                    load(cache_path(cache, "small", source.name, "webp", source_name=source.parent.name)),
                    draw_photo(240, 160, seed=seed),
                )
                < 12
            )
        for missing in ("/small/nowhere/IMG_0001.JPG", "/small/IMG_0001.JPG", "/small/phone/nope.jpg", "/small/phone"):
            assert fetch(server, missing)[0] == 404, missing
    # What serve made is what generate would: a batch run afterwards finds all fresh.
    run = run_cli("--config", config, "generate", "--json")
    assert (run.rc, run.summary["made"], run.summary["skipped"]) == (0, 0, 6)


def test_serve_source_dir_is_refused_when_the_config_names_its_sources(tmp_path: Path) -> None:
    two_cards(tmp_path, "phone")
    config = named_config(tmp_path, "phone")
    run = run_cli("--config", config, "serve", tmp_path / "cache", "--source", tmp_path / "phone", "--port", "0")
    assert run.rc == 2
    assert "give --named-sources, not --source DIR" in run.stderr
    bare = run_cli(
        "--config", named_config(tmp_path, "phone", table=False), "serve", tmp_path / "cache", "--named-sources"
    )
    assert bare.rc == 2
    assert "--named-sources needs a [sources] table" in bare.stderr


def test_readme_sources_table_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    [example] = [block.split("```", 1)[0] for block in readme.split("```toml\n")[1:] if "[sources]" in block]
    path = tmp_path / "thumbcli.toml"
    path.write_text(example)
    assert load_config(path).sources == {"phone": "/srv/phone", "camera": "/srv/camera"}


def test_serve_named_sources_says_at_start_that_it_makes_misses_from_each_source(tmp_path: Path) -> None:
    two_cards(tmp_path, "phone", "camera")
    config = named_config(tmp_path, "phone", "camera")
    with running_server(tmp_path / "cache", config=config, named_sources=True) as server:
        # The lines that describe the server follow the one that says where it listens.
        assert wait_until(lambda: any("generate on a miss" in line for line in server.stderr_lines))
        said = [line for line in server.stderr_lines if "generate on a miss" in line]
    assert len(said) == 1, server.stderr_lines
    assert "generate on a miss: on, small from " in said[0]
    assert f"phone={tmp_path / 'phone'}" in said[0] and f"camera={tmp_path / 'camera'}" in said[0]
