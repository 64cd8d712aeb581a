"""The only `import tqdm`: a progress bar the pipeline sees as two callbacks."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from tqdm import tqdm


class ProgressBar:
    """Files done of found, images/s and ETA on stderr; silent when stderr is not a terminal."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=0,
            unit="img",
            file=sys.stderr,
            disable=not (enabled and sys.stderr.isatty()),
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._lock = threading.Lock()
        self._skipped = 0
        self._failed = 0

    def found(self, count: int) -> None:
        """More files were found; the total grows as the walk goes."""
        with self._lock:
            self._bar.total = (self._bar.total or 0) + count
            self._bar.refresh()

    def finished(self, status: str) -> None:
        """One file is done: made, skipped or failed."""
        with self._lock:
            if status == "skipped":
                self._skipped += 1
            elif status == "failed":
                self._failed += 1
            self._bar.set_postfix(skipped=self._skipped, failed=self._failed, refresh=False)
            self._bar.update(1)

    def write_line(self, line: str) -> None:
        """Print a line above the bar without tearing it."""
        with self._lock:
            self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
