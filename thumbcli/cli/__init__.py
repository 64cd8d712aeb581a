"""The command line, the only `import click`: options into spec objects, library calls, errors to exit codes.

`app` is the `thumbcli` group and its small commands, `generate` and `serve` the two big
commands, `options` what they share (parameter types, option decorators, exit codes).
"""

from thumbcli.cli.app import config_default_map, main, run

__all__ = ["config_default_map", "main", "run"]
