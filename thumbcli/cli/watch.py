"""`thumbcli watch`: generate's options, signals (TERM drains, HUP rereads the config) and events around `WatchRun`."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import click

from thumbcli.cli.generate import (
    cache_asked,
    opened_fail_log,
    require_writable_folder,
    run_options,
    walk_options,
    what_to_make_options,
)
from thumbcli.cli.options import (
    Duration,
    complete_sources,
    configure_logging,
    debug_option,
    exits_on_errors,
    json_option,
    limit_options,
    no_sandbox_option,
    quiet_option,
    wait_option,
)
from thumbcli.config import Config, ConfigError, load_config
from thumbcli.discover import display_path
from thumbcli.errors import ExitCode
from thumbcli.spec import Fit, Format, RunOptions, WalkOptions

if TYPE_CHECKING:
    from thumbcli.make.results import FileResult
    from thumbcli.run import GenerateRequest, GenerateSummary
    from thumbcli.targets.plan import Removal
    from thumbcli.watch.service import WatchOptions


@click.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=str), shell_complete=complete_sources)
@what_to_make_options
@click.option(
    "--rescan",
    type=Duration(),
    help="Also walk the sources again this often, e.g. 60s (NFS, CIFS: changes made on other hosts); "
    "bucket sources (s3://..., az://...) are listed again this often.  "
    "[default: only folders inotify cannot follow, every 60s; buckets every 60s]",
)
@wait_option
@json_option("Print one JSON line per file made, failed or removed, and at the catch-up and the end.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep Prometheus textfile metrics here: events, queue depth, arrival-to-thumbnail latency.",
)
@click.option(
    "--fail-log", type=click.Path(dir_okay=False, path_type=Path), help="Append failed files and reasons to this file."
)
@quiet_option("Say nothing of the catch-up; failures are still printed.")
@debug_option("Debug logging and tracebacks.")
@no_sandbox_option
@click.pass_obj
@exits_on_errors
@walk_options
@limit_options()
@run_options
def watch(
    config: Config,
    /,
    *,
    sources: tuple[str, ...],
    output: Path | str | None,
    cache_dir: Path | str | None,
    cache_control: str,
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
    rescan: float | None,
    wait: bool,
    fail_log: Path | None,
    json_summary: bool,
    metrics_file: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Make thumbnails of SOURCES (folders or buckets), then of every image that lands in them, until stopped.

    First catches up as `generate` would (and removes the thumbnails of files deleted meanwhile),
    then follows the folders through inotify and lists the buckets (s3://bucket/prefix, az://container/prefix) again
    every --rescan. SIGTERM finishes the files in flight and exits 0; SIGHUP reads the config file again.
    """
    from thumbcli.run import GenerateRequest
    from thumbcli.watch.service import WatchOptions

    configure_logging(debug)
    cache_dir, cache_configured = cache_asked(cache_dir, output, flavours)
    request = GenerateRequest(
        sources=sources,
        output=output,
        cache_dir=cache_dir,
        cache_configured=cache_configured,
        cache_control=cache_control,
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
        wait=wait,
    )
    request.job(config)  # a usage error now, before anything is opened
    if metrics_file is not None:
        require_writable_folder(metrics_file, "metrics file")
    options = WatchOptions(rescan_seconds=rescan, metrics_file=metrics_file)
    with opened_fail_log(fail_log) as failures:
        _watch_until_stopped(request, config, options, json_events=json_summary, quiet=quiet, fail_log=failures)
    sys.exit(ExitCode.OK)


def _watch_until_stopped(
    request: GenerateRequest,
    config: Config,
    options: WatchOptions,
    *,
    json_events: bool,
    quiet: bool,
    fail_log: TextIO | None,
) -> None:
    """Run watches until a stop: each SIGHUP ends one (files in flight finished) and starts the next, config reread."""
    from thumbcli.watch.service import WatchRun

    while True:
        run = WatchRun(
            request.job(config),
            options,
            on_result=lambda result, latency: _on_result(result, latency, json_events, fail_log),
            on_removed=lambda removal: _on_removed(removal, json_events),
            on_caught_up=lambda summary: _on_caught_up(summary, json_events, quiet),
        )
        previous = _install_signal_handlers(run.request_stop, run.request_reload)
        previous_fd = signal.set_wakeup_fd(run.wakeup_fd, warn_on_full_buffer=False)
        try:
            summary = run.run()
        finally:
            signal.set_wakeup_fd(previous_fd)
            _restore_signal_handlers(previous)
            run.close()
        if json_events:
            _emit(summary.as_json())
        if summary.ended == "stopped":
            return
        path = config.path
        if path is None:
            continue
        try:
            config = load_config(path)
        except (ConfigError, OSError) as exc:  # a broken edit: go on with the config that worked
            click.echo(f"thumbcli: config not reloaded: {exc}", err=True)
        else:
            click.echo(f"thumbcli: reloaded {display_path(path)}", err=True)


def _on_result(result: FileResult, latency: float | None, json_events: bool, fail_log: TextIO | None) -> None:
    if result.status == "failed":
        click.echo(f"failed: {result.describe()}", err=True)
        if fail_log is not None:
            fail_log.write(f"failed: {result.describe()}" + (f" [{result.detail}]" if result.detail else "") + "\n")
            fail_log.flush()
    elif result.warning:
        click.echo(f"warning: {display_path(result.path)}: {result.warning} (thumbnail of what decodes)", err=True)
    if json_events and result.status in ("made", "failed"):
        event: dict[str, object] = {"event": result.status, "path": display_path(result.path)}
        if result.reason:
            event["reason"] = result.reason
        if latency is not None:
            event["latency"] = round(latency, 4)
        _emit(event)


def _on_removed(removal: Removal, json_events: bool) -> None:
    if json_events:
        _emit({"event": "removed", "path": removal.shown, "reason": removal.reason})


def _on_caught_up(summary: GenerateSummary, json_events: bool, quiet: bool) -> None:
    if json_events:
        _emit({"event": "caught-up", **summary.as_json()})
    elif not quiet:
        click.echo(
            f"thumbcli: caught up: made {summary.made}, skipped {summary.skipped}, failed {summary.failed}; watching",
            err=True,
        )


def _emit(event: dict[str, object]) -> None:
    click.echo(json.dumps(event))
    sys.stdout.flush()


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _install_signal_handlers(stop: Callable[[], None], reload: Callable[[], None]) -> dict[int, _Handler]:
    """TERM and INT stop the watch (files in flight finish), HUP reloads; the handlers they replace."""

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        reload()

    handlers = {signal.SIGINT: on_stop, signal.SIGTERM: on_stop, signal.SIGHUP: on_reload}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


def _restore_signal_handlers(previous: dict[int, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
