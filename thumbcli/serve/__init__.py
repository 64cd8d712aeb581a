"""The HTTP server for a thumbnail cache: `thumbcli serve`.

`options` says what it is told; `supervisor` binds and runs the worker processes;
`worker` is one process's event loop, `protocol` one connection, `respond` one answer,
`http` the pure HTTP rules, `files` the opened thumbnails, `accesslog` and `metrics`
what it reports, `misses` generate-on-miss (with `--source` only: the plain server
never imports the pipeline or pyvips).
"""

from thumbcli.serve.options import ServeOptions
from thumbcli.serve.supervisor import serve

__all__ = ["ServeOptions", "serve"]
