"""The store's chunks: written to packs, found through the in-memory pack index, read by coalesced
verified reads (packs.py has the format; this is how the Store uses it).

- Writes: one PackWriter per Store. Deduplication asks the in-memory index only (no request per
  chunk). `flush()` (pack PUT, then index segment) runs before any digest leaves the Store, so a
  name handed out always resolves through the index, even after a crash.
- The index is loaded on first use and refreshed (new segment names only) when a read or a
  completeness check meets a digest it does not know, and by writers once it is older than
  INDEX_REFRESH_SECONDS (so a writer notices other writers' packs, quarantined copies and,
  later, GC's tombstones within that time).
- Reads: a blob's chunks are planned together and fetched by `packs.read_chunks` (coalesced
  ranged reads, every chunk verified). Only when that fails does each chunk get read on its own,
  copy by copy, to find out which copy is bad.
- Damage: a chunk copy in a pack that does not verify is quarantined as a record
  `quarantine/packs%<2 hex>%<pack hex>.<offset>.<chunk hex>.<ns>` holding the bytes that were
  read. The pack itself stays (its other chunks are good); every Store excludes the recorded copy
  from its index (loaded with the index), so the chunk is missing, the ref naming it is not
  served, the job recomputes and its writer (which re-reads the records before every ingest) packs
  the chunk anew. Packs are named by their bytes, so that writer may PUT a pack of the very same
  name: that heals the copy, and the writer removes the record (it knows the records its Store
  loaded or wrote). When a coalesced read fails, every chunk of it is read alone, so all its
  damaged copies are quarantined at once. A pack that vanished (not through GC's index updates)
  is forgotten by the Store that finds it gone. A damaged copy read from a node-local cache
  (cached.py `drop_cached_range`) is dropped there and re-read from the remote first.
- Stores written before packs (one `chunks/<2 hex>/<hex>` object per chunk) stay readable: a
  digest the index does not know after a refresh is read from `chunks/` through `legacy`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from functools import partial

from ..errors import NotFound, StoreCorrupted
from .backend import Backend
from .digests import PREFIX, object_name
from .packs import Location, PackDamaged, PackIndex, PackWriter, read_chunks, read_range, verified_chunk

log = logging.getLogger("memoplane.cas")

INDEX_REFRESH_SECONDS = 60.0  # a writer reloads new index segments (and quarantine records) this often
QUARANTINED = "quarantine/packs%"  # records of chunk copies found damaged in packs

LegacyRead = Callable[[str, str], bytes]  # (chunk digest, blob digest) -> verified plain bytes
Audit = Callable[[str, str, str], object]  # (object, quarantined as, reason)


def location_label(loc: Location) -> str:
    """How messages, `verify` and quarantine records name a chunk copy: `packs/<2 hex>/<hex>.<offset>`."""
    return f"{object_name('packs', loc.pack)}.{loc.offset}"


def _record_name(digest: str, loc: Location) -> str:
    return f"quarantine/{location_label(loc).replace('/', '%')}.{digest[len(PREFIX):]}.{time.time_ns()}"


def _parse_record(name: str) -> tuple[str, str, int] | None:
    """(chunk digest, pack digest, offset) of a quarantine record; None if `name` is not one."""
    parts = name[len(QUARANTINED):].split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    pack = parts[0].rsplit("%", 1)[-1]
    return PREFIX + parts[2], PREFIX + pack, int(parts[1])


class _BadCopy(Exception):
    """A chunk copy that does not verify, with the bytes that were read."""

    def __init__(self, reason: str, seen: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seen = seen


def _verified(digest: str, stored: bytes, loc: Location) -> bytes:
    if len(stored) != loc.length:
        raise PackDamaged(f"pack {loc.pack} is shorter than its index says")
    return verified_chunk(digest, stored, loc.plain)


class Chunks:
    """The chunks of one Store (thread-safe)."""

    def __init__(self, backend: Backend, legacy: LegacyRead, audit: Audit,
                 work: Callable[[], Executor] | None = None) -> None:
        """`work`: the Store's pool, for loading index segments concurrently (never called from it)."""
        self.backend = backend
        self._work = work
        self.index = PackIndex()
        self.writer = PackWriter(backend, self.index)
        self._legacy = legacy
        self._audit = audit
        self._loaded_at: float | None = None  # time.monotonic() of the last refresh
        self._refresh_lock = threading.Lock()
        self._records: dict[tuple[str, str, int], str] = {}  # quarantined copy -> its record's name
        self._records_lock = threading.Lock()

    # -- the index ----------------------------------------------------------------

    def ready(self, max_age: float | None = None) -> None:
        """Load the index if it never was (or, with `max_age`, if it is older than that)."""
        loaded = self._loaded_at
        if loaded is None or (max_age is not None and time.monotonic() - loaded > max_age):
            self.refresh()

    def refresh(self) -> None:
        """Load new index segments, then drop every copy a quarantine record names."""
        with self._refresh_lock:
            self.index.refresh(self.backend, self._work() if self._work else None)
            self._load_records()
            self._loaded_at = time.monotonic()

    def _load_records(self) -> None:
        """Drop every copy a quarantine record names from the index (one listing)."""
        for info in self.backend.list(QUARANTINED):
            found = _parse_record(info.name)
            if found is not None:
                self.index.forget(*found)
                with self._records_lock:
                    self._records[found] = info.name

    def _unknown(self, digests: Iterable[str]) -> list[str]:
        """The digests the index does not know, after one refresh if there were any."""
        self.ready()
        unknown = [d for d in digests if d not in self.index]
        if unknown:
            self.refresh()
            unknown = [d for d in unknown if d not in self.index]
        return unknown

    # -- writing ------------------------------------------------------------------

    def put(self, digest: str, encode: Callable[[], bytes], plain_length: int) -> bool:
        """chunking.ChunkPut: queue a chunk unless the index or the writer has it."""
        return self.writer.add(digest, encode, plain_length)

    def begin_write(self) -> None:
        """Before an ingest: the index loaded, and not older than INDEX_REFRESH_SECONDS; and the
        quarantine records read again (one listing, nearly always empty), so a job recomputed
        because a reader found a copy damaged packs that chunk anew instead of deduplicating
        against the damaged copy."""
        loaded = self._loaded_at
        self.ready(INDEX_REFRESH_SECONDS)
        if loaded is not None and loaded == self._loaded_at:
            self._load_records()

    def flush(self) -> None:
        """Make every chunk put so far findable through the index (packs, then a segment)."""
        with self._refresh_lock:  # so a refresh's segments cannot pass for this writer's rewrite
            self.writer.flush()
            self._heal()

    def _heal(self) -> None:
        """A quarantined copy this Store's writer just wrote again (it re-packed the same chunks
        into a pack of the same name: packs are named by their bytes) is whole: its record goes,
        so other Stores use the copy again. Runs under the refresh lock, right after the flush:
        only the writer's own segment can have put a forgotten copy back in the index."""
        with self._records_lock:
            records = list(self._records.items())
        for (digest, pack, offset), name in records:
            if any((loc.pack, loc.offset) == (pack, offset) for loc in self.index.locations(digest)):
                self.backend.delete(name)
                with self._records_lock:
                    self._records.pop((digest, pack, offset), None)
                log.info("the copy of chunk %s quarantined as %s was written again: record removed", digest, name)

    # -- presence -------------------------------------------------------------------

    def missing(self, digests: Iterable[str], work: Executor | None = None) -> list[str]:
        """The digests neither the index nor the legacy `chunks/` objects hold."""
        unknown = self._unknown(dict.fromkeys(digests))
        names = [object_name("chunks", d) for d in unknown]
        present = list(work.map(self.backend.exists, names)) if work and len(names) > 2 else \
            [self.backend.exists(n) for n in names]
        return [d for d, ok in zip(unknown, present, strict=True) if not ok]

    # -- reading --------------------------------------------------------------------

    def read(self, digests: list[str], blob: str, work: Executor | None = None) -> dict[str, bytes]:
        """The verified plain bytes of every chunk in `digests` (of blob `blob`, for messages):
        packed ones by coalesced reads on `work`, the rest from `chunks/`. StoreCorrupted if a
        chunk is damaged everywhere (quarantined) or missing."""
        unknown = set(self._unknown(digests))
        packed = [d for d in dict.fromkeys(digests) if d not in unknown]
        out: dict[str, bytes] = {}
        if packed:
            try:
                out = read_chunks(self.backend, self.index, packed, executor=work)
            except (PackDamaged, NotFound):
                out = self._read_each(packed, blob)
        for d in unknown:
            out[d] = self._legacy(d, blob)
        return out

    def _read_each(self, digests: list[str], blob: str) -> dict[str, bytes]:
        """Every chunk on its own (after a coalesced read failed): all damaged copies among them
        are quarantined before the first error is raised, so one recompute re-packs them all."""
        out: dict[str, bytes] = {}
        failed: StoreCorrupted | None = None
        for digest in digests:
            try:
                out[digest] = self._read_alone(digest, blob)
            except StoreCorrupted as e:
                failed = failed or e
        if failed is not None:
            raise failed
        return out

    def _read_alone(self, digest: str, blob: str) -> bytes:
        """One chunk, copy by copy; a damaged copy is quarantined, a vanished pack forgotten.
        When no known copy is good, the index is refreshed once: a repack may have moved the
        chunk, or another writer packed it anew."""
        problems = []
        for attempt in range(2):
            if attempt:
                self.refresh()
            for loc in self.index.locations(digest):  # forgotten copies are not tried twice
                try:
                    return self._read_copy(digest, loc)
                except NotFound:
                    self.index.forget(digest, loc.pack, loc.offset)
                except _BadCopy as e:
                    problems.append(self._quarantine(digest, loc, e.reason, e.seen))
        if problems:
            raise StoreCorrupted(f"chunk {digest} of blob {blob or '?'} is damaged: {'; '.join(problems)}",
                                 "the result will be recomputed; run `memoplane verify` to check the rest")
        return self._legacy(digest, blob)

    def _read_copy(self, digest: str, loc: Location) -> bytes:
        """A chunk from one copy, verified (else _BadCopy). Bytes that came from a node-local
        cache are dropped there and re-read from the remote once before the copy counts as
        damaged, and damaged bytes are never left in that cache."""
        name = object_name("packs", loc.pack)
        drop = getattr(self.backend, "drop_cached_range", None)
        stored = read_range(self.backend, name, loc.offset, loc.length)
        try:
            return _verified(digest, stored, loc)
        except PackDamaged as e:
            if drop is None or not drop(name, loc.offset, loc.length):
                raise _BadCopy(str(e), stored) from None
            log.warning("%s: the cached copy was damaged (%s); re-reading it from the remote", name, e)
        stored = read_range(self.backend, name, loc.offset, loc.length)
        try:
            return _verified(digest, stored, loc)
        except PackDamaged as e:
            drop(name, loc.offset, loc.length)
            raise _BadCopy(str(e), stored) from None

    def _quarantine(self, digest: str, loc: Location, reason: str, seen: bytes) -> str:
        """Record a damaged copy (with the bytes read) and stop using it; returns the problem."""
        record = _record_name(digest, loc)
        self.backend.put(record, seen)
        self.index.forget(digest, loc.pack, loc.offset)
        with self._records_lock:
            self._records[(digest, loc.pack, loc.offset)] = record
        label = location_label(loc)
        log.warning("quarantined the copy of chunk %s at %s as %s: %s", digest, label, record, reason)
        self._audit(label, record, reason)
        return f"{label}: {reason}; it was quarantined"

    # -- scrubbing (verify) ---------------------------------------------------------

    def scrub_checks(self) -> list[tuple[str, Callable[[], object]]]:
        """(label, check) for every chunk copy the index knows: a check reads and verifies the
        copy, quarantining it (StoreCorrupted) when damaged; NotFound when its pack is gone."""
        self.refresh()
        return [(location_label(loc), partial(self._scrub, digest, loc)) for digest, loc in self.index.entries()]

    def _scrub(self, digest: str, loc: Location) -> None:
        try:
            self._read_copy(digest, loc)
        except _BadCopy as e:
            raise StoreCorrupted(f"chunk {digest}: {self._quarantine(digest, loc, e.reason, e.seen)}",
                                 "the results that need it will be recomputed") from None
