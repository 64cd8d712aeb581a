"""`thumbcli generate --shard I/N`: each invocation makes its share of the folders, with its own lock and state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from imagekit import cli_command, draw_photo, output_files, run_cli

from thumbcli.discover import owner, shard_of

SHARDS = 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """120 small JPEGs in 30 nested folders (and one at the top), and an unsharded run's thumbnails of them."""
    root = tmp_path_factory.mktemp("shard")
    image = draw_photo(96, 64)
    for folder in range(30):
        for index in range(4):
            path = root / "src" / f"y{folder % 3}" / f"album {folder:02d}" / f"p{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.jpegsave(str(path), Q=60 + folder)
    image.jpegsave(str(root / "src" / "top.jpg"))
    assert run_cli("generate", root / "src", "-o", root / "whole", "-s", "48").rc == 0
    return root / "src", root / "whole"


def thumbnails(root: Path) -> dict[Path, bytes]:
    """Every thumbnail under `root`, by relative path, with its bytes."""
    return {path.relative_to(root): path.read_bytes() for path in output_files(root)}


def test_shards_are_disjoint_and_their_union_is_the_unsharded_run(photos: tuple[Path, Path], tmp_path: Path) -> None:
    source, whole = photos
    shares = []
    for index in range(SHARDS):
        share = f"{index}/{SHARDS}"
        run = run_cli("generate", source, "-o", tmp_path / f"shard{index}", "-s", "48", "--shard", share, "--json")
        assert run.rc == 0, run.stderr
        shares.append(thumbnails(tmp_path / f"shard{index}"))
        assert run.summary["made"] == len(shares[-1]) > 0  # each shard had a share
    names = [set(share) for share in shares]
    assert sum(map(len, names)) == len(set().union(*names))  # disjoint
    union = {name: data for share in shares for name, data in share.items()}
    assert union == thumbnails(whole)


def test_shards_run_at_once_on_one_destination_with_their_own_lock_and_state(
    photos: tuple[Path, Path], tmp_path: Path
) -> None:
    source, whole = photos
    output = tmp_path / "out"
    runs = [
        subprocess.Popen(
            cli_command("generate", source, "-o", output, "-s", "48", "--shard", f"{index}/{SHARDS}", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for index in range(SHARDS)
    ]
    results = [run.communicate(timeout=60) for run in runs]
    for run, (_, stderr) in zip(runs, results, strict=True):
        assert run.returncode == 0, stderr.decode()
    summaries = [json.loads(stdout.decode().splitlines()[-1]) for stdout, _ in results]
    assert sum(summary["found"] for summary in summaries) == 121
    assert sum(summary["made"] for summary in summaries) == 121
    assert thumbnails(output) == thumbnails(whole)
    private = sorted(
        path.name for path in (output / ".thumbcli").iterdir() if not path.name.endswith(("-wal", "-shm", "-room"))
    )
    assert private == [f"lock-shard-{i}-of-3" for i in range(3)] + [f"state-shard-{i}-of-3.sqlite" for i in range(3)]
    # Each shard reruns from its own state: nothing to make.
    for index in range(SHARDS):
        rerun = run_cli("generate", source, "-o", output, "-s", "48", "--shard", f"{index}/{SHARDS}", "--json")
        assert (rerun.rc, rerun.summary["made"], rerun.summary["skipped"]) == (0, 0, summaries[index]["found"])


def test_a_folder_always_falls_to_the_same_shard_independently_of_the_walkers() -> None:
    folders = [f"y{i % 7}/album {i:03d}" for i in range(3000)]
    assert [shard_of(folder, 3) for folder in folders] == [shard_of(folder, 3) for folder in folders]
    assert {shard_of(folder, 1) for folder in folders} == {0}
    # Inside shard 0 of 3, three walkers still share the folders out.
    mine = [folder for folder in folders if shard_of(folder, 3) == 0]
    per_walker = [sum(owner(folder, 3) == walker for folder in mine) for walker in range(3)]
    assert min(per_walker) > len(mine) / 3 * 0.8


@pytest.mark.parametrize("share", ["3/3", "1/0", "-1/3", "a/b", "2"])
def test_shard_rejects_a_share_that_is_not_one(share: str, photos: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = photos
    run = run_cli("generate", source, "-o", tmp_path / "out", "--shard", share)
    assert run.rc == 2
    assert "--shard" in run.stderr
    assert not (tmp_path / "out").exists()
