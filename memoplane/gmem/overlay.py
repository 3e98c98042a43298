"""Written overrides over the generated values, with fast batched lookups.

An overlay is two sorted tiers plus a list of pending writes:
- base: the bulk (e.g. a loaded snapshot), rebuilt rarely;
- delta: recent writes, rebuilt from pending writes before a read, and merged into
  base once it exceeds an eighth of it, so a write costs amortised O(log n) and a
  read after a write never rebuilds the bulk.
Each tier is a sorted key array (range reads: two binary searches) with a lazily
built linear-probing hash table for random lookups: binary search over a 1 M-entry
array costs ~20 dependent cache misses per query; the table costs ~1.3 probes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .mixer import GOLDEN, U64, U64Array

IntArray = npt.NDArray[np.int64]
_EMPTY = U64(0x5D3C9A6B0F1E2D47)  # marks free slots; a key equal to it is kept aside
_LOAD = 4  # table slots per key (load <= 1/4: ~1.2 probes on hits and misses)
_DELTA_MIN = 1 << 14


def _home(keys: U64Array, bits: int) -> IntArray:
    h = np.right_shift(keys, U64(29))
    np.bitwise_xor(h, keys, out=h)
    np.multiply(h, U64(GOLDEN), out=h)
    np.right_shift(h, U64(64 - bits), out=h)
    return h.view(np.int64)  # < 2^bits: reinterpreting is free, converting is not


class HashIndex:
    """Open addressing with linear probing, built in one vectorized pass.

    Keys sorted by home slot get position pos_i = max(home_i, pos_{i-1} + 1), a
    cumulative max; every slot from a key's home to its position is then occupied,
    which is exactly the invariant a linear-probing lookup relies on. The table
    does not wrap: it is long enough that its last slot is always free.
    """

    def __init__(self, keys: U64Array, values: np.ndarray) -> None:
        n = int(keys.shape[0])
        self.bits = max(4, int(np.ceil(np.log2(max(n, 1) * _LOAD))))
        special = keys == _EMPTY
        self.special: object | None = values[special][0] if special.any() else None
        keys, values = keys[~special], values[~special]
        home = _home(keys, self.bits)
        order = np.argsort(home, kind="stable")
        home = home[order]
        idx = np.arange(home.shape[0], dtype=np.intp)
        pos = np.maximum.accumulate(home - idx) + idx if home.size else home
        size = max(1 << self.bits, int(pos[-1]) + 1 if pos.size else 0) + 1
        self.keys = np.full(size, _EMPTY, dtype=np.uint64)
        self.values = np.zeros(size, dtype=values.dtype)
        self.keys[pos] = keys[order]
        self.values[pos] = values[order]

    def lookup(self, q: U64Array) -> tuple[IntArray, np.ndarray]:
        """(positions in q that hit, their values)."""
        p = _home(q, self.bits)
        found_at: list[IntArray] = []
        slots: list[IntArray] = []
        at: IntArray | None = None  # None: all of q, in order
        qa = q
        while True:
            k = self.keys.take(p)
            live = k != _EMPTY
            hit = k == qa
            np.logical_and(hit, live, out=hit)  # a query equal to the marker is no hit
            np.logical_and(live, ~hit, out=live)
            h = np.flatnonzero(hit)
            found_at.append(h if at is None else at[h])
            slots.append(p[h])
            more = np.flatnonzero(live)
            if more.size == 0:
                break
            at = more if at is None else at[more]
            qa, p = qa[more], p[more] + 1
        pos, vals = np.concatenate(found_at), self.values.take(np.concatenate(slots))
        if self.special is not None:
            extra = np.flatnonzero(q == _EMPTY)
            pos = np.concatenate([pos, extra])
            vals = np.concatenate([vals, np.full(extra.size, self.special, dtype=vals.dtype)])
        return pos, vals


class Tier:
    """Sorted unique keys with their values; the hash index is built on first use."""

    def __init__(self, keys: U64Array, values: np.ndarray) -> None:
        self.keys, self.values = keys, values
        self._index: HashIndex | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def index(self) -> HashIndex:
        if self._index is None:
            self._index = HashIndex(self.keys, self.values)
        return self._index

    def apply_range(self, offset: int, out: np.ndarray) -> None:
        n = out.shape[0]
        if n == 0:
            return
        # The last address, not the end: offset + n may be 2^64, which uint64 cannot hold.
        lo = int(np.searchsorted(self.keys, U64(offset), side="left"))
        hi = int(np.searchsorted(self.keys, U64(offset + n - 1), side="right"))
        if hi > lo:
            out[(self.keys[lo:hi] - U64(offset)).astype(np.intp)] = self.values[lo:hi]

    def apply_many(self, q: U64Array, out: np.ndarray) -> None:
        pos, vals = self.index().lookup(q)
        out[pos] = vals


def _last_wins(keys: U64Array, values: np.ndarray) -> tuple[U64Array, np.ndarray]:
    """Sort by key, keeping the last-written value of each duplicate key."""
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    if k.size > 1:
        keep = np.empty(k.shape[0], dtype=bool)
        np.not_equal(k[1:], k[:-1], out=keep[:-1])
        keep[-1] = True
        k, v = k[keep], v[keep]
    return k, v


class Overlay:
    """Overrides keyed by uint64 address; later writes win. Not thread-safe for writes."""

    def __init__(self, dtype: np.dtype | str) -> None:
        self.dtype = np.dtype(dtype)
        self._base: Tier | None = None
        self._delta: Tier | None = None
        self._pending_k: list[U64Array] = []
        self._pending_v: list[np.ndarray] = []

    @classmethod
    def from_arrays(cls, keys: U64Array, values: np.ndarray, dtype: np.dtype | str | None = None) -> Overlay:
        """An overlay from a snapshot's arrays (no store needed, e.g. inside a sandbox)."""
        ov = cls(dtype if dtype is not None else values.dtype)
        ov.put_many(keys, values)
        ov.compact()
        return ov

    def put_many(self, keys: U64Array, values: np.ndarray) -> None:
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} addresses but {values.shape[0]} values")
        self._pending_k.append(np.array(keys, dtype=np.uint64))
        self._pending_v.append(np.array(values, dtype=self.dtype))

    def __len__(self) -> int:
        """Distinct addresses overridden; O(delta log n), and it keeps the tiers as they are."""
        self._settle()
        if self._base is None or self._delta is None:
            return sum(len(t) for t in (self._base, self._delta) if t is not None)
        i = np.minimum(np.searchsorted(self._base.keys, self._delta.keys), len(self._base) - 1)
        overlap = int(np.count_nonzero(self._base.keys[i] == self._delta.keys))
        return len(self._base) + len(self._delta) - overlap

    def _settle(self) -> None:
        """Fold pending writes into the delta; fold the delta into base when large."""
        if not self._pending_k:
            return
        k, v = _last_wins(np.concatenate(self._pending_k), np.concatenate(self._pending_v))
        self._pending_k, self._pending_v = [], []
        self._delta = Tier(*_merge(self._delta, k, v)) if self._delta is not None else Tier(k, v)
        base_n = len(self._base) if self._base is not None else 0
        if len(self._delta) > max(_DELTA_MIN, base_n // 8):
            self.compact()

    def compact(self) -> None:
        """Fold pending writes and the delta into the base tier."""
        self._settle()
        if self._delta is None:
            return
        if self._base is None:
            self._base = self._delta
        else:
            self._base = Tier(*_merge(self._base, self._delta.keys, self._delta.values))
        self._delta = None

    def to_arrays(self) -> tuple[U64Array, np.ndarray]:
        """All overrides as sorted unique keys and their values."""
        self.compact()
        if self._base is None:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=self.dtype)
        return self._base.keys, self._base.values

    def tiers(self) -> list[Tier]:
        """The tiers to apply in order (later wins), with pending writes folded in."""
        self._settle()
        return [t for t in (self._base, self._delta) if t is not None]

    def apply_range(self, offset: int, out: np.ndarray) -> None:
        """Override out[i] (the value at offset + i) where written."""
        for tier in self.tiers():
            tier.apply_range(offset, out)

    def apply_many(self, addrs: U64Array, out: np.ndarray) -> None:
        """Override out[i] (the value at addrs[i]) where written."""
        for tier in self.tiers():
            tier.apply_many(addrs, out)


def _merge(old: Tier, keys: U64Array, values: np.ndarray) -> tuple[U64Array, np.ndarray]:
    """old updated with (keys, values), both sorted and unique; new values win."""
    k = np.concatenate([old.keys, keys])
    v = np.concatenate([old.values, values])
    return _last_wins(k, v)
