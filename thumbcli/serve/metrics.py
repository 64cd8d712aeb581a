"""The counters every worker writes and `/metrics` reports, in shared memory."""

from __future__ import annotations

import mmap
import time

STATUS_CODES = (200, 206, 304, 400, 404, 405, 412, 413, 414, 416, 431, 500, 503, 505)
STATUS_SLOT = {code: slot for slot, code in enumerate(STATUS_CODES)}
OTHER_STATUS = len(STATUS_CODES)
BYTES_SENT = OTHER_STATUS + 1
OPEN_CONNECTIONS = BYTES_SENT + 1
CONNECTIONS_ACCEPTED = OPEN_CONNECTIONS + 1
SENDFILE_BODIES = CONNECTIONS_ACCEPTED + 1
FALLBACK_BODIES = SENDFILE_BODIES + 1
TIMEOUT_HEADER = FALLBACK_BODIES + 1
TIMEOUT_IDLE = TIMEOUT_HEADER + 1
TIMEOUT_SEND = TIMEOUT_IDLE + 1
GENERATIONS_STARTED = TIMEOUT_SEND + 1
GENERATIONS_JOINED = GENERATIONS_STARTED + 1
GENERATIONS_REFUSED = GENERATIONS_JOINED + 1
GENERATIONS_FAILED = GENERATIONS_REFUSED + 1
GENERATIONS_TIMED_OUT = GENERATIONS_FAILED + 1
GENERATION_WAITING = GENERATIONS_TIMED_OUT + 1
#: When a worker's generate-on-miss last failed on our side (its decoder pool could not decode),
#: in whole seconds of the monotonic clock (which every process shares), plus one; 0 once a later
#: generation reached a decoder. Not a counter: `generation_broken` reads it.
GENERATION_BROKEN_AT = GENERATION_WAITING + 1
CONNECTIONS_SHED = GENERATION_BROKEN_AT + 1
MEMORY_BODIES = CONNECTIONS_SHED + 1
REPEATED_HEADS = MEMORY_BODIES + 1
COUNTER_SLOTS = REPEATED_HEADS + 1
#: How long /healthz says not ok after such a failure, unless a generation works first. Not for
#: ever: a load balancer that takes the server out of rotation sends it no miss to recover on.
BROKEN_SECONDS = 60


def broken_now() -> int:
    """The value a worker writes to GENERATION_BROKEN_AT when its generation fails on our side."""
    return int(time.monotonic()) + 1


class MetricsBoard:
    """Counters in anonymous shared memory: one row per worker, summed when scraped."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # An anonymous mmap is MAP_SHARED, so forked workers write into the same pages.
        self._memory = mmap.mmap(-1, workers * COUNTER_SLOTS * 8)
        self._all = memoryview(self._memory).cast("q")

    def row(self, worker: int) -> memoryview:
        """The counters one worker writes to."""
        return self._all[worker * COUNTER_SLOTS : (worker + 1) * COUNTER_SLOTS]

    def totals(self) -> list[int]:
        """Every counter summed over the workers."""
        rows = [self._all[w * COUNTER_SLOTS : (w + 1) * COUNTER_SLOTS].tolist() for w in range(self.workers)]
        return [sum(column) for column in zip(*rows, strict=True)]

    def generation_broken(self) -> int:
        """Workers whose generate-on-miss failed on our side in the last BROKEN_SECONDS and has not worked since."""
        since = broken_now() - BROKEN_SECONDS
        rows = range(self.workers)
        return sum(1 for w in rows if self._all[w * COUNTER_SLOTS + GENERATION_BROKEN_AT] > since)

    def render(self) -> bytes:
        """The counters in the Prometheus text exposition format."""
        totals = self.totals()
        lines = [
            "# HELP thumbcli_requests_total Requests answered, by status code.",
            "# TYPE thumbcli_requests_total counter",
        ]
        lines += [f'thumbcli_requests_total{{code="{code}"}} {totals[STATUS_SLOT[code]]}' for code in STATUS_CODES]
        lines += [
            f'thumbcli_requests_total{{code="other"}} {totals[OTHER_STATUS]}',
            "# HELP thumbcli_sent_bytes_total Bytes written to clients, headers and bodies.",
            "# TYPE thumbcli_sent_bytes_total counter",
            f"thumbcli_sent_bytes_total {totals[BYTES_SENT]}",
            "# HELP thumbcli_open_connections Client connections open now.",
            "# TYPE thumbcli_open_connections gauge",
            f"thumbcli_open_connections {totals[OPEN_CONNECTIONS]}",
            "# HELP thumbcli_connections_total Client connections accepted.",
            "# TYPE thumbcli_connections_total counter",
            f"thumbcli_connections_total {totals[CONNECTIONS_ACCEPTED]}",
            "# HELP thumbcli_connections_shed_total Connections waiting on their client (a request head not"
            " complete, or idle between requests) closed to make room for a new one at the connection limit.",
            "# TYPE thumbcli_connections_shed_total counter",
            f"thumbcli_connections_shed_total {totals[CONNECTIONS_SHED]}",
            "# HELP thumbcli_bodies_total Response bodies of files sent, by how: sendfile, the plain-send"
            " fallback (reading the file), or memory (a small thumbnail read when opened, sent with its head).",
            "# TYPE thumbcli_bodies_total counter",
            f'thumbcli_bodies_total{{via="sendfile"}} {totals[SENDFILE_BODIES]}',
            f'thumbcli_bodies_total{{via="fallback"}} {totals[FALLBACK_BODIES]}',
            f'thumbcli_bodies_total{{via="memory"}} {totals[MEMORY_BODIES]}',
            "# HELP thumbcli_repeated_heads_total Requests whose head, read whole, was one answered before byte"
            " for byte, and answered again as then without being parsed (the file it named unchanged).",
            "# TYPE thumbcli_repeated_heads_total counter",
            f"thumbcli_repeated_heads_total {totals[REPEATED_HEADS]}",
            "# HELP thumbcli_timeouts_total Connections closed by a timeout, by which one.",
            "# TYPE thumbcli_timeouts_total counter",
            f'thumbcli_timeouts_total{{kind="header"}} {totals[TIMEOUT_HEADER]}',
            f'thumbcli_timeouts_total{{kind="idle"}} {totals[TIMEOUT_IDLE]}',
            f'thumbcli_timeouts_total{{kind="send"}} {totals[TIMEOUT_SEND]}',
            "# HELP thumbcli_generations_total Thumbnails made on a miss (--source), by event: started, joined"
            " (a request shared one in flight), refused (503, too many pending), failed (404 or 500), timed_out (503).",
            "# TYPE thumbcli_generations_total counter",
            f'thumbcli_generations_total{{event="started"}} {totals[GENERATIONS_STARTED]}',
            f'thumbcli_generations_total{{event="joined"}} {totals[GENERATIONS_JOINED]}',
            f'thumbcli_generations_total{{event="refused"}} {totals[GENERATIONS_REFUSED]}',
            f'thumbcli_generations_total{{event="failed"}} {totals[GENERATIONS_FAILED]}',
            f'thumbcli_generations_total{{event="timed_out"}} {totals[GENERATIONS_TIMED_OUT]}',
            "# HELP thumbcli_generation_waiting Requests waiting now for a thumbnail being made.",
            "# TYPE thumbcli_generation_waiting gauge",
            f"thumbcli_generation_waiting {totals[GENERATION_WAITING]}",
            "# HELP thumbcli_generation_broken Workers whose thumbnails made on a miss failed on our side"
            f" (their decoder pool could not decode) in the last {BROKEN_SECONDS} s and not worked since;"
            " /healthz answers 503 while above 0.",
            "# TYPE thumbcli_generation_broken gauge",
            f"thumbcli_generation_broken {self.generation_broken()}",
            "# HELP thumbcli_workers Worker processes configured.",
            "# TYPE thumbcli_workers gauge",
            f"thumbcli_workers {self.workers}",
        ]
        return ("\n".join(lines) + "\n").encode("ascii")
