"""One worker thread over keyed, de-duplicating queues, with a periodic resync.

Each reconciler (ComputeJobs with ResultCaches; GMemSeeds) runs on its own: kopf's handlers
put what changed into a lane; the worker takes the resync when it is due, else the first
item of the first non-empty lane (lanes in priority order), hands it to the reconciler's
`handle`, records `healthy_at` (the liveness probe's clock) and logs what raised, so one bad
object never stops the thread.

A lane holds one entry per key: putting a key already queued replaces its value and keeps
its place. A key can be marked busy (worked on elsewhere, e.g. on a pool): what arrives
for it meanwhile is deferred until `release`. A lane's `accept` rejects values superseded
while queued. Lanes are not thread-safe on their own: callers hold `cond`, which the
reconciler also uses for the state its decisions share with the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

Handle = Callable[[str, Any, Any], None]   # (lane, key, value)


class Lane:
    def __init__(self, name: str, accept: Callable[[Any], bool] | None = None) -> None:
        self.name = name
        self._accept = accept or (lambda _value: True)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._busy: set[Hashable] = set()
        self._deferred: dict[Hashable, Any] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: Hashable, value: Any = None) -> None:
        self._items[key] = value

    def remove(self, key: Hashable) -> None:
        """Unqueue `key` (what is deferred for it stays)."""
        self._items.pop(key, None)

    def forget(self, key: Hashable) -> None:
        """Unqueue `key` and drop what is deferred for it."""
        self._items.pop(key, None)
        self._deferred.pop(key, None)

    def queued(self, key: Hashable) -> bool:
        """Queued, or worked on elsewhere: either way decided soon."""
        return key in self._items or key in self._busy

    def hold(self, key: Hashable) -> None:
        """`key` is worked on elsewhere: defer what arrives for it until `release`."""
        self._busy.add(key)

    def release(self, key: Hashable, value: Any, requeue: bool) -> None:
        """The outside work on `key` is done and left `value` (its latest state, or None: read
        it afresh). Queue what arrived meanwhile if it is newer, else `value` if `requeue`."""
        self._busy.discard(key)
        arrived = self._deferred.pop(key, value)
        if key in self._items or not self._accept(arrived):
            arrived = self._items.get(key, value)
        if requeue or arrived is not value:
            self._items[key] = arrived

    def take(self) -> tuple[Hashable, Any] | None:
        while self._items:
            key, value = self._items.popitem(last=False)
            if key in self._busy:  # worked on elsewhere: decided when that is done
                self._deferred[key] = value
            elif self._accept(value):  # else superseded while queued: skip
                return key, value
        return None


class WorkQueue:
    RESYNC = "resync"

    def __init__(self, name: str, lanes: Sequence[Lane], resync_seconds: float, stall_seconds: float,
                 logger: logging.Logger) -> None:
        self.name = name
        self.lanes = {lane.name: lane for lane in lanes}
        self.resync_seconds = resync_seconds
        self.stall_seconds = stall_seconds
        self.log = logger
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_resync = float("-inf")  # never: the first resync is due at once, whatever the clock's origin
        self.healthy_at = time.monotonic()

    def put(self, lane: str, key: Hashable, value: Any = None) -> None:
        with self.cond:
            self.lanes[lane].put(key, value)
            self.cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, handle: Handle, resync: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._loop, args=(handle, resync), name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        with self.cond:
            self.cond.notify()
        if self._thread:
            self._thread.join(timeout=timeout)

    def live(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and \
            time.monotonic() - self.healthy_at < self.stall_seconds

    def _next(self) -> tuple[str, Hashable, Any] | None:
        with self.cond:
            while not self._stop.is_set():
                now = time.monotonic()
                due = self._last_resync + self.resync_seconds
                if now >= due:
                    return self.RESYNC, None, None
                for lane in self.lanes.values():
                    item = lane.take()
                    if item is not None:
                        return lane.name, item[0], item[1]
                self.cond.wait(timeout=max(0.05, due - now))
        return None

    def _loop(self, handle: Handle, resync: Callable[[], None]) -> None:
        while not self._stop.is_set():
            item = self._next()
            if item is None:
                return
            lane, key, value = item
            self.healthy_at = time.monotonic()
            try:
                if lane == self.RESYNC:
                    self._last_resync = time.monotonic()
                    resync()
                else:
                    handle(lane, key, value)
            except Exception:
                self.log.exception("%s %s failed", lane, _describe(key))


def _describe(key: Hashable) -> str:
    if isinstance(key, tuple):
        return "/".join(map(str, key))
    return "" if key is None else str(key)
