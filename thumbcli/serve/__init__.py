"""The HTTP server for a thumbnail cache: `thumbcli serve`.

`options` says what it is told; `supervisor` binds and runs the worker processes;
`worker` is one process's event loop, `protocol` one connection, `respond` one answer,
`http` the pure HTTP rules, `files` the opened thumbnails, `misses` generate-on-miss
(with `--source` only: the plain server never imports the pipeline or pyvips).
"""

from thumbcli.serve.files import OPEN_FILE_SECONDS
from thumbcli.serve.http import entity_tag_matches, etag_for, parse_http_date, parse_single_range
from thumbcli.serve.metrics import MetricsBoard
from thumbcli.serve.options import ServeOptions
from thumbcli.serve.supervisor import serve

__all__ = [
    "OPEN_FILE_SECONDS",
    "MetricsBoard",
    "ServeOptions",
    "entity_tag_matches",
    "etag_for",
    "parse_http_date",
    "parse_single_range",
    "serve",
]
