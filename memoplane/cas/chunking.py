"""Cut content into chunks (FastCDC), hash them (blake3) and compress them (zstd).

Chunker choice: `pyfastcdc` (FastCDC 2020, Cython) over `fastcdc` (iscc). On a
64 MiB CSV here pyfastcdc cut at ~3.8 GB/s against ~2.2 GB/s for iscc's; it
releases the GIL while scanning, hands out memoryviews instead of copying every
chunk into a new bytes object, and does not import click at import time.

Chunk sizes (`python bench/store.py --sweep`, dedup over 10 versions of the
bench's 64 MiB table / 16 MiB text; cut speed relative to blake3 on one thread):
    avg/min/max 8K/8K/64K       9.80x / 8.66x
    16K/4K/64K (lib default)    9.69x / 8.00x   cut ~0.8x
    16K/16K/128K (chosen)       9.68x / 7.83x   cut ~1.6x
    32K/32K/256K                9.31x / 6.43x
    64K/64K/512K                8.75x / 4.96x
FastCDC never scans the first min_size bytes of a chunk (cut-point skipping), so
min=16K doubles cutting speed for ~1% less dedup; chunks average ~24 KiB. Bigger
chunks would mean fewer files but miss the text target (>= 6x); smaller ones
double the objects for little gain. max_size bounds runs without cut points.

Pipeline: the caller's thread cuts a window (8 MiB); batches of ~1 MiB of
chunks go to a thread pool that hashes, compresses (only chunks not yet in the
store) and writes them; one more thread hashes the whole content in order for
the blob digest. blake3, zstandard and file I/O release the GIL, so this scales
to the cores that are free.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

import blake3
import zstandard
from pyfastcdc import FastCDC

from .digests import PREFIX

RAW, ZSTD = b"\x00", b"\x01"  # first byte of every stored chunk
# Level 1: on ~24 KiB chunks of the bench's CSV it compressed 2.96x at ~340 MB/s
# against 3.04x at ~140 MB/s for level 3 (text: 2.79x vs 2.99x, 2.5x faster).
ZSTD_LEVEL = 1
WINDOW = 8 << 20  # bytes read and cut at a time when streaming
BATCH = 1 << 20  # chunk bytes per pool task: amortises task overhead, keeps both cores fed
MAX_INFLIGHT_WINDOWS = 3  # bounds a stream's memory to ~(3 + 1) windows
# No chunk we write decodes to more; a forged frame declaring more is refused before zstd
# allocates what it declares (whoever can write the store must not make readers allocate at will).
MAX_CHUNK_PLAIN = 16 << 20


@dataclass(frozen=True)
class ChunkParams:
    avg_size: int = 16384
    min_size: int = 16384
    max_size: int = 131072
    normalized: int = 1  # FastCDC's NC level; the library's default

    def chunker(self) -> FastCDC:
        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size,
                       normalized_chunking=self.normalized)  # type: ignore[arg-type]


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:  # a ZstdCompressor must not be shared between threads
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode_chunk(data: bytes | memoryview) -> bytes:
    """Stored form: a flag byte, then zstd frame or raw bytes when zstd saves < 1/32."""
    packed = _compressor().compress(data)
    if len(packed) + (len(data) >> 5) < len(data):
        return ZSTD + packed
    return RAW + bytes(data)


class ChunkDecodeError(ValueError):
    pass


def decode_chunk(stored: bytes | memoryview) -> bytes:
    flag, body = bytes(stored[:1]), memoryview(stored)[1:]
    if flag == RAW:
        return bytes(body)
    if flag == ZSTD:
        try:
            declared = zstandard.frame_content_size(body)
            if not 0 <= declared <= MAX_CHUNK_PLAIN:
                raise ChunkDecodeError(f"zstd frame declares {declared} bytes (ours declare 0..{MAX_CHUNK_PLAIN})")
            return _decompressor().decompress(body)
        except zstandard.ZstdError as e:
            raise ChunkDecodeError(f"zstd frame is damaged: {e}") from None
    raise ChunkDecodeError(f"unknown chunk flag {flag!r}")


# put(digest, encode, plain length) -> True if newly stored; `encode` is called only if needed.
# (The plain length is what a pack's index records: packs.PackWriter.add has this shape.)
ChunkPut = Callable[[str, Callable[[], bytes], int], bool]


@dataclass
class Ingested:
    digest: str  # blake3 of the whole content
    size: int
    chunks: list[tuple[str, int]]  # (digest, plain size) in order
    new_chunks: int = 0


@dataclass
class Pools:
    """Threads shared by all ingests of a store; created lazily per process."""

    workers: int
    _pid: int = field(default=-1, init=False)
    _work: ThreadPoolExecutor | None = field(default=None, init=False)
    _hash: ThreadPoolExecutor | None = field(default=None, init=False)

    def get(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._work is None or self._hash is None or self._pid != os.getpid():
            # after fork the parent's threads are gone; start fresh ones
            self._work = ThreadPoolExecutor(self.workers, thread_name_prefix="memoplane-chunk")
            self._hash = ThreadPoolExecutor(1, thread_name_prefix="memoplane-hash")
            self._pid = os.getpid()
        return self._work, self._hash

    def close(self) -> None:
        for p in (self._work, self._hash):
            if p is not None:
                p.shutdown(wait=True)
        self._work = self._hash = None


def _process(views: list[memoryview], put: ChunkPut | None) -> list[tuple[str, int, bool]]:
    out = []
    for v in views:
        d = PREFIX + blake3.blake3(v).hexdigest()
        new = put(d, partial(encode_chunk, v), len(v)) if put is not None else False
        out.append((d, len(v), new))
    return out


class Ingest:
    """Feed windows in order; `finish()` returns the blob's digest and chunk list."""

    def __init__(self, params: ChunkParams, pools: Pools, put: ChunkPut | None) -> None:
        self._cdc = params.chunker()
        self._work, self._hash = pools.get()
        self._put = put
        self._hasher = blake3.blake3()
        self._batches: list[Future[list[tuple[str, int, bool]]]] = []
        # per window: its whole-hash future and how many batches existed at its end
        self._windows: deque[tuple[Future[blake3.blake3], int]] = deque()
        self._size = 0

    def add(self, window: memoryview, final: bool, fresh: int = 0) -> int:
        """Cut `window`; returns how many bytes were consumed. Unless `final`,
        the last (possibly incomplete) chunk is left for the next window.
        `window[fresh:]` is new content (before it: the previous window's carry)."""
        # The whole-content hash runs first, on its own thread, in one call per
        # window: it overlaps cutting and chunk hashing, and releases the GIL once.
        hashed = self._hash.submit(self._hasher.update, window[fresh:])
        batch: list[memoryview] = []
        size = end = 0
        for c in self._cdc.cut_buf(window):  # batches go to the pool while cutting goes on
            if not final and c.offset + c.length == len(window):
                break  # the last chunk of a non-final window may continue in the next one
            batch.append(window[c.offset:c.offset + c.length])
            size += c.length
            end = c.offset + c.length
            if size >= BATCH:
                self._batches.append(self._work.submit(_process, batch, self._put))
                batch, size = [], 0
        if batch:
            self._batches.append(self._work.submit(_process, batch, self._put))
        self._windows.append((hashed, len(self._batches)))
        self._size += end
        while len(self._windows) > MAX_INFLIGHT_WINDOWS:  # backpressure bounds a stream's memory
            done, upto = self._windows.popleft()
            done.result()
            for f in self._batches[:upto]:
                f.result()
        return end

    def finish(self) -> Ingested:
        for hashed, _ in self._windows:
            hashed.result()
        chunks: list[tuple[str, int]] = []
        new = 0
        for f in self._batches:
            for d, n, wrote in f.result():
                chunks.append((d, n))
                new += wrote
        return Ingested(PREFIX + self._hasher.hexdigest(), self._size, chunks, new)


def ingest_buffer(data: bytes | bytearray | memoryview, params: ChunkParams, pools: Pools,
                  put: ChunkPut | None) -> Ingested:
    ing = Ingest(params, pools, put)
    ing.add(memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data), True)
    return ing.finish()


def ingest_stream(stream: BinaryIO, params: ChunkParams, pools: Pools,
                  put: ChunkPut | None) -> Ingested:
    """Ingest without holding the whole stream in memory."""
    map_big_buffers()
    ing = Ingest(params, pools, put)
    carry = b""
    while True:
        buf = memoryview(bytearray(len(carry) + WINDOW))
        buf[:len(carry)] = carry
        n = len(carry) + _read_full(stream, buf[len(carry):])
        final = n < len(buf)
        used = ing.add(buf[:n], final, fresh=len(carry))
        if final:
            return ing.finish()
        carry = bytes(buf[used:n])


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_mapped_big_buffers = False


def map_big_buffers() -> None:
    """Make glibc serve allocations of 1 MiB and more (stream windows, read buffers) from their own
    mappings, returned to the system when freed. By default glibc raises that threshold to the size
    of the last such block freed, so later 8 MiB windows come from the heap, where small long-lived
    objects allocated between them (chunk digests) keep it from shrinking. bench/stream.py, a 4 GiB
    input through `memoplane run`: the CLI's peak RSS was 338 MiB, 163 MiB with this (what still
    grows is the blob's chunk list, ~175k entries). Once per process; a libc without mallopt is
    left as it is."""
    global _mapped_big_buffers
    if _mapped_big_buffers:
        return
    _mapped_big_buffers = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _read_full(stream: BinaryIO, into: memoryview) -> int:
    got = 0
    readinto = getattr(stream, "readinto", None)
    while got < len(into):
        if readinto is not None:
            n = readinto(into[got:])
        else:
            b = stream.read(len(into) - got)
            n = len(b)
            into[got:got + n] = b
        if not n:
            break
        got += n
    return got

