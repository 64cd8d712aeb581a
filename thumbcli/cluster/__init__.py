"""Generate on a Dask cluster: the client walks and keeps the state; each task makes a group of folders on a worker.

The client is the one writer of the state store and the run lock. It walks the sources as a
local run does (a folder whose signature vouches for it costs a stat per file and is never
sent), gathers the other folders into tasks with the records their thumbnails need, and keeps
a bounded number of tasks in flight. A task plans, reads, resamples and writes (atomically)
on a worker, and returns its counts, failures and the records it made; the client records
them. A task that fails or is lost records nothing, so its folders are simply done again.

`task` is what runs on a Dask worker; `client` is the run on the `thumbcli generate` side.
"""

#: The loggers Dask and the event loops under it write to (the CLI keeps them quiet unless --debug).
DASK_LOGGERS = ("distributed", "tornado", "asyncio")
