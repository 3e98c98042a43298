"""The usage index of a store's cache keys: when each was written and last used (written or hit),
and its logical size. Retention evicts by it (least recently used first) and cache statistics
are counted from it, so neither lists the store.

Layout (the store's; nothing else names these objects):
- usage/log/<ns since the epoch, 20 digits>-<8 hex>: a batch of uses, canonical JSON, append-only;
- usage/snapshot: the index as of the newest batch it merged (`through`), canonical JSON.

One writer appends batches (the operator: its hits, and the writes its jobs report) and one
compacts them (the operator's retention worker); a batch named at or before `through` is merged
and deleted, so a crash between writing the snapshot and deleting merged batches merges nothing
twice. Whoever can write the store can write these objects: they only decide what is evicted
first, never what is served.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..canonical import canonical_json
from ..errors import NotFound
from .backend import Backend

# What parsing a usage object someone else wrote can raise (the index is kept whatever they wrote).
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError)

LOG = "usage/log/"
SNAPSHOT = "usage/snapshot"

WRITE, HIT, EVICT = "write", "hit", "evict"


@dataclass(frozen=True)
class Use:
    key: str
    kind: str   # WRITE, HIT or EVICT
    at: float   # seconds since the epoch
    size: int = 0  # the result's logical size (WRITE, HIT)

    def to_list(self) -> list[Any]:
        return [self.key, self.kind, round(self.at, 3), self.size]


@dataclass
class Entry:
    written: float
    last_used: float
    size: int


@dataclass
class UsageIndex:
    """Every known key's entry, the newest batch merged, and running totals."""

    entries: dict[str, Entry] = field(default_factory=dict)
    through: str = ""  # the newest usage/log/ name merged
    refs_indexed: bool = False  # every ref in the store was indexed once
    evicted: int = 0  # entries evicted so far
    last_eviction: float | None = None
    stored_per_logical: float | None = None  # stored bytes / logical bytes, as last measured

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def apply(self, uses: Iterable[Use]) -> None:
        for use in uses:
            entry = self.entries.get(use.key)
            if use.kind == EVICT:
                if entry is not None and entry.last_used <= use.at:
                    del self.entries[use.key]
                    self.evicted += 1
                    self.last_eviction = max(self.last_eviction or 0.0, use.at)
            elif entry is None:
                self.entries[use.key] = Entry(use.at, use.at, use.size)
            else:
                entry.last_used = max(entry.last_used, use.at)
                entry.size = use.size or entry.size
                if use.kind == WRITE:
                    entry.written = max(entry.written, use.at)

    def to_bytes(self) -> bytes:
        return canonical_json({
            "v": 1, "through": self.through, "refsIndexed": self.refs_indexed, "evicted": self.evicted,
            "lastEviction": self.last_eviction, "storedPerLogical": self.stored_per_logical,
            "entries": {k: [e.written, e.last_used, e.size] for k, e in self.entries.items()}})

    @classmethod
    def from_bytes(cls, data: bytes) -> UsageIndex:
        body = json.loads(data)
        entries = {str(k): Entry(float(v[0]), float(v[1]), int(v[2])) for k, v in body["entries"].items()}
        return cls(entries, str(body["through"]), bool(body["refsIndexed"]), int(body["evicted"]),
                   body.get("lastEviction"), body.get("storedPerLogical"))


def _parse(data: bytes) -> list[Use]:
    return [Use(str(k), str(kind), float(at), int(size)) for k, kind, at, size in json.loads(data)]


def append(backend: Backend, uses: list[Use]) -> str | None:
    """Write one batch; its name sorts after every batch written before it by this writer."""
    if not uses:
        return None
    name = f"{LOG}{time.time_ns():020d}-{secrets.token_hex(4)}"
    backend.put(name, canonical_json([u.to_list() for u in uses]))
    return name


def load(backend: Backend) -> tuple[UsageIndex, list[str]]:
    """The snapshot with every batch written after it applied, and the names of those batches."""
    try:
        index = UsageIndex.from_bytes(backend.get(SNAPSHOT))
    except NotFound:
        index = UsageIndex()
    except MALFORMED:  # anyone who can write the store can write it: start over from the refs, never fail
        index = UsageIndex()
    return merge(backend, index)


def merge(backend: Backend, index: UsageIndex) -> tuple[UsageIndex, list[str]]:
    """Apply the batches written after `index.through` (in order) to `index`."""
    names = sorted(i.name for i in backend.list(LOG) if i.name > index.through)
    for name in names:
        try:
            index.apply(_parse(backend.get(name)))
        except NotFound:  # merged and deleted by another compaction meanwhile
            continue
        except MALFORMED:  # not a batch this module wrote: skipped (compaction deletes it)
            pass
        index.through = name
    return index, names


def save(backend: Backend, index: UsageIndex) -> None:
    """Write the snapshot, then delete the batches it merged."""
    backend.put(SNAPSHOT, index.to_bytes())
    for info in list(backend.list(LOG)):
        if info.name <= index.through:
            backend.delete(info.name)
