"""The HTTP server for a thumbnail cache: `thumbcli serve`.

`options` says what it is told; `supervisor` binds and runs the worker processes;
`worker` is one process's event loop, `protocol` one connection, `respond` one answer,
`http` the pure HTTP rules, `files` the opened thumbnails, `accesslog` and `metrics`
what it reports, `misses` generate-on-miss (with `--source` only: the plain server
never imports the pipeline or pyvips).

Nothing is imported here, so that `thumbcli.serve.options` stays cheap for the CLI to read.
"""
