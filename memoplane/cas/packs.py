"""Pack files: many content-defined chunks per backend object, and the index that finds them.

Why: one object per ~24 KiB chunk costs a HEAD and a PUT per chunk on S3, and the object store
serves a few hundred requests a second whatever their size (issue 14). Chunks stay small for
deduplication; requests become large.

Layout (this module is the only code that knows it):
- `packs/<2 hex>/<64 hex>`: a pack, named by blake3 of its whole bytes. Body:
      chunk_1 ‖ … ‖ chunk_n ‖ trailer ‖ n (u32 LE) ‖ PACK_MAGIC
  each chunk in its stored form (chunking.encode_chunk: a flag byte, then zstd or raw bytes);
  the trailer holds n fixed records (chunk digest 32 B, offset u64, stored length u32, plain
  length u32), so a pack describes itself (as restic's and borg's do): an index can be rebuilt,
  and GC can repack, from packs alone. About PACK_TARGET bytes each: one PUT per pack.
- `index/<2 hex>/<64 hex>`: an index segment, named by blake3 of its bytes. Body:
      SEGMENT_MAGIC ‖ records (chunk digest 32 B, pack digest 32 B, offset u64, length u32, plain u32)
  sorted by chunk digest. A writer writes one segment per flush, covering every pack it sealed
  since the last one. PackIndex loads all segments (at start, then only new names on refresh)
  and answers in memory: deduplication costs no request.

Crash safety: a chunk is visible only once an index segment names its pack, and a writer writes
that segment only after the pack's PUT returned and `backend.flush()` made it durable. A writer
killed before or during a pack's PUT leaves at most a temp file (filesystem) or nothing (S3); one
killed between a pack and its segment leaves an unindexed pack that no reader sees (GC deletes it
after its grace period, or `index_pack` indexes it from its trailer). The Store (chunks.py)
flushes its writer before any digest leaves it (a ref, a blob handed to a caller), so nothing
names a chunk that the index cannot find after a crash.

Concurrent writers (threads or processes, one PackWriter each per process) never share a mutable
object: packs and segments are content-addressed, so every name is new or holds the same bytes.
Two writers that have not yet seen each other's segments may both pack a chunk; the index then
knows two locations (any is good: reads verify) and GC's repack drops the duplicate.

Reads: a chunk is a byte range of a pack (a ranged GET on S3, pread on a filesystem).
`read_chunks` plans all the chunks a read needs (plan_reads: sorted by pack and offset, neighbours
merged while gaps stay under MAX_GAP, spans under MAX_SPAN and bytes read under AMPLIFICATION times
the bytes wanted) and fetches the spans, concurrently on an executor; every chunk is verified.

Trust: whoever can write the store is not trusted. Every chunk read is verified: its stored bytes
decode, its plain length matches the index, blake3 of its plain bytes is its digest; otherwise
PackDamaged. A segment whose bytes do not hash to its name is skipped (`PackIndex.damaged`). A
forged segment can make a writer skip a chunk it should have written (the same reach as a forged
`chunks/` object today): the reader then finds the damage and the job recomputes.

GC (next; not built here). Mark live chunk digests from refs as today; per pack, live bytes from
the index. A pack whose chunks are all dead and a pack worth repacking (dead share above a
threshold) are handled in two passes at least a grace period apart (kopia's safety rules):
pass 1 writes a tombstone segment naming the condemned packs, which loaded indexes treat as
absent for deduplication (so a writer re-packs a chunk it needs instead of reusing a condemned
copy); live chunks of a condemned pack are re-packed first, in a new pack and segment. Pass 2,
after longer than the writers' index refresh interval plus the longest write, re-marks, deletes
the condemned packs and replaces their segments by a consolidated one (which also bounds the
number of segments loaded at start). Readers holding an older index fall back to the other
locations of a chunk and then to an index refresh.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from ..errors import NotFound
from .backend import Backend
from .chunking import ChunkDecodeError, decode_chunk
from .digests import PREFIX, b3, digest_of_name, object_name

log = logging.getLogger("memoplane.cas")

PACK_TARGET = 16 << 20  # a pack is sealed once its chunks reach this many bytes
MAX_GAP = 1 << 20  # unwanted bytes a coalesced read may span between two wanted chunks
MAX_SPAN = 8 << 20  # bytes per coalesced read: several MiB, so a few requests run concurrently
AMPLIFICATION = 1.25  # bytes read / bytes wanted, at most, for every coalesced read
PACK_MAGIC = b"MPPACK01"
SEGMENT_MAGIC = b"MPIDX001"
PACKS, INDEX = "packs/", "index/"
_TRAILER = struct.Struct("<32sQII")  # chunk digest, offset, stored length, plain length
_RECORD = struct.Struct("<32s32sQII")  # chunk digest, pack digest, offset, stored length, plain length
_COUNT = struct.Struct("<I")


class PackDamaged(ValueError):
    """Bytes read from a pack or an index segment do not match what names them."""


@dataclass(frozen=True)
class Location:
    """Where a chunk's stored bytes are: a byte range of a pack."""

    pack: str  # the pack's digest
    offset: int
    length: int  # stored bytes (flag byte + zstd or raw)
    plain: int  # bytes after decoding


def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest[len(PREFIX):])


def _digest(raw: bytes) -> str:
    return PREFIX + raw.hex()


# -- the pack format ---------------------------------------------------------------


def build_pack(chunks: Iterable[tuple[str, bytes, int]]) -> tuple[bytes, list[tuple[str, int, int, int]]]:
    """Pack bytes for (digest, stored bytes, plain length) chunks, and each chunk's
    (digest, offset, stored length, plain length)."""
    body = bytearray()
    entries: list[tuple[str, int, int, int]] = []
    for digest, stored, plain in chunks:
        entries.append((digest, len(body), len(stored), plain))
        body += stored
    for digest, offset, length, plain in entries:
        body += _TRAILER.pack(_raw(digest), offset, length, plain)
    body += _COUNT.pack(len(entries)) + PACK_MAGIC
    return bytes(body), entries


def parse_pack(data: bytes) -> list[tuple[str, int, int, int]]:
    """The trailer of a whole pack: (digest, offset, stored length, plain length) per chunk.
    Checks the framing only; the caller checks the pack's name (blake3 of `data`)."""
    tail = len(PACK_MAGIC) + _COUNT.size
    if len(data) < tail or not data.endswith(PACK_MAGIC):
        raise PackDamaged("the pack does not end with its magic")
    (n,) = _COUNT.unpack_from(data, len(data) - tail)
    start = len(data) - tail - n * _TRAILER.size
    if start < 0:
        raise PackDamaged("the pack's trailer is longer than the pack")
    entries = []
    for i in range(n):
        raw, offset, length, plain = _TRAILER.unpack_from(data, start + i * _TRAILER.size)
        if offset + length > start:
            raise PackDamaged("a trailer entry points past the pack's chunks")
        entries.append((_digest(raw), offset, length, plain))
    return entries


def verified_chunk(digest: str, stored: bytes, plain_length: int) -> bytes:
    """The plain bytes of a chunk read from a pack, or PackDamaged."""
    try:
        plain = decode_chunk(stored)
    except ChunkDecodeError as e:
        raise PackDamaged(f"chunk {digest}: {e}") from None
    if len(plain) != plain_length or b3(plain) != digest:
        raise PackDamaged(f"chunk {digest}: its content does not hash to its address")
    return plain


# -- index segments ----------------------------------------------------------------


def build_segment(records: Iterable[tuple[str, Location]]) -> bytes:
    body = [SEGMENT_MAGIC]
    for digest, loc in sorted(records, key=lambda r: r[0]):
        body.append(_RECORD.pack(_raw(digest), _raw(loc.pack), loc.offset, loc.length, loc.plain))
    return b"".join(body)


def parse_segment(data: bytes) -> Iterator[tuple[str, Location]]:
    if not data.startswith(SEGMENT_MAGIC) or (len(data) - len(SEGMENT_MAGIC)) % _RECORD.size:
        raise PackDamaged("the index segment is not framed as one")
    for raw, pack, offset, length, plain in _RECORD.iter_unpack(memoryview(data)[len(SEGMENT_MAGIC):]):
        yield _digest(raw), Location(_digest(pack), offset, length, plain)


class PackIndex:
    """Every chunk location named by the store's index segments, in memory. Thread-safe."""

    def __init__(self) -> None:
        self._where: dict[str, list[Location]] = {}
        self._segments: set[str] = set()  # names loaded (or found damaged)
        self.damaged: list[str] = []  # segment names whose bytes do not hash to their name
        self._lock = threading.Lock()

    def refresh(self, backend: Backend, executor: Executor | None = None) -> int:
        """Load the segments not loaded yet (fetched concurrently on `executor` if given: a cold
        start on an object store reads every segment); returns how many were loaded."""
        names = [info.name for info in backend.list(INDEX) if info.name not in self._segments]
        fetch = partial(_fetch_segment, backend)
        loaded = 0
        for name, data in zip(names, executor.map(fetch, names) if executor else map(fetch, names), strict=True):
            if data is None:  # replaced by a consolidated segment meanwhile (GC, later)
                continue
            try:
                if b3(data) != digest_of_name(name):
                    raise PackDamaged("its bytes do not hash to its name")
                self._add(name, parse_segment(data))
                loaded += 1
            except PackDamaged as e:
                log.warning("index segment %s is damaged (%s); its chunks are treated as absent", name, e)
                with self._lock:
                    self._segments.add(name)
                    self.damaged.append(name)
        return loaded

    def _add(self, segment: str, records: Iterable[tuple[str, Location]]) -> None:
        parsed = list(records)  # parse fully first: a damaged segment adds nothing
        with self._lock:
            for digest, loc in parsed:
                locations = self._where.setdefault(digest, [])
                if loc not in locations:
                    locations.append(loc)
            self._segments.add(segment)

    def forget(self, digest: str, pack: str, offset: int) -> bool:
        """Stop answering with the copy of `digest` at (`pack`, `offset`) (found damaged: the
        store quarantined it), so deduplication no longer counts on it. True if it was known."""
        with self._lock:
            locations = self._where.get(digest, [])
            kept = [loc for loc in locations if (loc.pack, loc.offset) != (pack, offset)]
            if len(kept) == len(locations):
                return False
            if kept:
                self._where[digest] = kept
            else:
                del self._where[digest]
            return True

    def entries(self) -> list[tuple[str, Location]]:
        """Every (chunk digest, location) known, sorted by pack and offset (a scrub's order)."""
        with self._lock:
            found = [(d, loc) for d, locations in self._where.items() for loc in locations]
        return sorted(found, key=lambda r: (r[1].pack, r[1].offset))

    def locations(self, digest: str) -> list[Location]:
        with self._lock:
            return list(self._where.get(digest, ()))

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._where

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)


def _fetch_segment(backend: Backend, name: str) -> bytes | None:
    try:
        return backend.get(name)
    except NotFound:
        return None


# -- writing -------------------------------------------------------------------------


class PackWriter:
    """Appends chunks to an open pack; `flush()` makes everything added so far visible.

    `add` is a chunking.ChunkPut, so an Ingest writes through it. Thread-safe. A pack
    is PUT when it reaches `target` bytes (under the lock: simple, and one pack is in flight per
    writer; an upload thread is a later step)."""

    def __init__(self, backend: Backend, index: PackIndex, *, target: int = PACK_TARGET) -> None:
        self.backend = backend
        self.index = index
        self.target = target
        self._lock = threading.Lock()
        self._open: dict[str, tuple[bytes, int]] = {}  # digest -> (stored bytes, plain length)
        self._open_bytes = 0
        self._unindexed: dict[str, Location] = {}  # in packs already PUT, not yet in a segment

    def add(self, digest: str, encode: Callable[[], bytes], plain_length: int) -> bool:
        """Queue a chunk unless the index or this writer has it; True if queued. `encode`
        (chunking.encode_chunk of the plain bytes) is called only for a new chunk."""
        if self._known(digest):
            return False
        stored = encode()
        with self._lock:
            if digest in self._open or digest in self._unindexed:
                return False  # another thread queued it meanwhile
            self._open[digest] = (stored, plain_length)
            self._open_bytes += len(stored)
            if self._open_bytes >= self.target:
                self._seal()
        return True

    def _known(self, digest: str) -> bool:
        if digest in self.index:
            return True
        with self._lock:
            return digest in self._open or digest in self._unindexed

    def _seal(self) -> None:
        """PUT the open pack (lock held). Its chunks stay invisible until flush()."""
        if not self._open:
            return
        data, entries = build_pack((d, stored, plain) for d, (stored, plain) in self._open.items())
        pack = b3(data)
        # put, not put_if_absent: one PUT, and a same-named pack left damaged is healed.
        self.backend.put(object_name("packs", pack), data)
        for digest, offset, length, plain in entries:
            self._unindexed[digest] = Location(pack, offset, length, plain)
        self._open.clear()
        self._open_bytes = 0

    def flush(self) -> None:
        """Seal the open pack, make the packs durable, then write their index segment."""
        with self._lock:
            self._seal()
            if not self._unindexed:
                return
            self.backend.flush()  # the segment must never outlive the packs it names
            records = list(self._unindexed.items())
            segment = build_segment(records)
            name = object_name("index", b3(segment))
            self.backend.put(name, segment)
            self.backend.flush()
            self.index._add(name, records)
            self._unindexed.clear()


def index_pack(backend: Backend, index: PackIndex, name: str) -> int:
    """Write an index segment for pack `name` from its own trailer (a pack left unindexed by a
    writer killed before its segment; GC's repack reads packs the same way). The pack must hash
    to its name and every chunk must verify; else PackDamaged and nothing is written. Returns
    how many chunks the segment names."""
    data = backend.get(name)
    pack = digest_of_name(name)
    if b3(data) != pack:
        raise PackDamaged(f"pack {name}: its bytes do not hash to its name")
    records = []
    for digest, offset, length, plain in parse_pack(data):
        verified_chunk(digest, data[offset:offset + length], plain)
        records.append((digest, Location(pack, offset, length, plain)))
    segment = build_segment(records)
    segment_name = object_name("index", b3(segment))
    backend.flush()
    backend.put_if_absent(segment_name, segment)
    backend.flush()
    index._add(segment_name, records)
    return len(records)


# -- reading -------------------------------------------------------------------------


def read_range(backend: Backend, name: str, offset: int, length: int) -> bytes:
    """`length` bytes of object `name` from `offset`: a ranged read where the backend has
    one (`get_range`), else the whole object sliced."""
    ranged = getattr(backend, "get_range", None)
    if ranged is not None:
        data: bytes = ranged(name, offset, length)
        return data
    return backend.get(name)[offset:offset + length]


def read_chunk(backend: Backend, index: PackIndex, digest: str) -> bytes:
    """A chunk's plain bytes, verified. Tries every known location; NotFound if the index
    knows none, PackDamaged if every location was damaged or missing."""
    locations = index.locations(digest)
    if not locations:
        raise NotFound(f"chunk {digest} is in no pack the index knows")
    problems = []
    for loc in locations:
        try:
            stored = read_range(backend, object_name("packs", loc.pack), loc.offset, loc.length)
            if len(stored) != loc.length:
                raise PackDamaged(f"pack {loc.pack} is shorter than its index says")
            return verified_chunk(digest, stored, loc.plain)
        except (PackDamaged, NotFound) as e:
            problems.append(str(e))
    raise PackDamaged("; ".join(problems))


@dataclass(frozen=True)
class Span:
    """One ranged read of a pack covering several wanted chunks."""

    pack: str
    offset: int
    length: int
    chunks: tuple[tuple[str, Location], ...]  # (digest, where) of the chunks inside it

    def wanted(self) -> int:
        return sum(loc.length for _, loc in self.chunks)


def plan_reads(wanted: Iterable[tuple[str, Location]], *, max_gap: int = MAX_GAP, max_span: int = MAX_SPAN,
               amplification: float = AMPLIFICATION) -> list[Span]:
    """Coalesce chunk locations into spans: sorted by (pack, offset), neighbours merged while
    the gap is at most `max_gap`, the span at most `max_span` bytes (or one chunk) and the bytes
    read at most `amplification` times the bytes wanted, so no plan reads more than that."""
    spans: list[Span] = []
    current: list[tuple[str, Location]] = []
    end = useful = 0  # of `current`: where it ends, and the wanted bytes in it
    for digest, loc in sorted(set(wanted), key=lambda r: (r[1].pack, r[1].offset, r[0])):
        if current:
            first = current[0][1]
            length = max(end, loc.offset + loc.length) - first.offset
            if (loc.pack != first.pack or loc.offset - end > max_gap or length > max_span
                    or length > amplification * (useful + loc.length)):
                spans.append(Span(first.pack, first.offset, end - first.offset, tuple(current)))
                current, end, useful = [], 0, 0
        current.append((digest, loc))
        end, useful = max(end, loc.offset + loc.length), useful + loc.length
    if current:
        first = current[0][1]
        spans.append(Span(first.pack, first.offset, end - first.offset, tuple(current)))
    return spans


def read_chunks(backend: Backend, index: PackIndex, digests: Iterable[str], *,
                executor: Executor | None = None) -> dict[str, bytes]:
    """The plain bytes of every chunk in `digests`, each verified, fetched by coalesced ranged
    reads (on `executor` if given, concurrently). A chunk whose span was damaged or missing is
    re-read alone from its other locations (read_chunk), so one bad copy costs one chunk's
    fallback, not the read. NotFound if the index does not know a chunk."""
    wanted = []
    for digest in dict.fromkeys(digests):
        locations = index.locations(digest)
        if not locations:
            raise NotFound(f"chunk {digest} is in no pack the index knows")
        wanted.append((digest, locations[0]))
    spans = plan_reads(wanted)
    results = executor.map(partial(_read_span, backend), spans) if executor else map(partial(_read_span, backend), spans)
    out: dict[str, bytes] = {}
    for found in results:
        out.update(found)
    for digest, _ in wanted:
        if digest not in out:
            out[digest] = read_chunk(backend, index, digest)
    return out


def _read_span(backend: Backend, span: Span) -> dict[str, bytes]:
    """The verified chunks of one span; damaged or missing ones are left out."""
    try:
        data = read_range(backend, object_name("packs", span.pack), span.offset, span.length)
    except NotFound:
        return {}
    out = {}
    for digest, loc in span.chunks:
        stored = data[loc.offset - span.offset:loc.offset - span.offset + loc.length]
        try:
            if len(stored) == loc.length:
                out[digest] = verified_chunk(digest, stored, loc.plain)
        except PackDamaged as e:
            log.warning("%s; re-reading it from its other locations", e)
    return out
