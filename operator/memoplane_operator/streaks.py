"""The spot checks' agreement streaks (memoplane.cluster.spotcheck), per store: read from the
store once, kept here, and written back through the store on every change, so a restarted
operator continues with them. Thread-safe (hits are served on the resolver pool)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from memoplane.cas import Store
from memoplane.cluster import spotcheck as sc


class Streaks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_store: dict[str, dict[str, sc.Streak]] = {}

    def of(self, store: Store) -> dict[str, sc.Streak]:
        """A copy of the store's streaks, by pair."""
        return dict(self._kept(store))

    def _kept(self, store: Store) -> dict[str, sc.Streak]:
        name = store.describe()
        with self._lock:
            kept = self._by_store.get(name)
        if kept is None:
            loaded = sc.decode(store.spot_check_streaks())
            with self._lock:
                kept = self._by_store.setdefault(name, loaded)
        return kept

    def update(self, store: Store, pairs: Iterable[str], change: Callable[[sc.Streak], sc.Streak]) -> None:
        kept = self._kept(store)
        with self._lock:
            for pair in pairs:
                kept[pair] = change(kept.get(pair, sc.NO_STREAK))
            record = sc.encode(kept)
        store.set_spot_check_streaks(record)
