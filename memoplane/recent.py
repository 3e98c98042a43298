"""A bounded in-process LRU of results already read and verified from the store.

Entries are immutable encoded bytes keyed by cache key; a key names one
computation, so an entry stays correct for as long as it is kept."""

from __future__ import annotations

import threading
from collections import OrderedDict


class VerifiedCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, bytes] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, codec: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:  # one huge value must not flush everything else
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._entries[key] = (codec, data)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)
