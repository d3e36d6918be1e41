"""Progress of long work (pulls, unpacking): a redrawn bar on a terminal, plain lines
otherwise (CI logs)."""

from __future__ import annotations

import time
from typing import TextIO

BAR_WIDTH = 30
PLAIN_EVERY_S = 2.0


class Progress:
    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._last_line: dict[str, float] = {}
        self._drawn = False

    def update(self, what: str, done: int, total: int | None) -> None:
        """`what` (a layer, "unpacking") has `done` of `total` bytes (total None: unknown)."""
        if self.quiet:
            return
        finished = total is not None and done >= total
        if self.tty:
            if total:
                filled = int(BAR_WIDTH * min(done, total) / total)
                bar = "#" * filled + "-" * (BAR_WIDTH - filled)
                line = f"{what[:24]:<24} [{bar}] {done / 1e6:6.1f}/{total / 1e6:.1f} MB"
            else:
                line = f"{what[:24]:<24} {done / 1e6:6.1f} MB"
            self.stream.write("\r\x1b[K" + line + ("\n" if finished else ""))
            self._drawn = not finished
            self.stream.flush()
            return
        now = time.monotonic()
        if finished or now - self._last_line.get(what, 0.0) >= PLAIN_EVERY_S:
            self._last_line[what] = now
            size = f"{done}/{total}" if total is not None else f"{done}"
            state = "done" if finished else "progress"
            self.stream.write(f"{what}: {state} {size} bytes\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
