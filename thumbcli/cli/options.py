"""What every command shares: parameter types, shared options, logging set-up and the one error-to-exit mapping."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from click.shell_completion import CompletionItem

from thumbcli.cluster import DASK_LOGGERS
from thumbcli.config import Config, ConfigError, find_config, load_config
from thumbcli.errors import CannotRunError, ExitCode, LockedError, SpecError
from thumbcli.objectstores import is_bucket_url
from thumbcli.spec import Limits

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


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


class FolderOrBucket(click.Path):
    """A folder, or a bucket URL (`s3://bucket/prefix`) kept as a str: as a path, `s3://b` is the folder `s3:/b`."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and is_bucket_url(value):
            return value
        return super().convert(value, param, ctx)


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="thumbcli: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # libvips warnings about files we already report as failed are noise unless debugging.
    logging.getLogger("pyvips").setLevel(logging.DEBUG if debug else logging.ERROR)
    # Dask's client logs a lost scheduler with tracebacks, and so, now and then, do the event loops
    # under it ("Exception in callback ... StreamClosedError"); the run reports it in one line.
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)


P = ParamSpec("P")
R = TypeVar("R")


def exits_on_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Map the library's errors to exit codes: a spec error is a usage error, the others have their own."""

    @functools.wraps(command)
    def run_command(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:  # the file's fault, not the command line's: no usage text
            fail(str(exc), ExitCode.USAGE)
        except SpecError as exc:
            raise click.UsageError(with_flags(exc)) from exc
        except LockedError as exc:
            fail(str(exc), ExitCode.LOCKED)
        except CannotRunError as exc:
            fail(str(exc), ExitCode.CANNOT_RUN)

    return run_command


#: The flag that sets each setting a library error may name (SpecError.settings).
_FLAGS = {
    "output": "-o",
    "cache_dir": "--cache",
    "flavours": "--freedesktop",
    "presets": "--preset",
    "sizes": "--size",
    "fit": "--fit",
    "name_template": "--name",
    "dask": "--dask",
    "shard": "--shard",
    "max_decode_seconds": "--max-decode-time",
    "max_worker_memory": "--max-worker-memory",
    "loaders": "--loaders",
    "workers": "--workers",
    "writers": "--writers",
    "source_root": "--source",
    "named_sources": "--named-sources",
}


def with_flags(exc: SpecError) -> str:
    """A library error as the command line says it: the flag of the one setting first, or the flags of several after."""
    flags = [_FLAGS.get(setting, setting) for setting in exc.settings]
    if len(flags) == 1:
        return f"{flags[0]}: {exc}"
    return f"{exc} ({', '.join(flags)})" if flags else str(exc)


def _config_of(ctx: click.Context) -> Config:
    """The config the command line being completed names (--config, $THUMBCLI_CONFIG, the usual places)."""
    path = find_config(ctx.find_root().params.get("config_path"))
    try:
        return load_config(path) if path is not None else Config()
    except (ConfigError, OSError):
        return Config()  # completion says nothing rather than an error


def complete_presets(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The config's preset names, for --preset."""
    return [CompletionItem(name) for name in _config_of(ctx).presets if name.startswith(incomplete)]


def complete_sources(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The config's sources (named or listed), then whatever files the shell would offer."""
    config = _config_of(ctx)
    paths = [*config.sources.values(), *config.defaults.get("generate", {}).get("sources", [])]
    found = [CompletionItem(path) for path in dict.fromkeys(paths) if path.startswith(incomplete)]
    return found + param.type.shell_complete(ctx, param, incomplete)


def fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(f"thumbcli: error: {message}", err=True)
    sys.exit(code)


wait_option = click.option(
    "--wait", is_flag=True, help="Wait for another run on the same output to finish instead of exiting."
)


def dry_run_option(help_text: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--dry-run", is_flag=True, help=help_text)


def json_option(help_text: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--json", "json_summary", is_flag=True, help=help_text)


def quiet_option(help_text: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--quiet", is_flag=True, help=help_text)


def debug_option(help_text: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--debug", is_flag=True, help=help_text)


def _unsandboxed(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # the workers read it where they start, whichever driver starts them
        from thumbcli.sandbox import SETTING  # only then: the command line never loads ctypes for it

        os.environ[SETTING] = "none"


#: For debugging a decoder only: the resample workers run without their sandbox (and it is said loudly).
no_sandbox_option = click.option(
    "--no-sandbox",
    is_flag=True,
    expose_value=False,
    callback=_unsandboxed,
    help="Debugging only: decode untrusted files in UNSANDBOXED resample workers (as THUMBCLI_SANDBOX=none).",
)


_LIMITS = Limits()

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def grouped_options(
    into: str, build: Callable[..., object], *options: Decorator, takes: tuple[str, ...] = ()
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Options the command receives as one typed value: `build(**their values)`, passed as the keyword `into`.

    `takes` names values of groups below this one that `build` takes too (a run's options take its `limits`).
    Put it under `exits_on_errors`, so that values the library refuses are usage errors.
    """

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        names: list[str] = list(takes)

        @functools.wraps(command)
        def gathered(*args: Any, **kwargs: Any) -> R:
            values = {name: kwargs.pop(name) for name in names}
            return command(*args, **{into: build(**values)}, **kwargs)

        decorated: Callable[..., Any] = gathered
        params: list[click.Parameter] = getattr(gathered, "__click_params__", [])
        known = len(params)
        for option in reversed(options):
            decorated = option(decorated)
        params = getattr(decorated, "__click_params__", [])
        names.extend(str(param.name) for param in params[known:])
        return decorated

    return decorate


def limit_options(scope: str = "") -> Callable[[Callable[..., R]], Callable[..., R]]:
    """--max-file-size, --max-pixels, --max-decode-time and --max-worker-memory, each default stated once (`Limits`).

    The command receives them as one `limits: Limits`. `scope` says when they apply (serve: "With --source").
    Put it under `exits_on_errors`, so that limits the library refuses are usage errors.
    """

    def say(text: str) -> str:
        return f"{scope}: {text}" if scope else text[0].upper() + text[1:]

    options = [
        click.option(
            "--max-file-size",
            type=ByteSize(),
            default=ByteSize.label(_LIMITS.max_file_size),
            show_default=True,
            help=say("refuse larger source files."),
        ),
        click.option(
            "--max-pixels",
            type=Megapixels(),
            default=f"{_LIMITS.max_pixels / 1_000_000:g}",
            show_default=True,
            help=say("refuse images with more megapixels (decompression bombs)."),
        ),
        click.option(
            "--max-decode-time",
            type=Duration(),
            default=f"{_LIMITS.max_decode_seconds:g}",
            show_default=True,
            help=say("kill and replace a resample worker that spends longer on one file; the file is reported."),
        ),
        click.option(
            "--max-worker-memory",
            type=ByteSize(),
            help=say("kill and replace a resample worker past this much resident memory; the file is reported.")
            + "  [default: half the RAM shared among the resample workers of the host, at least 1G]",
        ),
    ]

    def limits(max_file_size: int, max_pixels: int, max_decode_time: float, max_worker_memory: int | None) -> Limits:
        return Limits(
            max_file_size=max_file_size,
            max_pixels=max_pixels,
            max_decode_seconds=max_decode_time,
            max_worker_memory=max_worker_memory or 0,
        )

    return grouped_options("limits", limits, *options)
