"""What a watching service counts (events, queue depth, arrival-to-thumbnail latency), as a Prometheus textfile."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from pathlib import Path

from thumbcli.discover import display_path
from thumbcli.fsutil import write_atomically

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the latency histogram's buckets; the target is 0.15 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WatchMetrics:
    """Counters and a histogram, updated from any thread, written as a node_exporter textfile when asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: dict[str, int] = {}
        self.files: dict[str, int] = {}
        self.removed = 0
        self.rescans = 0
        self.queue_depth = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self.started = time.time()
        self._changed = True

    @property
    def changed(self) -> bool:
        """Whether anything changed since the textfile was last written."""
        return self._changed

    def count_events(self, events: dict[str, int]) -> None:
        """Add inotify events read, by kind (close_write, moved_to, ...)."""
        with self._lock:
            for kind, count in events.items():
                self.events[kind] = self.events.get(kind, 0) + count
            self._changed = True

    def count_file(self, status: str, latency: float | None) -> None:
        """Add one file's outcome, and the seconds from its arrival to its thumbnails (None: not an arrival)."""
        with self._lock:
            self.files[status] = self.files.get(status, 0) + 1
            if latency is not None:
                self._buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
                self._latency_sum += latency
                self._latency_count += 1
            self._changed = True

    def count(self, *, removed: int = 0, rescans: int = 0) -> None:
        """Add thumbnails removed and rescans made."""
        with self._lock:
            self.removed += removed
            self.rescans += rescans
            self._changed = True

    def set_queue_depth(self, depth: int) -> None:
        """Files noticed and not yet made (or found fresh)."""
        with self._lock:
            if depth != self.queue_depth:
                self.queue_depth = depth
                self._changed = True

    def text(self) -> str:
        """The metrics in the Prometheus text format."""
        with self._lock:
            lines = [
                "# HELP thumbcli_watch_events_total inotify events read, by kind.",
                "# TYPE thumbcli_watch_events_total counter",
                *(f'thumbcli_watch_events_total{{kind="{k}"}} {v}' for k, v in sorted(self.events.items())),
                "# HELP thumbcli_watch_files_total Source files handled since the watch started, by outcome.",
                "# TYPE thumbcli_watch_files_total counter",
                *(f'thumbcli_watch_files_total{{outcome="{k}"}} {v}' for k, v in sorted(self.files.items())),
                "# HELP thumbcli_watch_removed_total Thumbnails removed because their source went away.",
                "# TYPE thumbcli_watch_removed_total counter",
                f"thumbcli_watch_removed_total {self.removed}",
                "# HELP thumbcli_watch_rescans_total Trees walked again (overflow, unwatched folders, --rescan).",
                "# TYPE thumbcli_watch_rescans_total counter",
                f"thumbcli_watch_rescans_total {self.rescans}",
                "# HELP thumbcli_watch_queue_depth Files noticed and not yet made.",
                "# TYPE thumbcli_watch_queue_depth gauge",
                f"thumbcli_watch_queue_depth {self.queue_depth}",
                "# HELP thumbcli_watch_latency_seconds From a file's arrival to its thumbnails on disk.",
                "# TYPE thumbcli_watch_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, None), self._buckets, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else f"{bound:g}"
                lines.append(f'thumbcli_watch_latency_seconds_bucket{{le="{le}"}} {cumulative}')
            lines += [
                f"thumbcli_watch_latency_seconds_sum {self._latency_sum:.6f}",
                f"thumbcli_watch_latency_seconds_count {self._latency_count}",
                "# HELP thumbcli_watch_start_timestamp_seconds When the watch started.",
                "# TYPE thumbcli_watch_start_timestamp_seconds gauge",
                f"thumbcli_watch_start_timestamp_seconds {self.started:.3f}",
            ]
            self._changed = False
        return "\n".join(lines) + "\n"

    def write(self, path: Path, *, force: bool = False) -> None:
        """Write the textfile atomically, if anything changed since the last write (or `force`)."""
        if not (self._changed or force):
            return
        try:
            write_atomically(path.parent, path.name, self.text().encode())
        except OSError as exc:
            log.warning("%s: cannot write the metrics: %s", display_path(path), exc.strerror or exc)
