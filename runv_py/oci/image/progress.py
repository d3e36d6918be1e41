"""Progress of long image work (blob downloads, archive loads, layer unpacking): redrawn bars on
a terminal, one plain line per step otherwise (logs, pipes, CI). Safe to call from threads."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressTask:
    """One step (e.g. one blob): `advance()` as bytes arrive, `finish()` at the end."""

    def __init__(self, owner: Progress, label: str, total: int | None, done: int) -> None:
        self.owner = owner
        self.label = label
        self.total = total
        self.done = done
        self.resumed_at = done
        self.started = time.monotonic()
        self.finished = False

    def advance(self, n: int) -> None:
        self.done += n
        self.owner._changed(self)

    def finish(self, note: str = "done") -> None:
        if not self.finished:
            self.finished = True
            self.owner._finished(self, note)


class Progress:
    """Where progress goes. `tty=None` draws bars if `stream` is a terminal."""

    WIDTH = 20

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._active: list[ProgressTask] = []
        self._drawn = 0
        self._last_draw = 0.0

    def task(self, label: str, total: int | None, done: int = 0) -> ProgressTask:
        """Start a step; `done` > 0 when it resumes earlier work."""
        task = ProgressTask(self, label, total, done)
        with self._lock:
            self._active.append(task)
            if self.tty:
                self._draw(force=True)
            else:
                size = f" ({human_size(total)})" if total else ""
                resumed = f", resuming at {human_size(done)}" if done else ""
                self._write(f"{label}{size}{resumed}\n")
        return task

    def message(self, text: str) -> None:
        with self._lock:
            self._clear()
            self._write(text + "\n")
            self._draw(force=True)

    def _changed(self, task: ProgressTask) -> None:
        if self.tty:
            with self._lock:
                self._draw(force=False)

    def _finished(self, task: ProgressTask, note: str) -> None:
        elapsed = time.monotonic() - task.started
        moved = task.done - task.resumed_at
        rate = f", {human_size(moved / elapsed)}/s" if elapsed > 0.05 and moved else ""
        with self._lock:
            if task in self._active:
                self._active.remove(task)
            self._clear()
            self._write(f"{task.label}: {note} ({human_size(task.done)} in "
                        f"{elapsed:.1f}s{rate})\n")
            self._draw(force=True)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self, *, force: bool) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._clear()
        lines = []
        for task in self._active:
            if task.total:
                frac = min(1.0, task.done / task.total)
                filled = int(frac * self.WIDTH)
                bar = "#" * filled + "-" * (self.WIDTH - filled)
                lines.append(f"{task.label[:30]:<30} [{bar}] {human_size(task.done)}/"
                             f"{human_size(task.total)}")
            else:
                lines.append(f"{task.label[:30]:<30} {human_size(task.done)}")
        if lines:
            self._write("\n".join(lines) + "\n")
        self._drawn = len(lines)
