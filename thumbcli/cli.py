"""The command line: parse options into spec objects, call the library, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from thumbcli import __version__
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, LockedError, SpecError
from thumbcli.spec import FITS, FORMATS, Limits, RunOptions, SizeBox, ThumbSpec, WalkOptions, default_workers
from thumbcli.targets.tree import DEFAULT_NAME_TEMPLATE

if TYPE_CHECKING:
    from thumbcli.targets.plan import Target

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


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "auto_envvar_prefix": "THUMBCLI"}
)
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    envvar="THUMBCLI_CONFIG",
    help="Config file.  [default: ./thumbcli.toml, then $XDG_CONFIG_HOME/thumbcli/thumbcli.toml]",
)
@click.version_option(__version__, prog_name="thumbcli")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Batch thumbnailer, thumbnail-cache warmer and thumbnail server."""
    from thumbcli.config import Config, find_config, load_config

    path = find_config(config_path)
    try:
        config = load_config(path) if path is not None else Config()
        ctx.default_map = config_default_map(config, main) if config.path is not None else {}
    except SpecError as exc:
        _fail(str(exc), ExitCode.USAGE)
    ctx.obj = config


def run() -> NoReturn:
    """The `thumbcli` command: the click group, then an exit without interpreter teardown."""
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    # Tearing the interpreter down (freeing every module) takes about 20 ms, a tenth of a
    # no-change rerun of 100,000 files, and everything of ours is closed by now. Skipped:
    # pyvips' and tqdm's exit hooks, which only tidy up their own logging and threads.
    if isinstance(code, int) and all(t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            sys.exit(code)  # a closed pipe: let Python report it as it always does
        os._exit(code)
    sys.exit(code)  # type: ignore[arg-type]


def config_default_map(config: Any, group: click.Group) -> dict[str, dict[str, Any]]:
    """The config's option defaults keyed by click parameter names, as `default_map` wants them.

    The file names options by their long names (`format`, `max-time`, `json`); a name that
    no option of the command has is refused (a typo must not pass silently).
    """
    from thumbcli.config import ConfigError, line_of

    default_map: dict[str, dict[str, Any]] = {}
    for command_name, values in config.defaults.items():
        command = group.commands.get(command_name)
        aliases: dict[str, str] = {}
        for param in command.params if command else ():
            assert param.name is not None
            aliases[param.name] = param.name
            for opt in param.opts:
                if opt.startswith("--"):
                    aliases[opt[2:].replace("-", "_")] = param.name
        translated = default_map.setdefault(command_name, {})
        for key, value in values.items():
            if key not in aliases:
                text = config.path.read_text(encoding="utf-8")
                line = line_of(text, command_name, key.replace("_", "-")) or line_of(text, command_name, key)
                where = f"{config.path}:{line}" if line else str(config.path)
                raise ConfigError(f"{where}: {command_name}.{key}: not an option of `thumbcli {command_name}`")
            translated[aliases[key]] = value
    return default_map


@main.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=str))
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
    "--freedesktop",
    "flavours",
    multiple=True,
    type=click.Choice(["normal", "large", "x-large", "xx-large"]),
    help="Warm the desktop thumbnail cache ($XDG_CACHE_HOME/thumbnails) at this size; repeatable.",
)
@click.option("-p", "--preset", "presets", multiple=True, metavar="NAME", help="A preset from the config; repeatable.")
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
@click.option("--dry-run", is_flag=True, help="Only count what would be made and estimate its disk space.")
@click.option(
    "--walkers",
    type=click.IntRange(1, 64),
    help="Processes walking and stat-ing the sources; more help on network filesystems."
    "  [default: number of cores, at most 4]",
)
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
@click.option(
    "--max-decode-time",
    type=Duration(),
    default="60",
    show_default=True,
    help="Kill and replace a resample worker that spends longer on one file; the file is reported timed out.",
)
@click.option(
    "--max-worker-memory",
    type=ByteSize(),
    help="Kill and replace a resample worker past this much resident memory; the file is reported."
    "  [default: half the RAM shared among the workers, at least 1G]",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse truncated or damaged images instead of making degraded thumbnails of what decodes.",
)
@click.option("--max-files", type=click.IntRange(1), help="Stop after starting this many files (the next run goes on).")
@click.option("--max-time", type=Duration(), help="Stop taking new files after this long, e.g. 15m.")
@click.option("--wait", is_flag=True, help="Wait for another run on the same output to finish instead of exiting.")
@click.option("--json", "json_summary", is_flag=True, help="Print a JSON summary on stdout.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write Prometheus textfile metrics here (node_exporter textfile collector).",
)
@click.option(
    "--fail-log", type=click.Path(dir_okay=False, path_type=Path), help="Append failed files and reasons to this file."
)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary; failures are still printed.")
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.pass_obj
def generate(config: Any, /, **kwargs: Any) -> None:
    """Make thumbnails of the images in SOURCES (files or folders, walked recursively)."""
    _configure_logging(kwargs["debug"])
    # A cache named by the config or environment gives way to a destination on the command line.
    source = click.get_current_context().get_parameter_source("cache_dir")
    if (kwargs["output"] or kwargs["flavours"]) and source in (
        ParameterSource.DEFAULT_MAP,
        ParameterSource.ENVIRONMENT,
    ):
        kwargs["cache_dir"] = None
    try:
        code = _generate(config, GenerateArgs(**kwargs))
    except SpecError as exc:
        raise click.UsageError(str(exc)) from exc
    except LockedError as exc:
        _fail(str(exc), ExitCode.LOCKED)
    except CannotRunError as exc:
        _fail(str(exc), ExitCode.CANNOT_RUN)
    sys.exit(code)


@dataclass(frozen=True, slots=True)
class GenerateArgs:
    """The parsed command line of `generate`, before it becomes spec objects."""

    sources: tuple[str, ...]
    output: Path | None
    cache_dir: Path | None
    flavours: tuple[str, ...]
    presets: tuple[str, ...]
    sizes: tuple[str, ...]
    fit: Any
    fmt: Any
    quality: int | None
    upscale: bool
    keep_metadata: bool
    name_template: str | None
    hidden: bool
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    follow_symlinks: bool
    force: bool
    dry_run: bool
    walkers: int | None
    loaders: int
    workers: int | None
    writers: int
    max_file_size: int
    max_pixels: int
    max_decode_time: float
    max_worker_memory: int | None
    strict: bool
    max_files: int | None
    max_time: float | None
    wait: bool
    json_summary: bool
    metrics_file: Path | None
    fail_log: Path | None
    quiet: bool
    debug: bool


def _fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(f"thumbcli: error: {message}", err=True)
    sys.exit(code)


def _specs(config: Any, args: GenerateArgs) -> tuple[ThumbSpec, ...]:
    if args.presets:
        unknown = [name for name in args.presets if name not in config.presets]
        if unknown:
            known = ", ".join(sorted(config.presets)) or "none"
            raise SpecError(f"unknown preset(s) {', '.join(unknown)} (configured: {known})")
        if args.sizes:
            raise SpecError("give --preset or --size, not both")
        return tuple(config.presets[name] for name in args.presets)
    if args.cache_dir is not None and config.presets and not args.sizes:
        return tuple(config.presets.values())
    boxes = [SizeBox.parse(text) for text in (args.sizes or ("256",))]
    specs = (
        ThumbSpec(
            box,
            fit=args.fit,
            format=args.fmt,
            quality=args.quality,
            upscale=args.upscale,
            keep_metadata=args.keep_metadata,
        )
        for box in boxes
    )
    return tuple(dict.fromkeys(specs))


def _generate(config: Any, args: GenerateArgs) -> int:
    # Imported here so that `thumbcli --help` and completion never load libvips.
    from thumbcli.fsutil import remove_temporary_files
    from thumbcli.pipeline import FileResult, Pipeline
    from thumbcli.progress import ProgressBar
    from thumbcli.targets.served import CacheDirectory
    from thumbcli.targets.tree import OutputTree

    if not args.sources:
        raise SpecError("no SOURCES given (on the command line or as `sources` in the config)")
    destinations = [args.output is not None, args.cache_dir is not None, bool(args.flavours)]
    if sum(destinations) != 1:
        raise SpecError("give exactly one of -o/--output DIR, --cache DIR or --freedesktop SIZE")
    limits = Limits(
        max_file_size=args.max_file_size,
        max_pixels=args.max_pixels,
        max_decode_seconds=args.max_decode_time,
        max_worker_memory=args.max_worker_memory or 0,
    )
    run_options = RunOptions(
        loaders=args.loaders,
        workers=args.workers or default_workers(),
        writers=args.writers,
        limits=limits,
        force=args.force,
        max_files=args.max_files,
        max_seconds=args.max_time,
        strict=args.strict,
    )
    walk_options = WalkOptions(
        hidden=args.hidden,
        follow_symlinks=args.follow_symlinks,
        include=args.include,
        exclude=args.exclude,
        processes=args.walkers or 0,
    )
    if args.name_template and args.output is None:
        raise SpecError("--name only applies to -o/--output: the cache layouts are fixed")
    target: Target
    if args.flavours:
        from thumbcli.targets.freedesktop import FreedesktopCache, default_thumbnail_root

        target = FreedesktopCache(default_thumbnail_root(), tuple(args.flavours), wait_for_lock=args.wait)
    elif args.cache_dir is not None:
        target = CacheDirectory(
            args.cache_dir, _specs(config, args), wait_for_lock=args.wait, check_collisions=len(args.sources) > 1
        )
    else:
        assert args.output is not None
        target = OutputTree(
            args.output,
            _specs(config, args),
            name_template=args.name_template or DEFAULT_NAME_TEMPLATE,
            wait_for_lock=args.wait,
            check_collisions=len(args.sources) > 1 or args.name_template is not None,
        )

    fail_log_file = args.fail_log.open("a", encoding="utf-8", errors="backslashreplace") if args.fail_log else None
    progress = ProgressBar(enabled=not args.quiet)

    def on_result(result: FileResult) -> None:
        if result.status == "failed":
            line = f"failed: {result.describe()}"
            _echo_err(progress, line)
            if fail_log_file is not None:
                # The decoder's own words too: the short reason is ours.
                fail_log_file.write(line + (f" [{result.detail}]" if result.detail else "") + "\n")
        elif result.warning:
            _echo_err(progress, f"warning: {display_path(result.path)}: {result.warning} (thumbnail of what decodes)")
        progress.finished(result.status)

    pipeline = Pipeline(
        args.sources,
        target,
        run_options,
        walk_options,
        excluded_dirs=[str(target.root)],
        dry_run=args.dry_run,
        on_found=progress.found,
        on_skipped=progress.skipped,
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
        _echo_err(progress, "thumbcli: stopping: finishing files in flight (signal again to abort)")

    previous = _install_signal_handlers(on_signal)
    try:
        stats = pipeline.run()
        estimate = _estimate_bytes(target, stats.planned_by_spec) if args.dry_run else None
    finally:
        _install_signal_handlers(previous)
        progress.close()
        target.close()
        if fail_log_file is not None:
            fail_log_file.close()

    code = _exit_code(stats.stopped, stats.failed)
    summary: dict[str, Any] = {
        "found": stats.found,
        "made": stats.made,
        "thumbnails": stats.thumbnails,
        "skipped": stats.skipped,
        "failed": stats.failed,
        "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.images_per_second, 2),
        "bytes_read": stats.bytes_read,
        "stopped": stats.stopped,
        "exit_code": int(code),
        "output": str(target.root),
        "failures": [{"path": display_path(r.path), "reason": r.reason} for r in stats.failures],
    }
    if args.dry_run:
        summary.update(planned=stats.planned, planned_thumbnails=stats.planned_by_spec, estimated_bytes=estimate)
    if args.json_summary:
        click.echo(json.dumps(summary))
    if args.metrics_file is not None:
        from thumbcli.metrics import write_run_metrics

        write_run_metrics(args.metrics_file, summary, succeeded=code == ExitCode.OK)
    if args.dry_run and not args.json_summary:
        click.echo(
            f"would make {sum(stats.planned_by_spec.values())} thumbnails of {stats.planned} files "
            f"(about {_human_bytes(estimate or 0)}); {stats.skipped} files up to date, {stats.failed} failed"
        )
    elif not args.quiet and (sys.stderr.isatty() or stats.failed or stats.stopped == "interrupted"):
        cut = f", stopped early ({stats.stopped})" if stats.stopped else ""
        click.echo(
            f"thumbcli: made {stats.made}, skipped {stats.skipped}, failed {stats.failed} "
            f"in {stats.seconds:.1f} s ({stats.images_per_second:.1f} images/s){cut}",
            err=True,
        )
    return code


def _echo_err(progress: Any, line: str) -> None:
    if not progress.write_line(line):
        click.echo(line, err=True)


def _exit_code(stopped: str | None, failed: int) -> ExitCode:
    if stopped == "interrupted":
        return ExitCode.INTERRUPTED
    if failed:
        return ExitCode.SOME_FAILED
    if stopped is not None:
        return ExitCode.CUT_SHORT
    return ExitCode.OK


# Rough bytes per thumbnail pixel, for dry-run estimates before any thumbnail of a spec exists.
_BYTES_PER_PIXEL = {"jpeg": 0.3, "webp": 0.2, "avif": 0.12, "png": 2.0}


def _estimate_bytes(target: Any, planned_by_spec: dict[str, int]) -> int:
    total = 0
    for spec in target.specs:
        count = planned_by_spec.get(spec.name, 0)
        typical = target.typical_size(spec) if hasattr(target, "typical_size") else None
        if typical is None:
            area = (spec.box.width or spec.box.height or 0) * (spec.box.height or spec.box.width or 0)
            typical = int(area * 0.75 * _BYTES_PER_PIXEL[spec.format])
        total += count * typical
    return total


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


@main.command()
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The served cache to prune.",
)
@click.option("--freedesktop", is_flag=True, help="Prune the desktop thumbnail cache instead.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, with sizes; remove nothing.")
@click.option("--wait", is_flag=True, help="Wait for a running generate on the same cache.")
@click.option("--json", "json_summary", is_flag=True, help="Print what was removed as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_obj
def prune(
    config: Any, cache_dir: Path | None, freedesktop: bool, dry_run: bool, wait: bool, json_summary: bool, quiet: bool
) -> None:
    """Remove thumbnails whose source, preset or settings are gone, and the empty folders left."""
    from thumbcli.targets.served import CacheDirectory

    if (cache_dir is None) == (not freedesktop):
        raise click.UsageError("give exactly one of --cache DIR or --freedesktop")
    removals: list[tuple[Path, int, str]] = []
    try:
        if freedesktop:
            from thumbcli.targets.freedesktop import default_thumbnail_root, prune_freedesktop

            pruned = prune_freedesktop(default_thumbnail_root(), dry_run=dry_run)
            removals = [(path, size, "source gone or changed") for path, size in pruned]
        else:
            assert cache_dir is not None
            current = {name: spec.digest for name, spec in config.presets.items()} if config.presets else None
            target = CacheDirectory(cache_dir, (), wait_for_lock=wait)
            try:
                removals = [(r.path, r.bytes, r.reason) for r in target.prune(current, dry_run=dry_run)]
            finally:
                target.close()
    except LockedError as exc:
        _fail(str(exc), ExitCode.LOCKED)
    except CannotRunError as exc:
        _fail(str(exc), ExitCode.CANNOT_RUN)
    total = sum(size for _, size, _ in removals)
    verb = "would remove" if dry_run else "removed"
    if json_summary:
        items = [{"path": display_path(p), "bytes": size, "reason": why} for p, size, why in removals]
        click.echo(json.dumps({"dry_run": dry_run, "files": len(removals), "bytes": total, "removed": items}))
    elif not quiet:
        if dry_run:
            for path, size, why in removals:
                click.echo(f"{display_path(path)}\t{size}\t{why}")
        if dry_run or sys.stderr.isatty():
            click.echo(f"thumbcli: {verb} {len(removals)} files, {_human_bytes(total)}", err=True)


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective configuration and where each value comes from."""
    config = ctx.obj
    click.echo(f"# config file: {config.path or '(none found)'}")
    for name, spec in config.presets.items():
        click.echo(
            f"preset {name}: size={spec.box.label} fit={spec.fit} format={spec.format} "
            f"quality={spec.effective_quality} upscale={spec.upscale}  # from {config.path}"
        )
    default_map = ctx.find_root().default_map or {}
    for command_name in ("generate", "prune", "serve"):
        command = main.commands[command_name]
        for param in command.params:
            if param.name is None:
                continue
            value, origin = _effective(param, command_name, default_map.get(command_name, {}), config.path)
            if value in (None, (), False, _UNSET):
                continue
            long_name = next((opt[2:] for opt in param.opts if opt.startswith("--")), param.name)
            click.echo(f"{command_name}.{long_name} = {value!r}  # {origin}")


_UNSET = getattr(click.core, "UNSET", None)


def _effective(param: click.Parameter, command_name: str, defaults: dict[str, Any], path: Path) -> tuple[Any, str]:
    envvar = f"THUMBCLI_{command_name.upper()}_{(param.name or '').upper()}"
    if isinstance(param, click.Option) and envvar in os.environ:
        return os.environ[envvar], f"environment {envvar}"
    if param.name in defaults:
        return defaults[param.name], f"config {path}"
    return param.default, "default"


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
@click.option(
    "--source",
    "source_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Make missing or stale thumbnails from this source tree on request.",
)
@click.option(
    "--preset", "presets", multiple=True, metavar="NAME", help="With --source: presets to make (default: all)."
)
@click.option(
    "--max-pending",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="With --source: generations in flight per worker; past it, 503.",
)
@click.option(
    "--generators", type=click.IntRange(1, 64), default=2, show_default=True, help="With --source: threads per worker."
)
@click.option("--debug", is_flag=True, help="Debug logging.")
@click.pass_obj
def serve(
    config: Any,
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
    source_root: Path | None,
    presets: tuple[str, ...],
    max_pending: int,
    generators: int,
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
            source_root=source_root,
            presets=_serve_presets(config, source_root, presets),
            max_pending=max_pending,
            generators=generators,
        )
        code = run_server(options, ready=ready)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from exc
    except CannotRunError as exc:
        _fail(str(exc), ExitCode.CANNOT_RUN)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.CANNOT_RUN)
    sys.exit(code)


def _serve_presets(config: Any, source_root: Path | None, names: tuple[str, ...]) -> tuple[ThumbSpec, ...]:
    """The presets that `serve --source` makes on a miss: from the config, all or those named."""
    if source_root is None:
        if names:
            raise SpecError("--preset only applies with --source")
        return ()
    if not config.presets:
        raise SpecError("--source needs presets defined in the config file (thumbcli.toml)")
    unknown = [name for name in names if name not in config.presets]
    if unknown:
        raise SpecError(f"unknown preset(s) {', '.join(unknown)} (configured: {', '.join(sorted(config.presets))})")
    return tuple(config.presets[name] for name in (names or tuple(config.presets)))
