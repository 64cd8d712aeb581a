"""Generate and prune as library calls returning typed results that the CLI prints and the metrics writer reads."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from thumbcli.config import Config
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, SpecError
from thumbcli.fsutil import remove_temporary_files
from thumbcli.job import (
    NO_SOURCES,
    CacheDestination,
    Destination,
    FreedesktopDestination,
    GenerateJob,
    TreeDestination,
    choose_destination,
)
from thumbcli.make.pipeline import Pipeline
from thumbcli.make.results import FileResult, RunStats, StopReason
from thumbcli.spec import Fit, Format, RunOptions, SizeBox, ThumbSpec, WalkOptions
from thumbcli.targets.plan import Removal, Target
from thumbcli.targets.served import CacheDirectory
from thumbcli.targets.tree import DEFAULT_NAME_TEMPLATE, OutputTree, source_folders

log = logging.getLogger(__name__)

DEFAULT_SIZE = "256"


def choose_specs(config: Config, destination: Destination, request: GenerateRequest) -> tuple[ThumbSpec, ...]:
    """The specs to make: named presets, every configured preset of a cache, or sizes with the given settings."""
    if isinstance(destination, FreedesktopDestination):
        return ()  # the desktop cache's sizes are its flavours
    if request.presets:
        if request.sizes:
            raise SpecError("give presets or sizes, not both", "presets", "sizes")
        return config.specs_to_make(request.presets)
    if isinstance(destination, CacheDestination) and config.presets and not request.sizes:
        return config.specs_to_make(())
    if isinstance(destination, CacheDestination) and destination.configured:
        # A forgotten -o must not add a preset named after a size to the configured cache.
        sizes = ", ".join(request.sizes or (DEFAULT_SIZE,))
        raise SpecError(
            f"size {sizes} would add a preset to the configured cache {display_path(destination.root)}: "
            "name an output tree to write a folder tree, the cache itself to add it to the cache on purpose, "
            "or a configured preset",
            "sizes",
            "output",
            "cache_dir",
            "presets",
        )
    specs = (
        ThumbSpec(
            SizeBox.parse(text),
            fit=request.fit,
            format=request.fmt,
            quality=request.quality if request.quality is not None else config.quality_for(request.fmt),
            upscale=request.upscale,
            keep_metadata=request.keep_metadata,
        )
        for text in (request.sizes or (DEFAULT_SIZE,))
    )
    return tuple(dict.fromkeys(specs))


_DEFAULT_SPEC = ThumbSpec(SizeBox(256, 256))


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What `generate` was asked, before it is a job: the destination and the specs are chosen against the config."""

    sources: tuple[str, ...] = ()
    #: A folder, or a bucket URL as a str (`s3://bucket/prefix`).
    output: Path | str | None = None
    cache_dir: Path | str | None = None
    #: The Cache-Control of each thumbnail PUT to a bucket ("": the default).
    cache_control: str = ""
    #: List a bucket destination at the start (a thumbnail deleted there is made again).
    verify_destination: bool = False
    #: The cache was named by the config or environment, not on the command line.
    cache_configured: bool = False
    flavours: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    fit: Fit = _DEFAULT_SPEC.fit
    fmt: Format = _DEFAULT_SPEC.format
    quality: int | None = None
    upscale: bool = False
    keep_metadata: bool = False
    name_template: str | None = None
    walk: WalkOptions = field(default_factory=WalkOptions)
    run: RunOptions = field(default_factory=RunOptions)
    dry_run: bool = False
    wait: bool = False
    dask: str | None = None

    def job(self, config: Config) -> GenerateJob:
        """The job this request asks for, with its specs resolved against the config's presets."""
        if not self.sources:
            raise SpecError(NO_SOURCES)
        destination = choose_destination(
            self.output,
            self.cache_dir,
            self.flavours,
            self.name_template,
            cache_configured=self.cache_configured,
            cache_control=self.cache_control,
            verify_destination=self.verify_destination,
        )
        specs = choose_specs(config, destination, self)
        cache_presets = isinstance(destination, CacheDestination) and bool(self.presets)
        return GenerateJob(
            tuple(self.sources),
            destination,
            specs,
            self.run,
            self.walk,
            dry_run=self.dry_run,
            wait=self.wait,
            source_names=config.sources,
            dask=self.dask,
            decode_for=config.specs_to_make(()) if cache_presets else (),
        )


def open_target(job: GenerateJob) -> Target:
    """The destination's target, locked for the run."""
    destination = job.destination
    if isinstance(destination, FreedesktopDestination):
        return open_desktop_cache(job, destination)
    return open_tree(job, destination)


def open_desktop_cache(job: GenerateJob, destination: FreedesktopDestination) -> Target:
    """The desktop thumbnail cache at the job's sizes, locked for the run."""
    from thumbcli.targets.freedesktop import FreedesktopCache, default_thumbnail_root

    return FreedesktopCache(
        default_thumbnail_root(), destination.flavours, wait_for_lock=job.wait, retry_failed=job.run.retry_failed
    )


def open_tree(job: GenerateJob, destination: TreeDestination | CacheDestination) -> OutputTree:
    """The -o tree or served cache of the job, locked for the run."""
    # Each source root gets a folder of its own when there are several (or, in a cache, when the
    # config names them), so the same names under two roots never meet. Files named one by one from
    # a single folder share a root: `generate photos/*.jpg` keeps the one-source layout.
    is_cache = isinstance(destination, CacheDestination)
    folders = source_folders(job.sources, job.source_names, named_only=is_cache and bool(job.source_names))
    # Without root folders, several sources (files named one by one) may still claim one name.
    several_sources = len(job.sources) > 1 and not folders
    # What every kind of tree is opened with: where the walk's folders go, the lock, the shard, failures.
    opened_with: dict[str, Any] = {
        "wait_for_lock": job.wait,
        "source_folders": folders,
        "shard": job.walk.shard,
        "retry_failed": job.run.retry_failed,
    }
    if destination.bucket:
        return _open_bucket(job, destination, several_sources, opened_with)
    if isinstance(destination, CacheDestination):
        return CacheDirectory(destination.root, job.specs, check_collisions=several_sources, **opened_with)
    return OutputTree(
        destination.root,
        job.specs,
        name_template=destination.name_template or DEFAULT_NAME_TEMPLATE,
        check_collisions=several_sources or destination.name_template is not None,
        **opened_with,
    )


def _open_bucket(
    job: GenerateJob,
    destination: TreeDestination | CacheDestination,
    several_sources: bool,
    opened_with: dict[str, Any],
) -> OutputTree:
    """The tree or cache of a destination in a bucket, as `open_tree` opens one on disk."""
    from thumbcli.bucket import ObjectError
    from thumbcli.targets.objects import DEFAULT_CACHE_CONTROL, BucketCache, BucketTree

    place = (destination.bucket, destination.root, job.specs)
    cache_control = destination.cache_control or DEFAULT_CACHE_CONTROL
    both = {"cache_control": cache_control, "verify": destination.verify, **opened_with}
    try:
        if isinstance(destination, CacheDestination):
            return BucketCache(*place, check_collisions=several_sources, **both)
        return BucketTree(
            *place,
            name_template=destination.name_template or DEFAULT_NAME_TEMPLATE,
            check_collisions=several_sources or destination.name_template is not None,
            **both,
        )
    except ObjectError as exc:  # its manifest or (verifying) its listing: the run cannot write there
        raise CannotRunError(f"{destination.bucket}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class Failure:
    """One source file that could not be thumbnailed, and why."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class DryRunPlan:
    """What a dry run would make, and about how much disk it would take."""

    files: int
    thumbnails_by_spec: dict[str, int]
    estimated_bytes: int


@dataclass(frozen=True, slots=True)
class GenerateSummary:
    """The outcome of one generate run."""

    found: int
    made: int
    thumbnails: int
    skipped: int
    failed: int
    #: Made from what decodes of a truncated or damaged source (refused under --strict).
    degraded: int
    seconds: float
    images_per_second: float
    bytes_read: int
    stopped: StopReason | None
    exit_code: ExitCode
    output: Path | str  # a folder, or a bucket URL
    failures: tuple[Failure, ...] = ()
    #: Failed in an earlier run and unchanged since: not tried, not reported, not failing the run.
    known_failures: int = 0
    known: tuple[Failure, ...] = ()
    dry_run: DryRunPlan | None = None

    def as_json(self) -> dict[str, object]:
        """The summary as `generate --json` prints it."""
        fields: dict[str, object] = {
            "found": self.found,
            "made": self.made,
            "thumbnails": self.thumbnails,
            "skipped": self.skipped,
            "failed": self.failed,
            "known_failed": self.known_failures,
            "degraded": self.degraded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "bytes_read": self.bytes_read,
            "stopped": self.stopped,
            "exit_code": int(self.exit_code),
            "output": str(self.output),
            "failures": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "known_failures": [{"path": f.path, "reason": f.reason} for f in self.known],
        }
        if self.dry_run is not None:
            fields["planned"] = self.dry_run.files
            fields["planned_thumbnails"] = self.dry_run.thumbnails_by_spec
            fields["estimated_bytes"] = self.dry_run.estimated_bytes
        return fields


def exit_code(stopped: StopReason | None, failed: int) -> ExitCode:
    """The exit code of a run that stopped for `stopped` (None: ran to the end) with `failed` failures.

    Known failures (refused before, unchanged since) are not among `failed`: a rerun with only those is OK.
    """
    if stopped == "interrupted":
        return ExitCode.INTERRUPTED
    if failed:
        return ExitCode.SOME_FAILED
    if stopped is not None:
        return ExitCode.CUT_SHORT
    return ExitCode.OK


class Stoppable(Protocol):
    """A run that can be told to stop: the local pipeline, or a cluster run's client."""

    def run(self) -> RunStats:
        """Run to the end (or until stopped) and return the counts."""
        ...

    def stop(self, reason: StopReason = "interrupted") -> None:
        """Take no new work; work in flight finishes (on a cluster, an interrupt cancels it)."""
        ...


class RunStopper:
    """Stops a generate run: the first request drains it (files in flight finish), the second abandons it.

    Abandoning removes the temporary files of writes in progress and ends the process at
    once with the interrupted exit code. The CLI calls `request_stop` from its signal handlers.
    """

    def __init__(self) -> None:
        self._requests = 0
        self._pipeline: Stoppable | None = None

    def attach(self, pipeline: Stoppable | None) -> None:
        """Stop this pipeline on request (None: the run is over); a request made before applies at once."""
        self._pipeline = pipeline
        if pipeline is not None and self._requests:
            pipeline.stop("interrupted")

    def request_stop(self) -> None:
        """Drain the run the first time; remove temporary files and exit the process the second."""
        self._requests += 1
        if self._requests > 1:
            remove_temporary_files()
            os._exit(ExitCode.INTERRUPTED)
        log.info("stop requested: finishing the files in flight")
        if self._pipeline is not None:
            self._pipeline.stop("interrupted")


ResultCallback = Callable[[FileResult], None]


def generate(
    job: GenerateJob,
    *,
    on_found: Callable[[int], None] | None = None,
    on_skipped: Callable[[int], None] | None = None,
    on_walked: Callable[[], None] | None = None,
    on_result: ResultCallback | None = None,
    stopper: RunStopper | None = None,
    opened: Target | None = None,
) -> GenerateSummary:
    """Make the job's thumbnails (or, in a dry run, count them) and summarise the run.

    `opened`: the job's target, opened and locked by the caller, who keeps it open after (watch mode).
    """
    destination = job.destination
    target: Target
    tree: OutputTree | None
    if opened is not None:
        target, tree = opened, opened if isinstance(opened, OutputTree) else None
    elif isinstance(destination, FreedesktopDestination):
        target, tree = open_desktop_cache(job, destination), None
    else:
        target = tree = open_tree(job, destination)
    try:
        pipeline: Stoppable
        decode_for = job.decode_for or target.specs
        if job.dask is not None and tree is not None:  # the job refuses --dask for the desktop cache
            from thumbcli.cluster.client import ClusterRun

            pipeline = ClusterRun(
                job,
                tree,
                decode_for=decode_for,
                on_found=on_found,
                on_skipped=on_skipped,
                on_walked=on_walked,
                on_result=on_result,
            )
        else:
            pipeline = Pipeline(
                job.sources,
                target,
                job.run,
                job.walk,
                excluded_dirs=[str(target.root), *destination_urls(target)],
                dry_run=job.dry_run,
                decode_for=decode_for,
                on_found=on_found,
                on_skipped=on_skipped,
                on_walked=on_walked,
                on_result=on_result,
            )
        if stopper is not None:
            stopper.attach(pipeline)
        stats = pipeline.run()
        plan = _dry_run_plan(target, stats) if job.dry_run else None
    finally:
        if stopper is not None:
            stopper.attach(None)
        if opened is None:
            target.close()
    # A bucket's tree or cache (targets/objects.py) is named by its URL, not its local records' folder.
    return _summarize(stats, getattr(target, "url", target.root), plan)


def destination_urls(target: Target) -> list[str]:
    """The URL of a destination in a bucket (targets/objects.py), which a walk of the same bucket must not enter."""
    url = getattr(target, "url", "")
    return [url] if url else []


def _summarize(stats: RunStats, output: Path | str, plan: DryRunPlan | None) -> GenerateSummary:
    return GenerateSummary(
        found=stats.found,
        made=stats.made,
        thumbnails=stats.thumbnails,
        skipped=stats.skipped,
        failed=stats.failed,
        known_failures=stats.known_failures,
        degraded=stats.degraded,
        seconds=stats.seconds,
        images_per_second=stats.images_per_second,
        bytes_read=stats.bytes_read,
        stopped=stats.stopped,
        exit_code=exit_code(stats.stopped, stats.failed),
        output=output,
        failures=tuple(Failure(display_path(r.path), r.reason) for r in stats.failures),
        known=tuple(Failure(display_path(r.path), r.reason) for r in stats.known),
        dry_run=plan,
    )


# Rough bytes per thumbnail pixel, for dry-run estimates before any thumbnail of a spec exists.
_BYTES_PER_PIXEL = {"jpeg": 0.3, "webp": 0.2, "avif": 0.12, "png": 2.0}


def _dry_run_plan(target: Target, stats: RunStats) -> DryRunPlan:
    total = 0
    for spec in target.specs:
        count = stats.planned_by_spec.get(spec.name, 0)
        typical = target.typical_size(spec)
        if typical is None:
            area = (spec.box.width or spec.box.height or 0) * (spec.box.height or spec.box.width or 0)
            typical = int(area * 0.75 * _BYTES_PER_PIXEL[spec.format])
        total += count * typical
    return DryRunPlan(stats.planned, dict(stats.planned_by_spec), total)


@dataclass(frozen=True, slots=True)
class PruneSummary:
    """What prune removed (or, in a dry run, would remove)."""

    dry_run: bool
    removals: tuple[Removal, ...]

    @property
    def bytes(self) -> int:
        """The bytes removed in all."""
        return sum(removal.bytes for removal in self.removals)

    def as_json(self) -> dict[str, object]:
        """The summary as `prune --json` prints it."""
        items = [{"path": r.shown, "bytes": r.bytes, "reason": r.reason} for r in self.removals]
        return {"dry_run": self.dry_run, "files": len(self.removals), "bytes": self.bytes, "removed": items}


def prune(
    destination: Destination,
    *,
    presets: dict[str, ThumbSpec] | None = None,
    sources: dict[str, str] | None = None,
    dry_run: bool = False,
    wait: bool = False,
) -> PruneSummary:
    """Remove thumbnails whose source, preset or settings are gone, and the empty folders left.

    `presets` are a cache's current presets (None: keep every preset, judge sources only).
    `sources` are the config's named sources: thumbnails of other sources go, and those not
    under their source's name (a cache made before they were named) move there.
    """
    if isinstance(destination, FreedesktopDestination):
        return PruneSummary(dry_run, tuple(_prune_freedesktop(dry_run=dry_run, wait=wait)))
    if destination.bucket:
        from thumbcli.targets.objects import BucketCache, BucketTree

    if isinstance(destination, TreeDestination):
        if destination.bucket:
            tree: OutputTree = BucketTree(destination.bucket, destination.root, (), wait_for_lock=wait)
        else:
            tree = OutputTree(destination.root, (), wait_for_lock=wait)
        try:
            return PruneSummary(dry_run, tuple(tree.prune(dry_run=dry_run)))
        finally:
            tree.close()
    current = {name: spec.digest for name, spec in presets.items()} if presets else None
    if destination.bucket:
        target: CacheDirectory = BucketCache(destination.bucket, destination.root, (), wait_for_lock=wait)
    else:
        target = CacheDirectory(destination.root, (), wait_for_lock=wait)
    try:
        return PruneSummary(dry_run, tuple(target.prune(dry_run=dry_run, current=current, sources=sources)))
    finally:
        target.close()


def _prune_freedesktop(*, dry_run: bool, wait: bool) -> list[Removal]:
    from thumbcli.targets.freedesktop import default_thumbnail_root, prune_freedesktop

    return prune_freedesktop(default_thumbnail_root(), dry_run=dry_run, wait_for_lock=wait)
