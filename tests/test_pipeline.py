"""The threaded pipeline, driven directly with a real output tree."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from imagekit import load, make_photo, output_files

from thumbcli.discover import DirBatch, SourceFile
from thumbcli.make.pipeline import PIPELINED, Pipeline
from thumbcli.make.results import FileResult
from thumbcli.resample import Thumbnail
from thumbcli.spec import RunOptions, SizeBox, ThumbSpec, WalkOptions
from thumbcli.targets.plan import Plan, plan_each
from thumbcli.targets.tree import OutputTree

SPECS = (ThumbSpec(SizeBox.parse("64")),)


class WrappedTarget:
    """An OutputTree with hooks around plan() and write(), for timing-sensitive tests."""

    def __init__(self, inner: OutputTree) -> None:
        self.inner = inner
        self.specs = inner.specs

    def plan(self, source: SourceFile, force: bool) -> Plan:
        return self.inner.plan(source, force)

    def plan_batch(self, batch: DirBatch, force: bool) -> tuple[int, list[tuple[SourceFile, Plan]]]:
        return plan_each(self, batch, force)

    def known_fresh(self, batch: DirBatch) -> bool:
        return False

    def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
        self.inner.write(source, made)

    def close(self) -> None:
        self.inner.close()


def make_sources(folder: Path, count: int) -> list[Path]:
    return [make_photo(folder / f"img{i:03d}.jpg", 120, 80, seed=i, Q=70) for i in range(count)]


def make_copies(folder: Path, count: int) -> int:
    """`count` byte-identical sources, so the bytes a run has read say how many files it has read; their size."""
    first = make_photo(folder / "img000.jpg", 120, 80, seed=0, Q=70)
    for i in range(1, count):
        shutil.copyfile(first, folder / f"img{i:03d}.jpg")
    return first.stat().st_size


def files_read(pipeline: Pipeline, size: int) -> int:
    """Sources the pipeline has read so far, from the bytes it counts as read (RunStats.bytes_read)."""
    return pipeline.stats.bytes_read // size


def run_pipeline(src: Path, target: WrappedTarget | OutputTree, run: RunOptions) -> tuple[Pipeline, list[FileResult]]:
    results: list[FileResult] = []
    pipeline = Pipeline([str(src)], target, run, WalkOptions(), on_result=results.append)
    try:
        pipeline.run()
    finally:
        target.close()
    return pipeline, results


def test_pipeline_memory_is_bounded_by_queues_when_the_writer_is_slow(tmp_path: Path) -> None:
    size = make_copies(tmp_path / "src", 40)
    written = 0
    run = RunOptions(loaders=2, workers=2, writers=1, queue_depth=2)
    # Read but not yet written: held by a loader, queued for a worker, sent to or held by a worker
    # (PIPELINED each), queued for or held by a writer.
    bound = run.loaders + run.queue_depth + run.workers * PIPELINED + run.queue_depth + run.writers
    in_flight: list[int] = []

    class SlowTarget(WrappedTarget):
        def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
            nonlocal written
            time.sleep(0.02)
            in_flight.append(files_read(pipeline, size) - written)
            super().write(source, made)
            written += 1

    results: list[FileResult] = []
    target = SlowTarget(OutputTree(tmp_path / "out", SPECS))
    pipeline = Pipeline([str(tmp_path / "src")], target, run, WalkOptions(), on_result=results.append)
    try:
        stats = pipeline.run()
    finally:
        target.close()
    assert stats.made == 40 and written == 40
    assert len(in_flight) == 40
    assert max(in_flight) <= bound, in_flight
    # The slow writer did hold work back: the queues filled up.
    assert max(in_flight) >= run.queue_depth


def test_pipeline_reports_a_source_deleted_between_walk_and_load(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "src", 3)
    doomed = sources[1]

    class DeletingTarget(WrappedTarget):
        def plan(self, source: SourceFile, force: bool) -> Plan:
            if source.path == str(doomed):
                doomed.unlink()
            return super().plan(source, force)

    _, results = run_pipeline(tmp_path / "src", DeletingTarget(OutputTree(tmp_path / "out", SPECS)), RunOptions())
    by_path = {result.path: result for result in results}
    assert by_path[str(doomed)].status == "failed"
    assert "no such file" in by_path[str(doomed)].describe().lower()
    assert "\n" not in by_path[str(doomed)].describe()
    assert sorted(r.status for r in results) == ["failed", "made", "made"]


def test_pipeline_records_what_was_read_when_a_source_changes_after_the_walk(tmp_path: Path) -> None:
    (source,) = make_sources(tmp_path / "src", 1)

    class RewritingTarget(WrappedTarget):
        def plan(self, src: SourceFile, force: bool) -> Plan:
            make_photo(source, 100, 50, Q=70)
            return super().plan(src, force)

    run_pipeline(tmp_path / "src", RewritingTarget(OutputTree(tmp_path / "out", SPECS)), RunOptions())
    (thumb,) = output_files(tmp_path / "out")
    assert (load(thumb).width, load(thumb).height) == (64, 32)
    # The record matches the file as it now is: a rerun skips it.
    pipeline, results = run_pipeline(tmp_path / "src", OutputTree(tmp_path / "out", SPECS), RunOptions())
    assert results == []
    assert (pipeline.stats.skipped, pipeline.stats.made) == (1, 0)


def test_pipeline_stop_finishes_files_in_flight_and_takes_no_more(tmp_path: Path) -> None:
    make_sources(tmp_path / "src", 30)
    first_write = threading.Event()

    class StoppingTarget(WrappedTarget):
        def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
            super().write(source, made)
            if not first_write.is_set():
                first_write.set()
                pipeline.stop()

    target = StoppingTarget(OutputTree(tmp_path / "out", SPECS))
    pipeline = Pipeline([str(tmp_path / "src")], target, RunOptions(workers=1, queue_depth=1), WalkOptions())
    try:
        stats = pipeline.run()
    finally:
        target.close()
    assert stats.stopped == "interrupted"
    assert 1 <= stats.made < 30
    assert len(output_files(tmp_path / "out")) == stats.made
    for path in output_files(tmp_path / "out"):
        load(path)


def test_pipeline_reraises_a_bug_in_the_target_instead_of_hanging(tmp_path: Path) -> None:
    make_sources(tmp_path / "src", 30)

    class BuggyTarget(WrappedTarget):
        def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
            raise ZeroDivisionError("a bug")

    outcome: list[BaseException | None] = []

    def body() -> None:
        try:
            run_pipeline(tmp_path / "src", BuggyTarget(OutputTree(tmp_path / "out", SPECS)), RunOptions(queue_depth=1))
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "pipeline hung after a crash"
    assert len(outcome) == 1 and isinstance(outcome[0], ZeroDivisionError)


@pytest.mark.parametrize("max_files", [1, 5])
def test_pipeline_max_files_stops_after_that_many_and_the_next_run_goes_on(tmp_path: Path, max_files: int) -> None:
    make_sources(tmp_path / "src", 7)
    made = 0
    for _ in range(10):
        pipeline = Pipeline(
            [str(tmp_path / "src")],
            target := OutputTree(tmp_path / "out", SPECS),
            RunOptions(max_files=max_files),
            WalkOptions(),
        )
        try:
            stats = pipeline.run()
        finally:
            target.close()
        assert stats.made <= max_files
        made += stats.made
        if stats.stopped is None:
            break
    assert made == 7 and len(output_files(tmp_path / "out")) == 7


def test_pipeline_holds_no_more_source_bytes_than_its_byte_budget(tmp_path: Path) -> None:
    size = make_copies(tmp_path / "src", 30)
    written = 0
    # A budget under one file: one source at a time between read and resampled.
    run = RunOptions(loaders=2, workers=2, writers=1, queue_depth=4, queue_bytes=1)
    # That one, each worker's made thumbnails waiting for the write queue, the write queue, the writer's.
    bound = 1 + run.workers + run.queue_depth + run.writers
    assert bound < run.loaders + run.queue_depth + run.workers + run.queue_depth + run.writers
    in_flight: list[int] = []

    class SlowTarget(WrappedTarget):
        def write(self, source: SourceFile, made: list[tuple[ThumbSpec, Thumbnail]]) -> None:
            nonlocal written
            time.sleep(0.02)
            in_flight.append(files_read(pipeline, size) - written)
            super().write(source, made)
            written += 1

    target = SlowTarget(OutputTree(tmp_path / "out", SPECS))
    pipeline = Pipeline([str(tmp_path / "src")], target, run, WalkOptions())
    try:
        stats = pipeline.run()
    finally:
        target.close()
    assert stats.made == 30 and len(in_flight) == 30
    assert max(in_flight) <= bound, in_flight
    assert max(in_flight) >= run.queue_depth


def test_pipeline_fed_batches_makes_each_as_it_comes_stale_ones_included(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    first, second = make_sources(src, 2)
    made_before = OutputTree(tmp_path / "out", SPECS)
    assert Pipeline([str(src)], made_before, RunOptions(workers=1), WalkOptions()).run().made == 2
    made_before.close()
    target = OutputTree(tmp_path / "out", SPECS)
    fed: list[DirBatch | int] = []
    closed = threading.Event()

    def batch_of(path: Path) -> DirBatch:
        st = path.stat()
        return DirBatch(str(src), "", str(src), [(path.name, st.st_size, st.st_mtime_ns)])

    def batches():  # type: ignore[no-untyped-def]
        # Each folder as watch feeds it, then nothing until told: the feed has not ended.
        while not closed.is_set():
            if fed:
                yield fed.pop(0)
            else:
                time.sleep(0.01)
                yield 0

    results: list[FileResult] = []
    run = RunOptions(workers=1)
    pipeline = Pipeline([str(src)], target, run, WalkOptions(), on_result=results.append, batches=batches())
    runner = threading.Thread(target=pipeline.run)
    runner.start()
    try:
        # Changed in place: its thumbnail is stale, not missing; made while the feed goes on, not held for its end.
        make_photo(first, 120, 80, seed=9, Q=70)
        fed.extend([batch_of(first), batch_of(second)])
        deadline = time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(Path(r.path).name, r.status) for r in results] == [("img000.jpg", "made")]
        assert runner.is_alive()  # the feed had not ended
    finally:
        closed.set()
        runner.join(60)
        target.close()
    assert (pipeline.stats.made, pipeline.stats.skipped) == (1, 1)
