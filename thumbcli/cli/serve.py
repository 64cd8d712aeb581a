"""`thumbcli serve`: its options (defaults from `ServeOptions`), the presets and sources it serves, and start-up."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from thumbcli.cache import MANIFEST_NAME
from thumbcli.config import (
    Config,
)
from thumbcli.discover import display_path
from thumbcli.errors import CannotRunError, ExitCode, SpecError
from thumbcli.serve.options import ServeOptions
from thumbcli.spec import Limits, ThumbSpec

if TYPE_CHECKING:
    from thumbcli.serve.account import Account
from thumbcli.cli.options import (
    Duration,
    FolderOrBucket,
    P,
    R,
    complete_presets,
    configure_logging,
    debug_option,
    exits_on_errors,
    fail,
    limit_options,
    no_sandbox_option,
)

_SERVE_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(ServeOptions) if f.default is not dataclasses.MISSING
}


def _serve_option(*names: str, **attrs: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A serve option whose default is `ServeOptions`' (stated once, there), shown in --help."""
    field_name = next(name for name in names if name.startswith("--"))[2:].replace("-", "_")
    return click.option(*names, default=_SERVE_DEFAULTS[field_name], show_default=True, **attrs)


@click.command()
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
@click.option(
    "--user",
    metavar="NAME",
    help="Started as root: bind the ports, then run the HTTP workers as this user.  [default: no switch]",
)
@click.option("--no-sendfile", is_flag=True, help="Send bodies with plain writes instead of sendfile(2).")
@click.option("--browse", is_flag=True, help="Gallery pages for folder URLs (off: a shop's catalogue stays unlisted).")
@click.option(
    "--source",
    "source_root",
    type=FolderOrBucket(exists=True, file_okay=False, path_type=Path),
    help="Make missing or stale thumbnails from this source tree (or bucket: s3://bucket/prefix, az://...) on request.",
)
@click.option(
    "--named-sources",
    is_flag=True,
    help="Make them on request from the config's [sources], each under /<preset>/<name>/.",
)
@click.option(
    "--preset",
    "presets",
    multiple=True,
    metavar="NAME",
    shell_complete=complete_presets,
    help="With --source: presets to make (default: all).",
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
    "--strict", is_flag=True, help="With --source: refuse damaged images instead of thumbnailing what decodes."
)
@debug_option("Debug logging.")
@no_sandbox_option
@click.pass_obj
@exits_on_errors
@limit_options("With --source")
def serve(
    config: Config,
    /,
    cache_root: Path,
    no_sendfile: bool,
    source_root: Path | str | None,
    named_sources: bool,
    presets: tuple[str, ...],
    debug: bool,
    limits: Limits,
    user: str | None,
    **listening: Any,
) -> None:
    """Serve the thumbnails in CACHE over HTTP: /<preset>/<source path>."""
    from thumbcli.serve.supervisor import describe
    from thumbcli.serve.supervisor import serve as run_server

    configure_logging(debug)
    account = _account(user)
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
        decode_for=tuple(config.presets.values()),
        limits=limits,
        user=account,
        **listening,
    )
    try:
        code = run_server(options, ready=ready)
    except OSError as exc:
        fail(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}", ExitCode.CANNOT_RUN)
    sys.exit(code)


def _account(user: str | None) -> Account | None:
    """The account `--user` names, looked up before anything starts; a name that cannot be used is a usage error."""
    if user is None:
        return None
    from thumbcli.serve.account import account_to_become  # ctypes and subprocess: only for --user

    try:
        return account_to_become(user)
    except SpecError as exc:  # one line, as a config error: no usage text to bury it under
        fail(str(exc), ExitCode.USAGE)


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
    elif not (cache_root / MANIFEST_NAME).exists() and _holds_anything(cache_root):
        # A photo folder or an -o tree would start, say "presets: none yet" and answer 404 to everything.
        raise CannotRunError(
            f"{display_path(cache_root)} is not a thumbcli cache (no {MANIFEST_NAME}): serve a folder that "
            "`generate --cache` wrote, an empty one, or give --source to make thumbnails into it"
        )


def _holds_anything(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False  # unreadable: the server says so when it reads it


def _serve_named_sources(
    config: Config, source_root: Path | str | None, named_sources: bool
) -> tuple[tuple[str, Path], ...]:
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
    return config.specs_to_make(names)
