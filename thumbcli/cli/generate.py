"""`thumbcli generate`: its options, a progress bar and signals around `run.generate`, and the summary printed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import click
from click.core import ParameterSource

from thumbcli.config import (
    Config,
)
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, LockedError
from thumbcli.fsutil import TEMP_PREFIX, open_for_append
from thumbcli.spec import FITS, FORMATS, Fit, Format, Limits, RunOptions, SizeBox, ThumbSpec, WalkOptions, human_bytes

if TYPE_CHECKING:
    from thumbcli.job import GenerateJob
    from thumbcli.make.results import FileResult
    from thumbcli.progress import ProgressBar
    from thumbcli.run import GenerateSummary
from thumbcli.cli.options import (
    Duration,
    FolderOrBucket,
    P,
    R,
    Shard,
    complete_presets,
    complete_sources,
    configure_logging,
    debug_option,
    dry_run_option,
    exits_on_errors,
    grouped_options,
    json_option,
    limit_options,
    no_sandbox_option,
    quiet_option,
    wait_option,
)

_DEFAULT_RUN = RunOptions(workers=1)
_DEFAULT_WALK = WalkOptions()
_DEFAULT_SPEC = ThumbSpec(SizeBox(256, 256))


def _walk(
    hidden: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    follow_symlinks: bool,
    walkers: int | None,
    shard: tuple[int, int],
) -> WalkOptions:
    return WalkOptions(
        hidden=hidden,
        follow_symlinks=follow_symlinks,
        include=include,
        exclude=exclude,
        processes=walkers or _DEFAULT_WALK.processes,
        shard=shard,
    )


#: Which files the walk finds, and how it walks: the command gets them as one `walk: WalkOptions`.
walk_options = grouped_options(
    "walk",
    _walk,
    click.option("--hidden", is_flag=True, help="Include hidden files and folders."),
    click.option(
        "--include", multiple=True, metavar="GLOB", help="Only files whose relative path or name matches; repeatable."
    ),
    click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files and folders that match; repeatable."),
    click.option("-L", "--follow-symlinks", is_flag=True, help="Follow symlinks (loops are detected and reported)."),
    click.option(
        "--walkers",
        type=click.IntRange(1, 64),
        help="Processes walking and stat-ing the sources; more help on network filesystems."
        "  [default: number of cores, at most 4]",
    ),
    click.option(
        "--shard",
        type=Shard(),
        default="0/1",
        help="Make only share I of N of the folders (0 <= I < N), with its own lock and state; for other schedulers.",
    ),
)


def _run(
    limits: Limits,
    force: bool,
    retry_failed: bool,
    loaders: int,
    workers: int | None,
    writers: int,
    pin_workers: bool,
    strict: bool,
    max_files: int | None,
    max_time: float | None,
) -> RunOptions:
    return RunOptions(
        loaders=loaders,
        writers=writers,
        pin_workers=pin_workers,
        limits=limits,
        force=force,
        max_files=max_files,
        max_seconds=max_time,
        strict=strict,
        retry_failed=retry_failed,
        **({"workers": workers} if workers else {}),
    )


#: How the run goes: threads, workers, policies and budgets; the command gets them as one `run: RunOptions`.
run_options = grouped_options(
    "run",
    _run,
    click.option("--force", is_flag=True, help="Remake thumbnails even when they are up to date."),
    click.option(
        "--retry-failed",
        is_flag=True,
        help="Try again the files that failed to decode in earlier runs (otherwise retried only once they change).",
    ),
    click.option(
        "--loaders",
        type=click.IntRange(1, 256),
        default=_DEFAULT_RUN.loaders,
        show_default=True,
        help="Threads reading files.",
    ),
    click.option("-j", "--workers", type=click.IntRange(1, 256), help="Resample workers.  [default: number of cores]"),
    click.option(
        "--writers",
        type=click.IntRange(1, 256),
        default=_DEFAULT_RUN.writers,
        show_default=True,
        help="Threads writing thumbnails.",
    ),
    click.option(
        "--pin-workers/--no-pin-workers",
        default=_DEFAULT_RUN.pin_workers,
        show_default=True,
        help="Keep each resample worker on a core of its own (when there is one worker per core).",
    ),
    click.option(
        "--strict",
        is_flag=True,
        help="Refuse truncated or damaged images instead of making degraded thumbnails of what decodes.",
    ),
    click.option(
        "--max-files", type=click.IntRange(1), help="Stop after starting this many files (the next run goes on)."
    ),
    click.option(
        "--max-time",
        type=Duration(),
        help="Stop taking new files after this long, e.g. 15m; decodes still running 5 s later are given up.",
    ),
    takes=("limits",),
)


#: Where the thumbnails go and what they are: the same options for `generate` and `watch`.
_WHAT_TO_MAKE = [
    click.option(
        "-o",
        "--output",
        type=FolderOrBucket(file_okay=False, path_type=Path),
        help="Write thumbnails into this folder tree (or bucket: s3://bucket/prefix, az://container/prefix).",
    ),
    click.option(
        "--cache",
        "cache_dir",
        type=FolderOrBucket(file_okay=False, path_type=Path),
        help="Write into a served cache folder or bucket (see `thumbcli serve`).",
    ),
    click.option(
        "--cache-control",
        default="",
        metavar="VALUE",
        help="The Cache-Control of each thumbnail written to a bucket  [default: public, max-age=86400].",
    ),
    click.option(
        "--freedesktop",
        "flavours",
        multiple=True,
        type=click.Choice(["normal", "large", "x-large", "xx-large"]),
        help="Warm the desktop thumbnail cache ($XDG_CACHE_HOME/thumbnails) at this size; repeatable.",
    ),
    click.option(
        "-p",
        "--preset",
        "presets",
        multiple=True,
        metavar="NAME",
        shell_complete=complete_presets,
        help="A preset from the config; repeatable.",
    ),
    click.option(
        "-s",
        "--size",
        "sizes",
        multiple=True,
        metavar="BOX",
        help="256, 320x240, 200x or x200; repeatable.  [default: 256]",
    ),
    click.option(
        "--fit",
        type=click.Choice(FITS),
        default=_DEFAULT_SPEC.fit,
        show_default=True,
        help="inside: whole image; cover: fill and centre-crop; smart: fill and attention-crop.",
    ),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default=_DEFAULT_SPEC.format,
        show_default=True,
        help="Output format.",
    ),
    click.option(
        "-q", "--quality", type=click.IntRange(1, 100), help="Encoder quality.  [default: jpeg 80, webp 82, avif 60]"
    ),
    click.option("--upscale", is_flag=True, help="Enlarge images smaller than the box."),
    click.option("--keep-metadata", is_flag=True, help="Keep EXIF/XMP/ICC metadata (stripped by default)."),
    click.option(
        "--name",
        "name_template",
        metavar="TEMPLATE",
        help="Output path template (fields in README).  [default: {size}/{relpath}.{ext}]",
    ),
]


def cache_asked(
    cache_dir: Path | str | None, output: Path | str | None, flavours: tuple[str, ...]
) -> tuple[Path | str | None, bool]:
    """The --cache to write to, and whether the config or environment named it rather than the command line.

    A cache named by the config or environment gives way to a destination on the command line.
    """
    source = click.get_current_context().get_parameter_source("cache_dir")
    configured = source in (ParameterSource.DEFAULT_MAP, ParameterSource.ENVIRONMENT)
    return (None if (output or flavours) and configured else cache_dir), configured


def what_to_make_options(command: Callable[P, R]) -> Callable[P, R]:
    """-o/--cache/--freedesktop, presets, sizes and encoder settings, as `generate` takes them."""
    for option in reversed(_WHAT_TO_MAKE):
        command = option(command)
    return command


@click.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=str), shell_complete=complete_sources)
@what_to_make_options
@dry_run_option("Only count what would be made and estimate its disk space.")
@click.option(
    "--verify-destination",
    is_flag=True,
    help="List a bucket destination first and make again what was deleted there (one request per 1,000 objects).",
)
@click.option(
    "--dask",
    metavar="ADDRESS",
    help="Make the thumbnails on the Dask scheduler at ADDRESS (tcp://host:8786), or on `local[:N]` worker processes.",
)
@wait_option
@json_option("Print a JSON summary on stdout.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write Prometheus textfile metrics here (node_exporter textfile collector).",
)
@click.option(
    "--fail-log", type=click.Path(dir_okay=False, path_type=Path), help="Append failed files and reasons to this file."
)
@quiet_option("No progress bar and no summary; failures are still printed.")
@debug_option("Debug logging and tracebacks.")
@no_sandbox_option
@click.pass_obj
@exits_on_errors
@walk_options
@limit_options()
@run_options
def generate(
    config: Config,
    /,
    *,
    sources: tuple[str, ...],
    output: Path | str | None,
    cache_dir: Path | str | None,
    cache_control: str,
    verify_destination: bool,
    flavours: tuple[str, ...],
    presets: tuple[str, ...],
    sizes: tuple[str, ...],
    fit: Fit,
    fmt: Format,
    quality: int | None,
    upscale: bool,
    keep_metadata: bool,
    name_template: str | None,
    walk: WalkOptions,
    run: RunOptions,
    dry_run: bool,
    wait: bool,
    fail_log: Path | None,
    dask: str | None,
    json_summary: bool,
    metrics_file: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Make thumbnails of the images in SOURCES (files or folders, walked recursively)."""
    from thumbcli.run import GenerateRequest

    configure_logging(debug)
    cache_dir, cache_configured = cache_asked(cache_dir, output, flavours)
    request = GenerateRequest(
        sources=sources,
        output=output,
        cache_dir=cache_dir,
        cache_configured=cache_configured,
        cache_control=cache_control,
        verify_destination=verify_destination,
        flavours=flavours,
        presets=presets,
        sizes=sizes,
        fit=fit,
        fmt=fmt,
        quality=quality,
        upscale=upscale,
        keep_metadata=keep_metadata,
        name_template=name_template,
        walk=walk,
        run=run,
        dry_run=dry_run,
        wait=wait,
        dask=dask,
    )
    job = request.job(config)
    if metrics_file is not None:
        require_writable_folder(metrics_file, "metrics file")
    if job.dask is not None:
        from thumbcli.cluster.client import require_reachable

        require_reachable(job.dask)  # before the run makes any folder
    with opened_fail_log(fail_log) as failures:
        try:
            summary = _generate_with_progress(job, quiet=quiet, fail_log=failures)
        except LockedError:
            if quiet:  # cron: two runs meeting is routine, and the exit code says it
                sys.exit(ExitCode.LOCKED)
            raise
    _report_generate(summary, json_summary=json_summary, metrics_file=metrics_file, quiet=quiet)
    sys.exit(summary.exit_code)


def require_writable_folder(path: Path, what: str) -> None:
    """Refuse before the run (one line, exit 3) a file it could not write at its end: cron would see stale metrics."""
    probe = path.parent / f"{TEMP_PREFIX}probe-{os.getpid()}"
    try:
        with contextlib.suppress(FileExistsError):  # a file in the way: the probe says what is wrong
            path.parent.mkdir(parents=True, exist_ok=True)  # made as its write would make it
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise CannotRunError(f"{path}: cannot write the {what} there: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def opened_fail_log(path: Path | None) -> Iterator[TextIO | None]:
    """The --fail-log file, opened to append before the run starts (not through a symlink), or None."""
    if path is None:
        yield None
        return
    try:
        fd = open_for_append(path)
    except OSError as exc:
        raise CannotRunError(f"{path}: cannot open the fail log: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as log:
        yield log


def _generate_with_progress(job: GenerateJob, *, quiet: bool, fail_log: TextIO | None) -> GenerateSummary:
    """Run the job with a progress bar, failures printed (and added to the fail log) as they come, signals wired."""
    # Imported here so that `thumbcli --help` and completion never load libvips.
    from thumbcli.progress import ProgressBar
    from thumbcli.run import RunStopper, generate

    progress = ProgressBar(enabled=not quiet)
    stopper = RunStopper()

    def on_result(result: FileResult) -> None:
        if result.status == "failed":
            _echo_err(progress, f"failed: {result.describe()}")
            if fail_log is not None:
                # The decoder's own words too: the short reason is ours.
                fail_log.write(f"failed: {result.describe()}" + (f" [{result.detail}]" if result.detail else "") + "\n")
        elif result.warning:
            _echo_err(progress, f"warning: {display_path(result.path)}: {result.warning} (thumbnail of what decodes)")
        progress.finished(result.status)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopper.request_stop()
        _echo_err(progress, "thumbcli: stopping: finishing files in flight (signal again to abort)")

    previous = _install_signal_handlers(on_signal)
    try:
        return generate(
            job,
            on_found=progress.found,
            on_skipped=progress.skipped,
            on_walked=progress.walked,
            on_result=on_result,
            stopper=stopper,
        )
    finally:
        _install_signal_handlers(previous)
        progress.close()


def _report_generate(summary: GenerateSummary, *, json_summary: bool, metrics_file: Path | None, quiet: bool) -> None:
    """Print the summary as asked (JSON, a dry-run estimate or a closing line) and write the metrics file."""
    if json_summary:
        click.echo(json.dumps(summary.as_json()))
    if metrics_file is not None:
        from thumbcli.metrics import write_run_metrics

        write_run_metrics(metrics_file, summary)
    plan = summary.dry_run
    if plan is not None and not json_summary:
        click.echo(
            f"would make {sum(plan.thumbnails_by_spec.values())} thumbnails of {plan.files} files "
            f"(about {human_bytes(plan.estimated_bytes)}); {summary.skipped} files up to date, "
            f"{summary.failed} failed"
        )
    elif not quiet and (sys.stderr.isatty() or summary.failed or summary.stopped == "interrupted"):
        cut = f", stopped early ({summary.stopped})" if summary.stopped else ""
        known = f", {summary.known_failures} known failures" if summary.known_failures else ""
        click.echo(
            f"thumbcli: made {summary.made}, skipped {summary.skipped}, failed {summary.failed}{known} "
            f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s){cut}",
            err=True,
        )


def _echo_err(progress: ProgressBar, line: str) -> None:
    if not progress.write_line(line):
        click.echo(line, err=True)


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def _install_signal_handlers(handler: Any) -> dict[int, SignalHandler]:
    """Install `handler` (or a dict of per-signal handlers) for SIGINT and SIGTERM; return the old ones."""
    previous: dict[int, SignalHandler] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        new = handler[signum] if isinstance(handler, dict) else handler
        previous[signum] = signal.signal(signum, new)
    return previous
