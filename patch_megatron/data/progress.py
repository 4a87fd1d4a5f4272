"""Progress line and final summary for long preprocessing runs."""

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Prints ``[####----] 45.0% | N docs | X docs/s | Y MB/s`` every ``interval`` documents.

    On a terminal the line redraws in place; in a log file each update is a line.
    ``total_bytes`` (input size on disk) gives the percentage; None leaves it out.
    """

    def __init__(self, interval: int, total_bytes: Optional[int] = None,
                 stream: Optional[TextIO] = None, width: int = 24) -> None:
        self.interval = max(1, interval)
        self.total_bytes = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.time()
        self.documents = 0
        self.bytes = 0
        self._next_report = self.interval
        self._in_place = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, documents: int, payload_bytes: int) -> None:
        self.documents += documents
        self.bytes += payload_bytes
        if self.documents >= self._next_report:
            self._next_report = (self.documents // self.interval + 1) * self.interval
            self._print()

    def close(self) -> None:
        if self._in_place:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        parts = []
        if self.total_bytes:
            fraction = min(1.0, self.bytes / self.total_bytes)
            filled = int(round(fraction * self.width))
            parts.append(f"[{'#' * filled}{'-' * (self.width - filled)}] {100 * fraction:5.1f}%")
        parts += [f"{self.documents} docs", f"{self.documents / elapsed:.1f} docs/s",
                  f"{self.bytes / elapsed / 1e6:.2f} MB/s", f"{elapsed:.1f}s"]
        return " | ".join(parts)

    def _print(self) -> None:
        end = "\r" if self._in_place else "\n"
        self.stream.write(self.line() + end)
        self.stream.flush()
