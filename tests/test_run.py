"""thumbcli.run as a library: generate and prune on real images, checked through their typed summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imagekit import load, make_photo, output_files

from thumbcli.config import Config
from thumbcli.errors import ExitCode, SpecError
from thumbcli.job import CacheDestination, GenerateJob, TreeDestination, choose_destination
from thumbcli.make.results import FileResult
from thumbcli.run import DryRunPlan, GenerateRequest, RunStopper, choose_specs, generate, prune
from thumbcli.spec import RunOptions, SizeBox, ThumbSpec, WalkOptions

ONE_WORKER = RunOptions(loaders=1, workers=1, writers=1)
ONE_WALKER = WalkOptions(processes=1)


def photos(folder: Path, count: int) -> list[Path]:
    return [make_photo(folder / f"p{index}.jpg", 320, 240, seed=index) for index in range(count)]


def tree_job(src: Path, out: Path, *sizes: str, **settings: object) -> GenerateJob:
    specs = tuple(ThumbSpec(SizeBox.parse(size)) for size in sizes)
    options = {"run": ONE_WORKER, "walk": ONE_WALKER, **settings}
    return GenerateJob((str(src),), TreeDestination(out), specs, **options)  # type: ignore[arg-type]


def test_generate_returns_a_summary_of_what_it_made_and_then_skipped(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    out = tmp_path / "out"
    first = generate(tree_job(tmp_path / "src", out, "64", "128"))
    assert (first.found, first.made, first.thumbnails, first.skipped, first.failed) == (2, 2, 4, 0, 0)
    assert first.exit_code == ExitCode.OK and first.stopped is None and first.failures == ()
    assert first.output == out and first.dry_run is None and first.bytes_read > 0
    assert max(load(out / "64" / "p0.jpg.jpg").width, load(out / "64" / "p0.jpg.jpg").height) == 64
    again = generate(tree_job(tmp_path / "src", out, "64", "128"))
    assert (again.made, again.skipped, again.exit_code) == (0, 2, ExitCode.OK)


def test_generate_lists_a_broken_file_as_a_failure_and_passes_it_on_as_it_comes(tmp_path: Path) -> None:
    photos(tmp_path / "src", 1)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    passed_on: list[FileResult] = []
    summary = generate(tree_job(tmp_path / "src", tmp_path / "out", "64"), on_result=passed_on.append)
    assert (summary.made, summary.failed, summary.exit_code) == (1, 1, ExitCode.SOME_FAILED)
    [failure] = summary.failures
    assert failure.path.endswith("broken.jpg") and failure.reason
    [failed] = [result for result in passed_on if result.status == "failed"]
    assert failed.reason == failure.reason and failed.path.endswith("broken.jpg")


def test_generate_dry_run_plans_and_estimates_without_writing(tmp_path: Path) -> None:
    photos(tmp_path / "src", 3)
    out = tmp_path / "out"
    summary = generate(tree_job(tmp_path / "src", out, "64", "128", dry_run=True))
    assert isinstance(summary.dry_run, DryRunPlan)
    assert summary.dry_run.files == 3 and summary.dry_run.thumbnails_by_spec == {"64": 3, "128": 3}
    assert summary.dry_run.estimated_bytes > 0
    assert output_files(out) == []
    shown = summary.as_json()
    assert (shown["planned"], shown["planned_thumbnails"]) == (3, {"64": 3, "128": 3})


def test_generate_summary_as_json_is_plain_json_with_the_counts(tmp_path: Path) -> None:
    photos(tmp_path / "src", 1)
    shown = generate(tree_job(tmp_path / "src", tmp_path / "out", "64")).as_json()
    assert json.loads(json.dumps(shown)) == shown
    assert (shown["made"], shown["thumbnails"], shown["exit_code"], shown["failures"]) == (1, 1, 0, [])
    assert shown["output"] == str(tmp_path / "out") and "planned" not in shown


def test_a_stop_requested_before_the_run_starts_stops_it_as_interrupted(tmp_path: Path) -> None:
    photos(tmp_path / "src", 3)
    stopper = RunStopper()
    stopper.request_stop()
    summary = generate(tree_job(tmp_path / "src", tmp_path / "out", "64"), stopper=stopper)
    assert summary.stopped == "interrupted" and summary.exit_code == ExitCode.INTERRUPTED
    assert (summary.made, summary.found) == (0, 0)


def test_generate_cut_short_by_max_files_says_so(tmp_path: Path) -> None:
    photos(tmp_path / "src", 3)
    run = RunOptions(loaders=1, workers=1, writers=1, max_files=1)
    summary = generate(tree_job(tmp_path / "src", tmp_path / "out", "64", run=run))
    assert summary.stopped == "max-files" and summary.exit_code == ExitCode.CUT_SHORT and summary.made == 1


def test_generate_reports_each_result_and_what_it_found_through_callbacks(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    found: list[int] = []
    statuses: list[str] = []
    generate(
        tree_job(tmp_path / "src", tmp_path / "out", "64"),
        on_found=found.append,
        on_result=lambda result: statuses.append(result.status),
    )
    assert sum(found) == 2 and statuses == ["made", "made"]


def test_choose_destination_wants_exactly_one_and_name_only_for_a_tree(tmp_path: Path) -> None:
    assert choose_destination(tmp_path, None, (), "{name}") == TreeDestination(tmp_path, "{name}")
    with pytest.raises(SpecError, match="exactly one"):
        choose_destination(tmp_path, tmp_path, (), None)
    with pytest.raises(SpecError, match="exactly one"):
        choose_destination(None, None, (), None)
    with pytest.raises(SpecError, match="a name template only applies"):
        choose_destination(None, tmp_path, (), "{name}")


def test_choose_specs_takes_named_presets_or_every_preset_of_a_cache_or_sizes(tmp_path: Path) -> None:
    small, large = ThumbSpec(SizeBox.parse("64"), name="small"), ThumbSpec(SizeBox.parse("512"), name="large")
    config = Config(path=tmp_path / "thumbcli.toml", presets={"small": small, "large": large})
    cache = CacheDestination(tmp_path / "cache")
    assert choose_specs(config, cache, GenerateRequest(presets=("large",))) == (large,)
    assert choose_specs(config, cache, GenerateRequest()) == (small, large)
    [sized] = choose_specs(Config(), TreeDestination(tmp_path), GenerateRequest(sizes=("100x",), fmt="png"))
    assert (sized.box.label, sized.format) == ("100x", "png")
    with pytest.raises(SpecError, match="unknown preset"):
        choose_specs(config, cache, GenerateRequest(presets=("medium",)))
    with pytest.raises(SpecError, match="not both"):
        choose_specs(config, cache, GenerateRequest(presets=("small",), sizes=("64",)))


def test_prune_removes_the_thumbnails_of_an_unconfigured_preset_and_sums_their_bytes(tmp_path: Path) -> None:
    photos(tmp_path / "src", 2)
    cache = tmp_path / "cache"
    small, large = ThumbSpec(SizeBox.parse("64"), name="small"), ThumbSpec(SizeBox.parse("128"), name="large")
    job = GenerateJob((str(tmp_path / "src"),), CacheDestination(cache), (small, large), ONE_WORKER, ONE_WALKER)
    assert generate(job).thumbnails == 4
    planned = prune(CacheDestination(cache), presets={"small": small}, dry_run=True)
    assert planned.dry_run and len(planned.removals) == 2
    assert all(r.path.exists() and "large" in r.reason for r in planned.removals)
    done = prune(CacheDestination(cache), presets={"small": small})
    assert [r.path for r in done.removals] == [r.path for r in planned.removals]
    assert done.bytes == sum(r.bytes for r in planned.removals) > 0
    assert not any(r.path.exists() for r in done.removals)
    assert done.as_json()["files"] == 2
    assert len(output_files(cache / "v1" / "small")) == 2


def test_choose_specs_refuses_to_invent_a_preset_in_a_configured_cache(tmp_path: Path) -> None:
    configured = CacheDestination(tmp_path / "cache", configured=True)
    with pytest.raises(SpecError, match=r"size 64 would add a preset to the configured cache .*: name an output tree"):
        choose_specs(Config(), configured, GenerateRequest(sizes=("64",)))
    [spec] = choose_specs(Config(), CacheDestination(tmp_path / "cache"), GenerateRequest(sizes=("64",)))
    assert spec.name == "64"
