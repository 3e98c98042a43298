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
- `tombstones/<2 hex>/<64 hex>`: a tombstone (GC, repack.py), named by blake3 of its bytes. Body:
      TOMBSTONE_MAGIC ‖ pack digests (32 B each), sorted
  A loaded tombstone makes its packs absent for deduplication and the last locations tried.
  PackIndex.refresh loads tombstones before segments, and GC deletes a condemned pack's
  segments before its tombstone: a refresh that still reads such a segment reads the tombstone
  too, so it never deduplicates against a pack being deleted.

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
Where a read's time goes (bench/store_s3.py, 64 MiB of text on this project's 2-core machine): the
client spends ~130 ms of CPU (a raw GET of the same bytes ~30 ms), 90-100 ms of it decompressing
and hashing, which every verified read must do; streaming spans, smaller spans and batched
decompression were tried and measured no faster, so spans are read whole.

Trust: whoever can write the store is not trusted. Every chunk read is verified: its stored bytes
decode, its plain length matches the index, blake3 of its plain bytes is its digest; otherwise
PackDamaged. A segment whose bytes do not hash to its name is skipped (`PackIndex.damaged`). A
forged segment can make a writer skip a chunk it should have written (the same reach as a forged
`chunks/` object today): the reader then finds the damage and the job recomputes.

GC: repack.py (two passes a grace period apart, tombstones). Writers must refresh their index
more often than that grace period minus their longest write. Readers holding an older index
fall back to the other locations of a chunk and then to one index refresh (_read_anywhere).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from ..errors import NotFound
from .backend import Backend
from .chunking import ChunkDecodeError, decode_chunk
from .digests import PREFIX, b3, digest_of_name, object_name

log = logging.getLogger("memoplane.cas")

PACK_TARGET = 16 << 20  # a pack is sealed once its chunks reach this many bytes
MAX_GAP = 1 << 20  # unwanted bytes a coalesced read may span between two wanted chunks
MAX_SPAN = 4 << 20  # bytes per coalesced read: a few MiB, so a few requests run concurrently; a span is
# held twice while it is decoded, per concurrent read (8 MiB: an agent reading a 200 MB input peaked ~20 MB higher)
AMPLIFICATION = 1.25  # bytes read / bytes wanted, at most, for every coalesced read
PACK_MAGIC = b"MPPACK01"
SEGMENT_MAGIC = b"MPIDX001"
UPLOADS_IN_FLIGHT = 2  # sealed packs a writer holds while they wait or upload (each about PACK_TARGET bytes)
TOMBSTONE_MAGIC = b"MPTOMB01"  # a tombstones/ object naming packs GC condemned (repack.py)
PACKS, INDEX, TOMBSTONES = "packs/", "index/", "tombstones/"
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
    parts: list[bytes] = []
    entries: list[tuple[str, int, int, int]] = []
    offset = 0
    for digest, stored, plain in chunks:
        entries.append((digest, offset, len(stored), plain))
        parts.append(stored)
        offset += len(stored)
    parts.append(pack_trailer(entries))
    return b"".join(parts), entries  # one copy of the chunks, however many


def pack_trailer(entries: Iterable[tuple[str, int, int, int]]) -> bytes:
    """What follows a pack's chunks: a record per (digest, offset, stored length, plain length), their count, the magic."""
    records = [_TRAILER.pack(_raw(digest), at, length, plain) for digest, at, length, plain in entries]
    return b"".join(records) + _COUNT.pack(len(records)) + PACK_MAGIC


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


def verified_chunk(digest: str, stored: bytes | memoryview, plain_length: int) -> bytes:
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


def build_tombstone(packs: Iterable[str]) -> bytes:
    """A tombstone condemning `packs` (digests): TOMBSTONE_MAGIC ‖ 32-byte pack digests, sorted."""
    return TOMBSTONE_MAGIC + b"".join(_raw(p) for p in sorted(set(packs)))


def parse_tombstone(data: bytes) -> frozenset[str]:
    if not data.startswith(TOMBSTONE_MAGIC) or (len(data) - len(TOMBSTONE_MAGIC)) % 32:
        raise PackDamaged("the tombstone is not framed as one")
    body = data[len(TOMBSTONE_MAGIC):]
    return frozenset(_digest(body[i:i + 32]) for i in range(0, len(body), 32))


@dataclass(frozen=True)
class Segment:
    """An index/ or tombstones/ object, parsed: chunk locations (a segment) or condemned packs."""

    records: tuple[tuple[str, Location], ...] = ()
    condemned: frozenset[str] = frozenset()


def load_segment(backend: Backend, name: str) -> Segment:
    """Index object or tombstone `name`, checked against its name; PackDamaged if it does not hash to it
    or is not framed as a segment or a tombstone; NotFound if it is gone."""
    data = backend.get(name)
    if b3(data) != digest_of_name(name):
        raise PackDamaged("its bytes do not hash to its name")
    if data.startswith(TOMBSTONE_MAGIC):
        return Segment(condemned=parse_tombstone(data))
    return Segment(records=tuple(parse_segment(data)))


class PackIndex:
    """Every chunk location named by the store's index segments, in memory. Thread-safe.

    A chunk only in packs that a tombstone condemned is absent for deduplication (writers pack it
    again), and a condemned location is the last one a read tries."""

    def __init__(self) -> None:
        self._where: dict[str, list[Location]] = {}
        self._condemned: set[str] = set()  # pack digests named by a loaded tombstone
        self._segments: set[str] = set()  # names loaded (or found damaged)
        self.damaged: list[str] = []  # segment names whose bytes do not hash to their name
        self._lock = threading.Lock()

    def refresh(self, backend: Backend, executor: Executor | None = None) -> int:
        """Load the tombstones, then the segments, not loaded yet (fetched concurrently on `executor`
        if given: a cold start on an object store reads every segment); returns how many were loaded.
        Tombstones first: a refresh racing GC's pass 2 that reads a segment about to be replaced
        must also know the packs it condemns (repack.py)."""
        loaded = 0
        for prefix in (TOMBSTONES, INDEX):
            names = [info.name for info in backend.list(prefix) if info.name not in self._segments]
            load = partial(_load_or_none, backend)
            for name, got in zip(names, executor.map(load, names) if executor else map(load, names), strict=True):
                if got is None:  # replaced by a consolidated segment meanwhile (GC)
                    continue
                if isinstance(got, PackDamaged):
                    log.warning("index segment %s is damaged (%s); its chunks are treated as absent", name, got)
                    with self._lock:
                        self._segments.add(name)
                        self.damaged.append(name)
                    continue
                self.add(name, got)
                loaded += 1
        return loaded

    def add(self, name: str, segment: Segment) -> None:
        """Add index object `name`, loaded and checked elsewhere (load_segment; GC reads them all)."""
        self._add(name, segment.records, segment.condemned)

    def _add(self, segment: str, records: Iterable[tuple[str, Location]], condemned: Iterable[str] = ()) -> None:
        parsed = list(records)  # parse fully first: a damaged segment adds nothing
        with self._lock:
            for digest, loc in parsed:
                locations = self._where.setdefault(digest, [])
                if loc not in locations:
                    locations.append(loc)
            self._condemned.update(condemned)
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
        """Where the chunk is, locations in condemned packs last."""
        with self._lock:
            return sorted(self._where.get(digest, ()), key=lambda loc: loc.pack in self._condemned)

    def __contains__(self, digest: object) -> bool:
        """Whether a writer may skip this chunk: a pack that no tombstone condemned holds it."""
        if not isinstance(digest, str):
            return False
        with self._lock:
            return any(loc.pack not in self._condemned for loc in self._where.get(digest, ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)


def _load_or_none(backend: Backend, name: str) -> Segment | PackDamaged | None:
    """load_segment for a pool: None if the object is gone, the damage as a value."""
    try:
        return load_segment(backend, name)
    except NotFound:
        return None
    except PackDamaged as e:
        return e


# -- writing -------------------------------------------------------------------------


class _OpenPack:
    """A pack being filled: its chunks' stored bytes back to back in one buffer, and where each is."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.entries: dict[str, tuple[int, int, int]] = {}  # digest -> (offset, stored length, plain length)

    def append(self, digest: str, stored: bytes | bytearray, plain_length: int) -> None:
        self.entries[digest] = (len(self.body), len(stored), plain_length)
        self.body += stored


class PackWriter:
    """Appends chunks to an open pack; `flush()` makes everything added so far visible.

    `add` is a chunking.ChunkPut, so an Ingest writes through it. Thread-safe. A pack is sealed
    when it reaches `target` bytes and handed to the writer's upload thread, which hashes and
    PUTs it while the ingest goes on filling the next one (a PUT under the lock stalled every
    ingest thread for its duration). At most UPLOADS_IN_FLIGHT sealed packs wait or upload: the
    sealer waits beyond that, which bounds memory. A failed upload puts its chunks back in the
    open pack (nothing added is ever dropped) and raises from the next `add` or `flush`.

    Memory: a pack's chunks are appended to one buffer as they come, and that buffer (its trailer
    appended) is what is PUT, so a writer holds about (UPLOADS_IN_FLIGHT + 1) * target bytes. (A
    pack kept as one bytes object per chunk and joined for its PUT held each pack twice, and its
    freed chunks stayed in the ingest threads' malloc arenas: the CLI storing a 300 MB output
    peaked near 190 MiB, issue 14.)"""

    def __init__(self, backend: Backend, index: PackIndex, *, target: int = PACK_TARGET) -> None:
        self.backend = backend
        self.index = index
        self.target = target
        self._lock = threading.Lock()
        self._open = _OpenPack()
        self._uploads: deque[tuple[_OpenPack, Future[list[tuple[str, Location]]]]] = deque()
        self._unindexed: dict[str, Location] = {}  # in packs already PUT, not yet in a segment
        self._uploader: ThreadPoolExecutor | None = None
        self._uploader_pid = -1

    def add(self, digest: str, encode: Callable[[], bytes], plain_length: int) -> bool:
        """Queue a chunk unless the index or this writer has it; True if queued. `encode`
        (chunking.encode_chunk of the plain bytes) is called only for a new chunk."""
        if self._known(digest):
            return False
        stored = encode()
        with self._lock:
            if self._holds(digest):
                return False  # another thread queued it meanwhile
            self._open.append(digest, stored, plain_length)
            if len(self._open.body) >= self.target:
                self._seal()
            self._collect(keep=UPLOADS_IN_FLIGHT)
        return True

    def _known(self, digest: str) -> bool:
        if digest in self.index:
            return True
        with self._lock:
            return self._holds(digest)

    def _holds(self, digest: str) -> bool:
        """Whether this writer has the chunk, open, uploading or unindexed (lock held)."""
        return (digest in self._open.entries or digest in self._unindexed
                or any(digest in pack.entries for pack, _ in self._uploads))

    def _seal(self) -> None:
        """Hand the open pack to the upload thread (lock held). Its chunks stay invisible until flush()."""
        if not self._open.entries:
            return
        uploader = self._upload_thread()  # first: in a forked child, it reopens the parent's uploads
        pack, self._open = self._open, _OpenPack()
        self._uploads.append((pack, uploader.submit(self._upload, pack)))

    def _upload(self, pack: _OpenPack) -> list[tuple[str, Location]]:
        """Finish, name and PUT one pack (on the upload thread); its chunks' locations."""
        entries = [(digest, offset, length, plain) for digest, (offset, length, plain) in pack.entries.items()]
        pack.body += pack_trailer(entries)  # in place: the pack's bytes are never copied
        name = b3(memoryview(pack.body))
        # put, not put_if_absent: one PUT, and a same-named pack left damaged is healed.
        self.backend.put(object_name("packs", name), pack.body)
        return [(digest, Location(name, offset, length, plain)) for digest, offset, length, plain in entries]

    def _collect(self, *, keep: int) -> None:
        """Move finished uploads' locations to the unindexed ones, oldest first, waiting while more
        than `keep` are pending (lock held). A failed upload's chunks go back to the open pack,
        then its error is raised."""
        self._check_fork()
        while self._uploads and (len(self._uploads) > keep or self._uploads[0][1].done()):
            pack, upload = self._uploads.popleft()
            try:
                self._unindexed.update(upload.result())
            except BaseException:
                self._reopen(pack)
                raise

    def _reopen(self, pack: _OpenPack) -> None:
        """Put chunks of an upload that did not happen back in the open pack (lock held)."""
        for digest, (offset, length, plain) in pack.entries.items():
            if digest not in self._open.entries:
                self._open.append(digest, pack.body[offset:offset + length], plain)

    def _upload_thread(self) -> ThreadPoolExecutor:
        """The writer's upload thread, started on first use (and anew in a forked child)."""
        self._check_fork()
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(1, thread_name_prefix="memoplane-pack-upload")
            self._uploader_pid = os.getpid()
        return self._uploader

    def _check_fork(self) -> None:
        """In a forked child the parent's upload thread is gone and its uploads never finish
        there: their chunks go back to the open pack, and a new thread starts on demand."""
        if self._uploader is not None and self._uploader_pid != os.getpid():
            while self._uploads:
                self._reopen(self._uploads.popleft()[0])
            self._uploader = None

    def flush(self) -> None:
        """Seal the open pack, wait for every upload, make the packs durable, then write their
        index segment."""
        with self._lock:
            self._check_fork()
            self._seal()
            self._collect(keep=0)
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
    """A chunk's plain bytes, verified. Tries every known location, then (GC may have repacked
    it since this index was loaded) refreshes the index and tries the new ones. NotFound if the
    index knows none, PackDamaged if every location was damaged or missing."""
    return _read_anywhere(backend, index, [digest])[digest]


def _read_anywhere(backend: Backend, index: PackIndex, digests: list[str]) -> dict[str, bytes]:
    """Each chunk from the first of its locations that verifies; for the chunks none served,
    one index refresh (for all of them) and their new locations."""
    out: dict[str, bytes] = {}
    tried: dict[str, list[Location]] = {}
    problems: dict[str, list[str]] = {}
    for refreshed in (False, True):
        if refreshed:
            index.refresh(backend)
        for digest in digests:
            if digest in out:
                continue
            seen = tried.setdefault(digest, [])
            fresh = [loc for loc in index.locations(digest) if loc not in seen]
            seen += fresh
            for loc in fresh:
                try:
                    out[digest] = _read_located(backend, digest, loc)
                    break
                except (PackDamaged, NotFound) as e:
                    problems.setdefault(digest, []).append(str(e))
        if len(out) == len(digests):
            return out
    lost = next(d for d in digests if d not in out)
    if lost not in problems:
        raise NotFound(f"chunk {lost} is in no pack the index knows")
    raise PackDamaged("; ".join(problems[lost]))


def _read_located(backend: Backend, digest: str, loc: Location) -> bytes:
    stored = read_range(backend, object_name("packs", loc.pack), loc.offset, loc.length)
    if len(stored) != loc.length:
        raise PackDamaged(f"pack {loc.pack} is shorter than its index says")
    return verified_chunk(digest, stored, loc.plain)


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
    reads (on `executor` if given, concurrently). A chunk whose span was damaged or missing (a
    pack GC deleted) is re-read alone from its other locations, then after one index refresh
    (_read_anywhere), so one bad copy costs one chunk's fallback, not the read. NotFound if the
    index does not know a chunk, even refreshed."""
    wanted = []
    for digest in dict.fromkeys(digests):
        locations = index.locations(digest) or _refreshed(backend, index, digest)
        wanted.append((digest, locations[0]))
    spans = plan_reads(wanted)
    results = executor.map(partial(_read_span, backend), spans) if executor else map(partial(_read_span, backend), spans)
    out: dict[str, bytes] = {}
    for found in results:
        out.update(found)
    failed = [digest for digest, _ in wanted if digest not in out]
    if failed:
        out.update(_read_anywhere(backend, index, failed))
    return out


def _refreshed(backend: Backend, index: PackIndex, digest: str) -> list[Location]:
    """The locations of a chunk this index did not know, after a refresh; NotFound if none."""
    index.refresh(backend)
    if locations := index.locations(digest):
        return locations
    raise NotFound(f"chunk {digest} is in no pack the index knows")


def _read_span(backend: Backend, span: Span) -> dict[str, bytes]:
    """The verified chunks of one span; damaged or missing ones are left out. Chunks are decoded
    from views of the span's bytes, not copies."""
    try:
        data = memoryview(read_range(backend, object_name("packs", span.pack), span.offset, span.length))
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
