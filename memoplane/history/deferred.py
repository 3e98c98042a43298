"""Run records appended off the caller's path: `@memoize` hits take microseconds, a record write
(canonical JSON, a file or object created) costs more than the hit itself. A call queues how to
build its record (a closure over what it already knows); one background thread builds and
appends the queued records every FLUSH_SECONDS, and at interpreter exit.

What a crash can lose: the records of the calls of the last FLUSH_SECONDS (a killed process
never runs its exit flush); never a result, and never a record of something that did not run.
More than MAX_PENDING queued records (the writer cannot keep up) drops the oldest, logged."""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Callable

from ..cas import Store
from . import build, events
from .records import RunRecord

log = logging.getLogger("memoplane.history")

FLUSH_SECONDS = 1.0
MAX_PENDING = 100_000


class DeferredRecords:
    def __init__(self, flush_seconds: float = FLUSH_SECONDS, max_pending: int = MAX_PENDING) -> None:
        self.flush_seconds = flush_seconds
        self._pending: deque[tuple[Store, Callable[[], RunRecord]]] = deque(maxlen=max_pending)
        self._wake = threading.Event()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    def add(self, store: Store, make: Callable[[], RunRecord]) -> None:
        """Queue a record (built later by `make`); returns at once."""
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("run records dropped: %d (the history writer cannot keep up)", self.dropped)
        self._pending.append((store, make))
        if self._thread is None:
            self._start()

    def flush(self) -> int:
        """Build and append every queued record now (also at exit); how many were kept."""
        kept = 0
        with self._flushing:
            while self._pending:
                store, make = self._pending.popleft()
                try:
                    record = make()
                except Exception as exc:  # noqa: BLE001 - a record never fails anything
                    log.warning("run record not built: %s", exc)
                    continue
                kept += build.append(store, record)
                events.run_settled(record, start=True)
        self.written += kept
        return kept

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memoplane-history", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()


DEFERRED = DeferredRecords()
