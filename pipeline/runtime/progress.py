"""Progress lines for long stages: items done / total, elapsed and ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stage: str, total: int, done: int = 0, every_seconds: float = 2.0):
        self.stage, self.total, self.done = stage, total, done
        self.start, self.started_at_done = time.perf_counter(), done
        self.every, self.last_print = every_seconds, 0.0

    def advance(self, item: str, note: str = "") -> None:
        self.update(self.done + 1, item, note)

    def update(self, done: int, item: str, note: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if self.done == self.total or now - self.last_print >= self.every:
            self.last_print = now
            elapsed = now - self.start
            rate = (self.done - self.started_at_done) / elapsed if elapsed > 0 else 0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"[{self.stage}] {self.done}/{self.total} {item} {note} elapsed {elapsed:.0f}s eta {eta:.0f}s",
                  file=sys.stderr, flush=True)
