"""The command line: parse options into spec objects, call the library, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from thumbcli import __version__
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, LockedError, SpecError
from thumbcli.spec import FITS, FORMATS, Limits, RunOptions, SizeBox, ThumbSpec, WalkOptions

log = logging.getLogger("thumbcli")

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ByteSize(click.ParamType[int, Any]):
    """A byte count with an optional K/M/G suffix (binary units)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", str(value).lower())
        if not match:
            self.fail(f"{value!r} is not a size such as 500K, 50M or 2G", param, ctx)
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


class Megapixels(click.ParamType[int, Any]):
    """A pixel count given in megapixels (`100` = 100 million pixels)."""

    name = "megapixels"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            pixels = int(float(value) * 1_000_000)
        except ValueError:
            self.fail(f"{value!r} is not a number of megapixels", param, ctx)
        if pixels < 1:
            self.fail("must be positive", param, ctx)
        return pixels


class Duration(click.ParamType[float, Any]):
    """A duration such as 90, 90s, 15m or 2h, in seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value).lower())
        if not match:
            self.fail(f"{value!r} is not a duration such as 90s, 15m or 2h", param, ctx)
        return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="thumbcli: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # libvips warnings about files we already report as failed are noise unless debugging.
    logging.getLogger("pyvips").setLevel(logging.DEBUG if debug else logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="thumbcli")
def main() -> None:
    """Batch thumbnailer, thumbnail-cache warmer and thumbnail server."""


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Write thumbnails into this folder tree."
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write into a served cache folder (see `thumbcli serve`).",
)
@click.option(
    "-s",
    "--size",
    "sizes",
    multiple=True,
    metavar="BOX",
    help="256, 320x240, 200x or x200; repeatable.  [default: 256]",
)
@click.option(
    "--fit",
    type=click.Choice(FITS),
    default="inside",
    show_default=True,
    help="inside: whole image; cover: fill and centre-crop; smart: fill and attention-crop.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jpeg", show_default=True, help="Output format.")
@click.option("-q", "--quality", type=click.IntRange(1, 100), help="Encoder quality.  [default: jpeg/webp 80, avif 50]")
@click.option("--upscale", is_flag=True, help="Enlarge images smaller than the box.")
@click.option("--keep-metadata", is_flag=True, help="Keep EXIF/XMP/ICC metadata (stripped by default).")
@click.option(
    "--name",
    "name_template",
    metavar="TEMPLATE",
    help="Output path template (fields in README).  [default: {size}/{relpath}.{ext}]",
)
@click.option("--hidden", is_flag=True, help="Include hidden files and folders.")
@click.option(
    "--include", multiple=True, metavar="GLOB", help="Only files whose relative path or name matches; repeatable."
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files and folders that match; repeatable.")
@click.option("-L", "--follow-symlinks", is_flag=True, help="Follow symlinks (loops are detected and reported).")
@click.option("--force", is_flag=True, help="Remake thumbnails even when they are up to date.")
@click.option("--loaders", type=click.IntRange(1, 256), default=2, show_default=True, help="Threads reading files.")
@click.option("-j", "--workers", type=click.IntRange(1, 256), help="Resample workers.  [default: number of cores]")
@click.option(
    "--writers", type=click.IntRange(1, 256), default=1, show_default=True, help="Threads writing thumbnails."
)
@click.option("--max-file-size", type=ByteSize(), default="256M", show_default=True, help="Refuse larger source files.")
@click.option(
    "--max-pixels",
    type=Megapixels(),
    default="100",
    show_default=True,
    help="Refuse images with more megapixels (decompression bombs).",
)
@click.option("--max-files", type=click.IntRange(1), help="Stop after starting this many files (the next run goes on).")
@click.option("--max-time", type=Duration(), help="Stop taking new files after this long, e.g. 15m.")
@click.option("--wait", is_flag=True, help="Wait for another run on the same output to finish instead of exiting.")
@click.option("--json", "json_summary", is_flag=True, help="Print a JSON summary on stdout.")
@click.option(
    "--fail-log", type=click.Path(dir_okay=False, path_type=Path), help="Append failed files and reasons to this file."
)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary; failures are still printed.")
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
def generate(**kwargs: Any) -> None:
    """Make thumbnails of the images in SOURCES (files or folders, walked recursively)."""
    _configure_logging(kwargs["debug"])
    try:
        code = _generate(**kwargs)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from exc
    except LockedError as exc:
        _fail(str(exc), ExitCode.LOCKED)
    except CannotRunError as exc:
        _fail(str(exc), ExitCode.CANNOT_RUN)
    sys.exit(code)


def _fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(f"thumbcli: error: {message}", err=True)
    sys.exit(code)


def _generate(
    sources: tuple[str, ...],
    output: Path | None,
    cache_dir: Path | None,
    sizes: tuple[str, ...],
    fit: Any,
    fmt: Any,
    quality: int | None,
    upscale: bool,
    keep_metadata: bool,
    name_template: str | None,
    hidden: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    follow_symlinks: bool,
    force: bool,
    loaders: int,
    workers: int | None,
    writers: int,
    max_file_size: int,
    max_pixels: int,
    max_files: int | None,
    max_time: float | None,
    wait: bool,
    json_summary: bool,
    fail_log: Path | None,
    quiet: bool,
    debug: bool,
) -> int:
    # Imported here so that `thumbcli --help` and completion never load libvips.
    from thumbcli.pipeline import FileResult, Pipeline
    from thumbcli.progress import ProgressBar
    from thumbcli.writers import CacheDirectory, OutputTree, remove_temporary_files

    if (output is None) == (cache_dir is None):
        raise SpecError("give exactly one of -o/--output DIR or --cache DIR")
    boxes = [SizeBox.parse(text) for text in (sizes or ("256",))]
    specs = tuple(
        dict.fromkeys(
            ThumbSpec(box, fit=fit, format=fmt, quality=quality, upscale=upscale, keep_metadata=keep_metadata)
            for box in boxes
        )
    )
    run_options = RunOptions(
        loaders=loaders,
        writers=writers,
        limits=Limits(max_file_size=max_file_size, max_pixels=max_pixels),
        force=force,
        max_files=max_files,
        max_seconds=max_time,
        **({"workers": workers} if workers else {}),
    )
    walk_options = WalkOptions(hidden=hidden, follow_symlinks=follow_symlinks, include=include, exclude=exclude)
    target: OutputTree
    if cache_dir is not None:
        if name_template:
            raise SpecError("--name does not apply to --cache: the cache layout is fixed")
        target = CacheDirectory(cache_dir, specs, wait_for_lock=wait)
    else:
        assert output is not None
        target = OutputTree(
            output,
            specs,
            name_template=name_template or "{size}/{relpath}.{ext}",
            wait_for_lock=wait,
            check_collisions=len(sources) > 1,
        )

    fail_log_file = fail_log.open("a", encoding="utf-8", errors="backslashreplace") if fail_log else None
    progress = ProgressBar(enabled=not quiet)

    def on_result(result: FileResult) -> None:
        if result.status == "failed":
            line = f"failed: {result.describe()}"
            progress.write_line(line)
            if fail_log_file is not None:
                fail_log_file.write(line + "\n")
        progress.finished(result.status)

    pipeline = Pipeline(
        sources,
        target,
        run_options,
        walk_options,
        excluded_dirs=[str(target.root)],
        on_found=progress.found,
        on_result=on_result,
    )
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            remove_temporary_files()
            os._exit(ExitCode.INTERRUPTED)
        pipeline.stop("interrupted")
        progress.write_line("thumbcli: stopping: finishing files in flight (signal again to abort)")

    previous = _install_signal_handlers(on_signal)
    try:
        stats = pipeline.run()
    finally:
        _install_signal_handlers(previous)
        progress.close()
        target.close()
        if fail_log_file is not None:
            fail_log_file.close()

    summary = {
        "found": stats.found,
        "made": stats.made,
        "thumbnails": stats.thumbnails,
        "skipped": stats.skipped,
        "failed": stats.failed,
        "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.images_per_second, 2),
        "bytes_read": stats.bytes_read,
        "stopped": stats.stopped,
        "output": str(target.root),
        "failures": [{"path": display_path(r.path), "reason": r.reason} for r in stats.failures],
    }
    if json_summary:
        click.echo(json.dumps(summary))
    if not quiet and (sys.stderr.isatty() or stats.failed):
        cut = f", stopped early ({stats.stopped})" if stats.stopped else ""
        click.echo(
            f"thumbcli: made {stats.made}, skipped {stats.skipped}, failed {stats.failed} "
            f"in {stats.seconds:.1f} s ({stats.images_per_second:.1f} images/s){cut}",
            err=True,
        )
    if stats.stopped == "interrupted":
        return ExitCode.INTERRUPTED
    if stats.failed:
        return ExitCode.SOME_FAILED
    if stats.stopped is not None:
        return ExitCode.CUT_SHORT
    return ExitCode.OK


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def _install_signal_handlers(handler: Any) -> dict[int, SignalHandler]:
    """Install `handler` (or a dict of per-signal handlers) for SIGINT and SIGTERM; return the old ones."""
    previous: dict[int, SignalHandler] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        new = handler[signum] if isinstance(handler, dict) else handler
        previous[signum] = signal.signal(signum, new)
    return previous


@main.command()
@click.argument("cache_root", metavar="CACHE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "-p", "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free port)."
)
@click.option(
    "-j", "--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Processes sharing the port."
)
@click.option("--admin-port", type=click.IntRange(0, 65535), help="Serve /healthz and /metrics here only.")
@click.option("--access-log", metavar="PATH", help="Combined-format access log; '-' for stderr.  [default: off]")
@click.option("--cache-control", default="public, max-age=86400", show_default=True, help="Cache-Control header.")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True, help="Per worker.")
@click.option(
    "--header-timeout", type=Duration(), default="10", show_default=True, help="Seconds to send a request head."
)
@click.option("--idle-timeout", type=Duration(), default="15", show_default=True, help="Keep-alive idle seconds.")
@click.option(
    "--send-timeout", type=Duration(), default="30", show_default=True, help="Drop a response stalled this long."
)
@click.option("--grace-period", type=Duration(), default="10", show_default=True, help="Drain time on SIGTERM.")
@click.option("--no-sendfile", is_flag=True, help="Send bodies with plain writes instead of sendfile(2).")
@click.option("--debug", is_flag=True, help="Debug logging.")
def serve(
    cache_root: Path,
    host: str,
    port: int,
    workers: int,
    admin_port: int | None,
    access_log: str | None,
    cache_control: str,
    max_connections: int,
    header_timeout: float,
    idle_timeout: float,
    send_timeout: float,
    grace_period: float,
    no_sendfile: bool,
    debug: bool,
) -> None:
    """Serve the thumbnails in CACHE over HTTP: /<preset>/<source path>."""
    from thumbcli.serve import ServeOptions
    from thumbcli.serve import serve as run_server

    _configure_logging(debug)

    def ready(bound_host: str, bound_port: int) -> None:
        click.echo(f"serving {cache_root} on http://{bound_host}:{bound_port}/", err=True)

    try:
        options = ServeOptions(
            cache_root=cache_root,
            host=host,
            port=port,
            workers=workers,
            admin_port=admin_port,
            access_log=access_log,
            cache_control=cache_control,
            max_connections=max_connections,
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
            send_timeout=send_timeout,
            grace_period=grace_period,
            use_sendfile=not no_sendfile,
        )
        code = run_server(options, ready=ready)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from exc
    except CannotRunError as exc:
        _fail(str(exc), ExitCode.CANNOT_RUN)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.CANNOT_RUN)
    sys.exit(code)
