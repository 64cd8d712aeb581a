"""The only `import tqdm`: a progress bar the pipeline sees as two callbacks."""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


class ProgressBar:
    """Files done of found, images/s and ETA on stderr; absent when stderr is not a terminal.

    tqdm is only imported when the bar is shown: cron runs do not pay for it.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._bar: tqdm[Any] | None = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self._lock = threading.Lock()
        self._skipped = 0
        self._failed = 0

    def found(self, count: int) -> None:
        """More files were found; the total grows as the walk goes (shown at the next update)."""
        if self._bar is not None:
            with self._lock:
                self._bar.total = (self._bar.total or 0) + count

    def skipped(self, count: int) -> None:
        """`count` files were up to date."""
        if self._bar is None:
            return
        with self._lock:
            self._skipped += count
            self._bar.set_postfix(skipped=self._skipped, failed=self._failed, refresh=False)
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
            self._bar.set_postfix(skipped=self._skipped, failed=self._failed, refresh=False)
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
