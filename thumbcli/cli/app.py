"""The `thumbcli` group: the config file read into every command's defaults, and prune, config and formats."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import click

from thumbcli import __version__
from thumbcli.cli.generate import generate
from thumbcli.cli.options import (
    ByteSize,
    Duration,
    FolderOrBucket,
    Megapixels,
    dry_run_option,
    exits_on_errors,
    json_option,
    quiet_option,
    wait_option,
)
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
from thumbcli.errors import ExitCode
from thumbcli.objectstores import TIMEOUT_SETTING
from thumbcli.spec import human_bytes


class CommandsOnDemand(click.Group):
    """The `thumbcli` group, whose `serve` and `watch` are imported only when they are named.

    Their options took about a tenth of every `generate` start (ServeOptions, the serve and watch
    command modules): `thumbcli --help`, completion and the config check still see every command.
    """

    #: Each command defined elsewhere, by the module under `thumbcli.cli` that defines it (under its own name).
    ON_DEMAND: ClassVar[Mapping[str, str]] = {"serve": "thumbcli.cli.serve", "watch": "thumbcli.cli.watch"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, the ones not imported yet included."""
        return sorted({*super().list_commands(ctx), *self.ON_DEMAND})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command named, imported and added to the group at its first use."""
        module = self.ON_DEMAND.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            command: click.Command = getattr(importlib.import_module(module), cmd_name)
            self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=CommandsOnDemand,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        "auto_envvar_prefix": "THUMBCLI",
    },
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
@exits_on_errors
def main(ctx: click.Context, config_path: str | None) -> None:
    """Batch thumbnailer, thumbnail-cache warmer and thumbnail server."""
    setting = os.environ.get("THUMBCLI_SANDBOX")
    user_setting = os.environ.get("THUMBCLI_SANDBOX_USER")
    if setting or user_setting:  # unset means every layer as nobody: nothing to check, and no ctypes loaded for it
        from thumbcli.sandbox import SandboxSettingError, account_for_workers, chosen_layers

        try:
            # Checked here, where a typo is a usage error, rather than when the first worker starts.
            account_for_workers(chosen_layers(setting))
        except SandboxSettingError as exc:
            raise click.UsageError(str(exc)) from None
    if os.environ.get(TIMEOUT_SETTING):
        from thumbcli.bucket import stall_seconds  # only then: a local run never loads the object-store side

        stall_seconds()  # a typo is a usage error now, not a failure of every object later
    path = find_config(config_path)
    config = load_config(path) if path is not None else Config()
    ctx.default_map = config_default_map(config, main) if config.path is not None else {}
    ctx.obj = config


def run() -> NoReturn:
    """The `thumbcli` command: the click group, then an exit without interpreter teardown."""
    try:
        code: object = main(standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    except click.UsageError as exc:
        code = usage_error(exc)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("thumbcli: aborted", err=True)
        code = ExitCode.INTERRUPTED
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


def usage_error(exc: click.UsageError) -> int:
    """Say what was wrong with the command line in one line (the closest option, if one was misspelt); exit 2."""
    names, ctx = [], exc.ctx
    while ctx is not None and ctx.parent is not None:  # the program's own name, however it was started
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    command = " ".join(["thumbcli", *reversed(names)])
    if isinstance(exc, click.NoSuchOption) and exc.ctx is not None:
        import difflib  # only a misspelt option pays for it

        known = [name for param in exc.ctx.command.params for name in param.opts + param.secondary_opts]
        closest = difflib.get_close_matches(exc.option_name, known, n=1, cutoff=0.6)
        message = f"no such option {exc.option_name}" + (f" (did you mean {closest[0]}?)" if closest else "")
    else:
        message = " ".join(exc.format_message().split()).rstrip(".")
    click.echo(f"{command}: error: {message}; see {command} --help", err=True)
    return ExitCode.USAGE


def config_default_map(config: Config, group: click.Group) -> dict[str, dict[str, Any]]:
    """The config's option defaults keyed by click parameter names, as `default_map` wants them.

    The file names options by their long names (`format`, `max-time`, `json`); a name that
    no option of the command has is refused (a typo must not pass silently), and so is a
    value of the wrong type or out of range, with the file and line.
    """
    default_map: dict[str, dict[str, Any]] = {}
    for command_name, values in config.defaults.items():
        command = group.get_command(click.Context(group), command_name)
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


@main.command()
@click.option(
    "-o",
    "--output",
    type=FolderOrBucket(exists=True, file_okay=False, path_type=Path),
    help="The output tree (folder or bucket) to prune (thumbnails whose source is gone).",
)
@click.option(
    "--cache",
    "cache_dir",
    type=FolderOrBucket(exists=True, file_okay=False, path_type=Path),
    help="The served cache (folder or bucket) to prune.",
)
@click.option("--freedesktop", is_flag=True, help="Prune the desktop thumbnail cache instead.")
@dry_run_option("List what would be removed, with sizes; remove nothing.")
@wait_option
@json_option("Print what was removed as JSON on stdout.")
@quiet_option("Print nothing but errors.")
@click.pass_obj
@exits_on_errors
def prune(
    config: Config,
    output: Path | str | None,
    cache_dir: Path | str | None,
    freedesktop: bool,
    dry_run: bool,
    wait: bool,
    json_summary: bool,
    quiet: bool,
) -> None:
    """Remove thumbnails whose source, preset or settings are gone, and the empty folders left."""
    from thumbcli.job import Destination, FreedesktopDestination, choose_destination
    from thumbcli.run import prune as run_prune

    if sum([cache_dir is not None, output is not None, freedesktop]) != 1:
        raise click.UsageError("give exactly one of -o/--output DIR, --cache DIR or --freedesktop")
    destination: Destination
    if output is not None or cache_dir is not None:
        destination = choose_destination(output, cache_dir, (), None)
    else:
        destination = FreedesktopDestination(())
    summary = run_prune(destination, presets=config.presets or None, sources=config.sources, dry_run=dry_run, wait=wait)
    if json_summary:
        click.echo(json.dumps(summary.as_json()))
    elif not quiet:
        if dry_run:
            for removal in summary.removals:
                click.echo(f"{removal.shown}\t{removal.bytes}\t{removal.reason}")
        if dry_run or sys.stderr.isatty():
            verb = "would remove" if dry_run else "removed"
            click.echo(f"thumbcli: {verb} {len(summary.removals)} files, {human_bytes(summary.bytes)}", err=True)


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective configuration and where each value comes from."""
    config: Config = ctx.obj
    click.echo(f"# config file: {config.path or '(none found)'}")
    if config.qualities:
        table = ", ".join(f"{fmt}:{quality}" for fmt, quality in config.qualities.items())
        click.echo(f"quality by format: {table}  # from {config.path}")
    for name, spec in config.presets.items():
        made = config.specs_to_make((name,))
        formats = ",".join(f"{variant.format}:{variant.effective_quality}" for variant in made)
        click.echo(
            f"preset {name}: size={spec.box.label} fit={spec.fit} format(quality)={formats} "
            f"upscale={spec.upscale} keep-metadata={spec.keep_metadata}  # from {config.path}"
        )
    default_map = ctx.find_root().default_map or {}
    for command_name in ("generate", "prune", "serve", "watch"):
        command = main.get_command(ctx, command_name)
        assert command is not None
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


@main.command("formats")
@json_option("Print the libvips in use and the formats as JSON on stdout.")
def show_formats(json_summary: bool) -> None:
    """Say which libvips is in use and which kinds of file can be read here, with the decoder behind each.

    The kinds, their suffixes, MIME types and wheels come from the format registry (`thumbcli.formats`).
    """
    from thumbcli import resample  # loads libvips: only this command needs it
    from thumbcli.sandbox import SETTING, SandboxSettingError
    from thumbcli.workers import WorkerBug, confinement_here

    resample.configure_libvips()  # as a resample worker sees it: untrusted loaders blocked
    libvips = resample.libvips_in_use()
    support = resample.format_support()
    try:
        # Asked of a real worker: each layer is in force only where this system has it.
        layers = confinement_here()
    except (WorkerBug, SandboxSettingError) as exc:
        raise click.ClickException(str(exc)) from None
    if json_summary:
        formats = [dataclasses.asdict(kind) for kind in support]
        summary = {"libvips": dataclasses.asdict(libvips), "sandbox": list(layers), "formats": formats}
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"libvips {libvips.version} ({libvips.origin}: {libvips.path or 'path unknown'})")
    click.echo(f"metadata option of its savers: {libvips.metadata_option}")
    in_force = ", ".join(layers) or f"none ({SETTING}={os.environ.get(SETTING, '')})"
    click.echo(f"sandbox of the resample workers: {in_force}")
    for kind in support:
        click.echo(f"{kind.kind:6} {' '.join(kind.suffixes)}  ({kind.mimetype})")
        missing = f"not readable here (pip install {kind.wheel})" if kind.wheel else "not readable here"
        click.echo(f"       {kind.decoder or missing}")


main.add_command(generate)
