"""The only `import tqdm`: a progress bar the pipeline sees as callbacks."""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


class ProgressBar:
    """Files done, images/s and, once the walk is over, the total and an ETA, on stderr; absent off a terminal.

    While the walk goes on the total is unknown: the bar counts files done and found
    so far, without a percentage or an ETA that would move backwards as files turn up.
    tqdm is only imported when the bar is shown: cron runs do not pay for it.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._bar: tqdm[Any] | None = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self._lock = threading.Lock()
        self._found = 0
        self._skipped = 0
        self._failed = 0
        self._walking = True

    def found(self, count: int) -> None:
        """More files were found by the walk."""
        if self._bar is not None:
            with self._lock:
                self._found += count
                self._show_counts()

    def walked(self) -> None:
        """The walk is over: every file is found, so the total is known and an ETA can be shown."""
        if self._bar is not None:
            with self._lock:
                self._walking = False
                self._bar.total = self._found
                self._show_counts()
                self._bar.refresh()

    def _show_counts(self) -> None:
        counts = {"found": self._found} if self._walking else {}
        if self._bar is not None:
            self._bar.set_postfix(counts | {"skipped": self._skipped, "failed": self._failed}, refresh=False)

    def skipped(self, count: int) -> None:
        """`count` files were up to date."""
        if self._bar is None:
            return
        with self._lock:
            self._skipped += count
            self._show_counts()
            self._bar.update(count)

    def finished(self, status: str) -> None:
        """One file is done: made, skipped or failed."""
        if self._bar is None:
            return
        with self._lock:
            if status == "skipped":
                self._skipped += 1
            elif status == "failed":
                self._failed += 1
            self._show_counts()
            self._bar.update(1)

    def write_line(self, line: str) -> bool:
        """Print a line above the bar; False (and nothing printed) when there is no bar."""
        if self._bar is None:
            return False
        with self._lock:
            self._bar.write(line, file=sys.stderr)
        return True

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
