"""The command line: parse options into spec objects, call the library, map errors to exit codes."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click
from click.core import ParameterSource

from thumbcli import __version__
from thumbcli.config import (
    Config,
    ConfigError,
    find_config,
    has_type,
    line_of,
    load_config,
    located_error,
    type_mismatch,
)
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, LockedError, SpecError
from thumbcli.serve.options import ServeOptions
from thumbcli.spec import FITS, FORMATS, Limits, RunOptions, SizeBox, ThumbSpec

if TYPE_CHECKING:
    from thumbcli.pipeline import FileResult
    from thumbcli.progress import ProgressBar
    from thumbcli.run import GenerateJob, GenerateSummary

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
#: The library's defaults, which the options show and pass on: stated once, in spec.py.
_DEFAULT_LIMITS = Limits()
_DEFAULT_RUN = RunOptions(workers=1)
_DEFAULT_SPEC = ThumbSpec(SizeBox(256, 256))


class ByteSize(click.ParamType[int, Any]):
    """A byte count with an optional K/M/G suffix (binary units)."""

    name = "bytes"

    @staticmethod
    def label(count: int) -> str:
        """`count` as the shortest text this type reads back exactly (268435456 -> 256M)."""
        for suffix in ("G", "M", "K"):
            unit = _SIZE_UNITS[suffix.lower()]
            if count >= unit and count % unit == 0:
                return f"{count // unit}{suffix}"
        return str(count)

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


class Shard(click.ParamType[tuple[int, int], Any]):
    """`I/N`: this invocation's share of the folders, one of N."""

    name = "I/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            self.fail(f"{value!r} is not a share such as 0/3 (I/N with 0 <= I < N)", param, ctx)
        return int(match.group(1)), int(match.group(2))


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="thumbcli: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # libvips warnings about files we already report as failed are noise unless debugging.
    logging.getLogger("pyvips").setLevel(logging.DEBUG if debug else logging.ERROR)
    # Dask's client logs a lost scheduler with tracebacks; the run reports it in one line.
    logging.getLogger("distributed").setLevel(logging.DEBUG if debug else logging.CRITICAL)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _exits_on_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Map the library's errors to exit codes: a spec error is a usage error, the others have their own."""

    @functools.wraps(command)
    def run_command(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:  # the file's fault, not the command line's: no usage text
            _fail(str(exc), ExitCode.USAGE)
        except SpecError as exc:
            raise click.UsageError(str(exc)) from exc
        except LockedError as exc:
            _fail(str(exc), ExitCode.LOCKED)
        except CannotRunError as exc:
            _fail(str(exc), ExitCode.CANNOT_RUN)

    return run_command


def _fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(f"thumbcli: error: {message}", err=True)
    sys.exit(code)


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
@_exits_on_errors
def main(ctx: click.Context, config_path: str | None) -> None:
    """Batch thumbnailer, thumbnail-cache warmer and thumbnail server."""
    path = find_config(config_path)
    config = load_config(path) if path is not None else Config()
    ctx.default_map = config_default_map(config, main) if config.path is not None else {}
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


def config_default_map(config: Config, group: click.Group) -> dict[str, dict[str, Any]]:
    """The config's option defaults keyed by click parameter names, as `default_map` wants them.

    The file names options by their long names (`format`, `max-time`, `json`); a name that
    no option of the command has is refused (a typo must not pass silently), and so is a
    value of the wrong type or out of range, with the file and line.
    """
    default_map: dict[str, dict[str, Any]] = {}
    for command_name, values in config.defaults.items():
        command = group.commands.get(command_name)
        params: dict[str, click.Parameter] = {}
        for option in command.params if command else ():
            assert option.name is not None
            params[option.name] = option
            for opt in option.opts:
                if opt.startswith("--"):
                    params[opt[2:].replace("-", "_")] = option
        translated = default_map.setdefault(command_name, {})
        for key, value in values.items():
            param = params.get(key)
            if param is None:
                raise _config_error(config, command_name, key, f"not an option of `thumbcli {command_name}`")
            problem = _config_value_problem(param, value)
            if problem is not None:
                raise _config_error(config, command_name, key, problem)
            assert param.name is not None
            translated[param.name] = value
    return default_map


def _config_error(config: Config, command_name: str, key: str, message: str) -> ConfigError:
    assert config.path is not None  # only a config read from a file has defaults
    text = config.path.read_text(encoding="utf-8")
    spelled = key.replace("_", "-") if line_of(text, command_name, key.replace("_", "-")) else key
    return located_error(config.path, text, command_name, spelled, message)


def _config_value_problem(param: click.Parameter, value: object) -> str | None:
    """Why a config value cannot be this option's default (its TOML type, then its range), or None."""
    if isinstance(param, click.Option) and param.is_flag:
        return None if isinstance(value, bool) else type_mismatch("true or false", value)
    param_type = param.type
    types: tuple[type, ...] = (str,)
    expected = "a string"
    if isinstance(param_type, click.Choice):
        expected = f"one of {', '.join(map(str, param_type.choices))}"
    elif isinstance(param_type, click.types.IntParamType):
        types, expected = (int,), "an integer"
    elif isinstance(param_type, ByteSize):
        types, expected = (int, str), 'a byte count or a size such as "50M"'
    elif isinstance(param_type, Duration):
        types, expected = (int, float, str), 'seconds or a duration such as "15m"'
    elif isinstance(param_type, Megapixels):
        types, expected = (int, float, str), "a number of megapixels"
    if param.multiple or param.nargs == -1:
        if not isinstance(value, list) or not all(has_type(item, types) for item in value):
            return type_mismatch(f"an array, each {expected}", value)
        items: list[object] = value
    elif not has_type(value, types):
        return type_mismatch(expected, value)
    else:
        items = [value]
    if isinstance(param_type, click.Path):
        return None  # whether it exists is for the command to judge when it runs: it may create it
    try:
        for item in items:
            param_type.convert(item, param, None)
    except click.BadParameter as exc:
        return f"expected {expected}: {exc.message}"
    return None


_wait_option = click.option(
    "--wait", is_flag=True, help="Wait for another run on the same output to finish instead of exiting."
)


def _dry_run_option(help_text: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    return click.option("--dry-run", is_flag=True, help=help_text)


def _json_option(help_text: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    return click.option("--json", "json_summary", is_flag=True, help=help_text)


def _quiet_option(help_text: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    return click.option("--quiet", is_flag=True, help=help_text)


def _debug_option(help_text: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    return click.option("--debug", is_flag=True, help=help_text)


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
    default=_DEFAULT_SPEC.fit,
    show_default=True,
    help="inside: whole image; cover: fill and centre-crop; smart: fill and attention-crop.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=_DEFAULT_SPEC.format,
    show_default=True,
    help="Output format.",
)
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
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Try again the files that failed to decode in earlier runs (otherwise retried only once they change).",
)
@_dry_run_option("Only count what would be made and estimate its disk space.")
@click.option(
    "--walkers",
    type=click.IntRange(1, 64),
    help="Processes walking and stat-ing the sources; more help on network filesystems."
    "  [default: number of cores, at most 4]",
)
@click.option(
    "--loaders",
    type=click.IntRange(1, 256),
    default=_DEFAULT_RUN.loaders,
    show_default=True,
    help="Threads reading files.",
)
@click.option("-j", "--workers", type=click.IntRange(1, 256), help="Resample workers.  [default: number of cores]")
@click.option(
    "--writers",
    type=click.IntRange(1, 256),
    default=_DEFAULT_RUN.writers,
    show_default=True,
    help="Threads writing thumbnails.",
)
@click.option(
    "--max-file-size",
    type=ByteSize(),
    default=ByteSize.label(_DEFAULT_LIMITS.max_file_size),
    show_default=True,
    help="Refuse larger source files.",
)
@click.option(
    "--max-pixels",
    type=Megapixels(),
    default=f"{_DEFAULT_LIMITS.max_pixels / 1_000_000:g}",
    show_default=True,
    help="Refuse images with more megapixels (decompression bombs).",
)
@click.option(
    "--max-decode-time",
    type=Duration(),
    default=f"{_DEFAULT_LIMITS.max_decode_seconds:g}",
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
@click.option(
    "--shard",
    type=Shard(),
    default="0/1",
    help="Make only share I of N of the folders (0 <= I < N), with its own lock and state; for other schedulers.",
)
@click.option(
    "--dask",
    metavar="ADDRESS",
    help="Make the thumbnails on the Dask scheduler at ADDRESS (tcp://host:8786), or on `local[:N]` worker processes.",
)
@_wait_option
@_json_option("Print a JSON summary on stdout.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write Prometheus textfile metrics here (node_exporter textfile collector).",
)
@click.option(
    "--fail-log", type=click.Path(dir_okay=False, path_type=Path), help="Append failed files and reasons to this file."
)
@_quiet_option("No progress bar and no summary; failures are still printed.")
@_debug_option("Debug logging and tracebacks.")
@click.pass_obj
@_exits_on_errors
def generate(
    config: Config, /, *, json_summary: bool, metrics_file: Path | None, quiet: bool, debug: bool, **request: Any
) -> None:
    """Make thumbnails of the images in SOURCES (files or folders, walked recursively)."""
    from thumbcli.run import GenerateRequest

    _configure_logging(debug)
    # A cache named by the config or environment gives way to a destination on the command line.
    source = click.get_current_context().get_parameter_source("cache_dir")
    cache_configured = source in (ParameterSource.DEFAULT_MAP, ParameterSource.ENVIRONMENT)
    if (request["output"] or request["flavours"]) and cache_configured:
        request["cache_dir"] = None
    job = GenerateRequest(cache_configured=cache_configured, **request).job(config)
    summary = _generate_with_progress(job, quiet=quiet)
    _report_generate(summary, json_summary=json_summary, metrics_file=metrics_file, quiet=quiet)
    sys.exit(summary.exit_code)


def _generate_with_progress(job: GenerateJob, *, quiet: bool) -> GenerateSummary:
    """Run the job with a progress bar, failures printed as they come, and signals wired to stop it."""
    # Imported here so that `thumbcli --help` and completion never load libvips.
    from thumbcli.progress import ProgressBar
    from thumbcli.run import RunStopper, generate

    progress = ProgressBar(enabled=not quiet)
    stopper = RunStopper()

    def on_result(result: FileResult) -> None:
        if result.status == "failed":
            _echo_err(progress, f"failed: {result.describe()}")
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
            f"(about {_human_bytes(plan.estimated_bytes)}); {summary.skipped} files up to date, "
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
@_dry_run_option("List what would be removed, with sizes; remove nothing.")
@_wait_option
@_json_option("Print what was removed as JSON on stdout.")
@_quiet_option("Print nothing but errors.")
@click.pass_obj
@_exits_on_errors
def prune(
    config: Config,
    cache_dir: Path | None,
    freedesktop: bool,
    dry_run: bool,
    wait: bool,
    json_summary: bool,
    quiet: bool,
) -> None:
    """Remove thumbnails whose source, preset or settings are gone, and the empty folders left."""
    from thumbcli.run import CacheDestination, FreedesktopDestination
    from thumbcli.run import prune as run_prune

    if (cache_dir is None) == (not freedesktop):
        raise click.UsageError("give exactly one of --cache DIR or --freedesktop")
    destination = CacheDestination(cache_dir) if cache_dir is not None else FreedesktopDestination(())
    summary = run_prune(destination, presets=config.presets or None, sources=config.sources, dry_run=dry_run, wait=wait)
    if json_summary:
        click.echo(json.dumps(summary.as_json()))
    elif not quiet:
        if dry_run:
            for removal in summary.removals:
                click.echo(f"{display_path(removal.path)}\t{removal.bytes}\t{removal.reason}")
        if dry_run or sys.stderr.isatty():
            verb = "would remove" if dry_run else "removed"
            click.echo(f"thumbcli: {verb} {len(summary.removals)} files, {_human_bytes(summary.bytes)}", err=True)


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective configuration and where each value comes from."""
    config: Config = ctx.obj
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


def _effective(
    param: click.Parameter, command_name: str, defaults: dict[str, Any], path: Path | None
) -> tuple[Any, str]:
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


_SERVE_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(ServeOptions) if f.default is not dataclasses.MISSING
}


def _serve_option(*names: str, **attrs: Any) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A serve option whose default is `ServeOptions`' (stated once, there), shown in --help."""
    field_name = next(name for name in names if name.startswith("--"))[2:].replace("-", "_")
    return click.option(*names, default=_SERVE_DEFAULTS[field_name], show_default=True, **attrs)


@main.command()
@click.argument("cache_root", metavar="CACHE", type=click.Path(file_okay=False, path_type=Path))
@_serve_option("--host", help="Address to listen on.")
@_serve_option("-p", "--port", type=click.IntRange(0, 65535), help="Port (0: any free port).")
@_serve_option("-j", "--workers", type=click.IntRange(1, 256), help="Processes sharing the port.")
@click.option("--admin-port", type=click.IntRange(0, 65535), help="Serve /healthz and /metrics here only.")
@click.option("--access-log", metavar="PATH", help="Combined-format access log; '-' for stderr.  [default: off]")
@_serve_option("--cache-control", help="Cache-Control header.")
@_serve_option("--max-connections", type=click.IntRange(1), help="Per worker.")
@_serve_option("--header-timeout", type=Duration(), help="Seconds to send a request head.")
@_serve_option("--idle-timeout", type=Duration(), help="Keep-alive idle seconds.")
@_serve_option("--send-timeout", type=Duration(), help="Drop a response stalled this long.")
@_serve_option("--grace-period", type=Duration(), help="Drain time on SIGTERM.")
@click.option("--no-sendfile", is_flag=True, help="Send bodies with plain writes instead of sendfile(2).")
@click.option("--browse", is_flag=True, help="Gallery pages for folder URLs (off: a shop's catalogue stays unlisted).")
@click.option(
    "--source",
    "source_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Make missing or stale thumbnails from this source tree on request.",
)
@click.option(
    "--named-sources",
    is_flag=True,
    help="Make them on request from the config's [sources], each under /<preset>/<name>/.",
)
@click.option(
    "--preset", "presets", multiple=True, metavar="NAME", help="With --source: presets to make (default: all)."
)
@_serve_option(
    "--max-pending", type=click.IntRange(1), help="With --source: generations in flight per worker; past it, 503."
)
@_serve_option(
    "--generators",
    type=click.IntRange(1, 64),
    help="With --source: threads per worker, each with a resample worker process.",
)
@click.option(
    "--max-file-size", type=ByteSize(), default="256M", show_default=True, help="With --source: refuse larger sources."
)
@click.option(
    "--max-pixels", type=Megapixels(), default="100", show_default=True, help="With --source: refuse larger images."
)
@click.option(
    "--max-decode-time",
    type=Duration(),
    default="60",
    show_default=True,
    help="With --source: kill and replace a resample worker that spends longer on one source (its request gets 404).",
)
@click.option(
    "--max-worker-memory",
    type=ByteSize(),
    help="With --source: kill and replace a resample worker past this much resident memory."
    "  [default: half the RAM shared among the workers, at least 1G]",
)
@click.option(
    "--strict", is_flag=True, help="With --source: refuse damaged images instead of thumbnailing what decodes."
)
@_debug_option("Debug logging.")
@click.pass_obj
@_exits_on_errors
def serve(
    config: Config,
    /,
    cache_root: Path,
    no_sendfile: bool,
    source_root: Path | None,
    named_sources: bool,
    presets: tuple[str, ...],
    debug: bool,
    max_file_size: int,
    max_pixels: int,
    max_decode_time: float,
    max_worker_memory: int | None,
    **listening: Any,
) -> None:
    """Serve the thumbnails in CACHE over HTTP: /<preset>/<source path>."""
    from thumbcli.serve.supervisor import describe
    from thumbcli.serve.supervisor import serve as run_server

    _configure_logging(debug)
    sources = _serve_named_sources(config, source_root, named_sources)
    _require_cache_folder(cache_root, create=source_root is not None or bool(sources))

    def ready(bound_host: str, bound_port: int) -> None:
        click.echo(f"serving {cache_root} on http://{bound_host}:{bound_port}/", err=True)
        for line in describe(options, bound_port):
            click.echo(f"  {line}", err=True)

    options = ServeOptions(
        cache_root=cache_root,
        use_sendfile=not no_sendfile,
        source_root=source_root,
        named_sources=sources,
        presets=_serve_presets(config, source_root is not None or bool(sources), presets),
        limits=Limits(
            max_file_size=max_file_size,
            max_pixels=max_pixels,
            max_decode_seconds=max_decode_time,
            max_worker_memory=max_worker_memory or 0,
        ),
        **listening,
    )
    try:
        code = run_server(options, ready=ready)
    except OSError as exc:
        _fail(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}", ExitCode.CANNOT_RUN)
    sys.exit(code)


def _require_cache_folder(cache_root: Path, *, create: bool) -> None:
    """The folder serve reads must be there; with --source, serve makes thumbnails, so it makes it as generate does."""
    if create:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CannotRunError(f"cannot create cache folder {display_path(cache_root)}: {reason}") from exc
    elif not cache_root.is_dir():
        raise click.BadParameter(f"Directory {display_path(cache_root)!r} does not exist.", param_hint="'CACHE'")


def _serve_named_sources(config: Config, source_root: Path | None, named_sources: bool) -> tuple[tuple[str, Path], ...]:
    """The config's named sources for `serve --named-sources`; a cache of named sources wants them, not --source."""
    if source_root is not None and config.sources:
        raise SpecError("the config names its sources ([sources]): give --named-sources, not --source DIR")
    if not named_sources:
        return ()
    if not config.sources:
        raise SpecError("--named-sources needs a [sources] table (name = path) in the config file")
    return tuple((name, Path(path)) for name, path in config.sources.items())


def _serve_presets(config: Config, makes_on_miss: bool, names: tuple[str, ...]) -> tuple[ThumbSpec, ...]:
    """The presets that `serve --source` makes on a miss: from the config, all or those named."""
    if not makes_on_miss:
        if names:
            raise SpecError("--preset only applies with --source")
        return ()
    if not config.presets:
        raise SpecError("--source needs presets defined in the config file (thumbcli.toml)")
    return config.select_presets(names)


@main.command("formats")
@_json_option("Print the libvips in use and the formats as JSON on stdout.")
def show_formats(json_summary: bool) -> None:
    """Say which libvips is in use and which kinds of file can be read here, with the decoder behind each."""
    from thumbcli import resample  # loads libvips: only this command needs it

    resample.configure_libvips()  # as a resample worker sees it: untrusted loaders blocked
    libvips = resample.libvips_in_use()
    support = resample.format_support()
    if json_summary:
        formats = [dataclasses.asdict(kind) for kind in support]
        click.echo(json.dumps({"libvips": dataclasses.asdict(libvips), "formats": formats}, indent=2))
        return
    click.echo(f"libvips {libvips.version} ({libvips.origin}: {libvips.path or 'path unknown'})")
    click.echo(f"metadata option of its savers: {libvips.metadata_option}")
    for kind in support:
        click.echo(f"{kind.kind:6} {' '.join(kind.suffixes)}")
        click.echo(f"       {kind.decoder or 'not readable here'}")
