"""The overlay's append-only log: a header, then fixed-size checksummed records.

File layout (little-endian):
    header, 64 bytes: magic "MPGMLOG1", format u16, dtype code u8, flags u8,
        reserved u32, seq u64 (the segment's number), params digest (32 bytes,
        blake3 of the GMem's canonical parameters), crc32 of the preceding bytes,
        4 bytes padding.
    record, 24 bytes: addr u64, value bits u64, left u32, crc u32.
`left` counts the records still to come in the record's batch, so a batch ends with
left == 0. `crc` is CRC-32 (zlib's) of the record's first 20 bytes, started from the
header's crc, which binds each record to its log.

Durability: `append` writes one batch with one write() and, with sync="batch" (the
default), fsyncs before returning; sync="none" leaves flushing to the OS.
Replay keeps the longest prefix of valid records that ends on a batch boundary: a
torn or partly written final batch is dropped whole (batches are atomic) and the file
is truncated there, so nothing acknowledged before it is lost.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError, StoreCorrupted
from .mixer import U64Array

MAGIC = b"MPGMLOG1"
FORMAT = 1
HEADER = struct.Struct("<8sHBBIQ32s")
HEADER_SIZE = 64
RECORD = np.dtype([("addr", "<u8"), ("bits", "<u8"), ("left", "<u4"), ("crc", "<u4")])
DTYPE_CODES = {"float32": 1, "float64": 2, "uint64": 3}
Sync = Literal["batch", "none"]


@functools.cache
def _position_tables(length: int) -> tuple[np.ndarray, int]:
    """CRC-32 is affine over GF(2): for messages of a fixed length,
    crc(m) = crc(0^length) ^ XOR_j T_j[m_j], with T_j[v] the contribution of byte
    value v at position j. Lookups per byte are then independent (no carried state)."""
    zero = zlib.crc32(bytes(length))
    basis = np.zeros((length, 8), dtype=np.uint32)  # T_j[1 << b]; the rest by linearity
    msg = bytearray(length)
    for j in range(length):
        for b in range(8):
            msg[j] = 1 << b
            basis[j, b] = zlib.crc32(msg) ^ zero
        msg[j] = 0
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
    tables = np.bitwise_xor.reduce(np.where(bits[None], basis[:, None, :], np.uint32(0)), axis=2)
    return tables, zero


def crc32_rows(rows: np.ndarray, start: int) -> np.ndarray:
    """zlib.crc32(row, start) for every row of a (n, k) uint8 array, vectorized."""
    length = rows.shape[1]
    tables, _ = _position_tables(length)
    # Only the all-zero message's crc depends on the start value.
    c = np.full(rows.shape[0], zlib.crc32(bytes(length), start), dtype=np.uint32)
    for j in range(length):
        np.bitwise_xor(c, tables[j].take(rows[:, j]), out=c)
    return c


def _record_crcs(recs: np.ndarray, start: int) -> np.ndarray:
    rows = recs.view(np.uint8).reshape(recs.shape[0], RECORD.itemsize)[:, :20]
    return crc32_rows(rows, start)


@dataclass(frozen=True)
class LogHeader:
    seq: int
    dtype: str
    params_digest: bytes  # 32 bytes

    def encode(self) -> bytes:
        head = HEADER.pack(MAGIC, FORMAT, DTYPE_CODES[self.dtype], 0, 0, self.seq, self.params_digest)
        return head + struct.pack("<I", zlib.crc32(head)) + b"\0" * (HEADER_SIZE - HEADER.size - 4)

    @property
    def crc(self) -> int:
        return zlib.crc32(self.encode()[: HEADER.size])

    @classmethod
    def decode(cls, data: bytes, where: str) -> LogHeader:
        if len(data) < HEADER_SIZE or data[:8] != MAGIC:
            raise StoreCorrupted(f"{where}: not a gmem overlay log (bad magic)", "restore it or delete it")
        _magic, fmt, code, _flags, _res, seq, digest = HEADER.unpack_from(data)
        (crc,) = struct.unpack_from("<I", data, HEADER.size)
        if crc != zlib.crc32(data[: HEADER.size]):
            raise StoreCorrupted(f"{where}: log header checksum mismatch", "restore it or delete it")
        if fmt != FORMAT:
            raise StoreCorrupted(f"{where}: log format {fmt} is not {FORMAT}", "use a matching memoplane")
        names = {v: k for k, v in DTYPE_CODES.items()}
        if code not in names:
            raise StoreCorrupted(f"{where}: unknown dtype code {code}", "restore it or delete it")
        return cls(seq=seq, dtype=names[code], params_digest=digest)


def encode_records(addrs: U64Array, bits: U64Array, header_crc: int) -> bytes:
    """One batch as bytes: `left` counts down to 0 on the batch's last record."""
    n = addrs.shape[0]
    recs = np.empty(n, dtype=RECORD)
    recs["addr"], recs["bits"] = addrs, bits
    recs["left"] = np.arange(n - 1, -1, -1, dtype=np.uint32)
    recs["crc"] = _record_crcs(recs, header_crc)
    return recs.tobytes()


@dataclass(frozen=True)
class Replay:
    """What a log holds: the records of complete batches, and what was cut off."""

    header: LogHeader
    addrs: U64Array
    bits: U64Array
    valid_bytes: int  # header + kept records; the file is truncated to this
    dropped_records: int
    dropped_bytes: int


def parse(data: bytes, where: str) -> Replay:
    """Decode a log's bytes, keeping the valid prefix that ends on a batch boundary."""
    header = LogHeader.decode(data, where)
    body = memoryview(data)[HEADER_SIZE:]
    n = len(body) // RECORD.itemsize
    recs = np.frombuffer(body[: n * RECORD.itemsize], dtype=RECORD)
    bad = np.flatnonzero(_record_crcs(recs, header.crc) != recs["crc"])
    valid = int(bad[0]) if bad.size else n
    ends = np.flatnonzero(recs["left"][:valid] == 0)
    keep = int(ends[-1]) + 1 if ends.size else 0
    kept = recs[:keep]
    return Replay(
        header=header,
        addrs=kept["addr"].copy(),
        bits=kept["bits"].copy(),
        valid_bytes=HEADER_SIZE + keep * RECORD.itemsize,
        dropped_records=n - keep,
        dropped_bytes=len(data) - HEADER_SIZE - keep * RECORD.itemsize,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OverlayLog:
    """The active log segment: a local file, appended and fsynced per batch."""

    def __init__(self, path: Path, header: LogHeader, fd: int, sync: Sync, size: int) -> None:
        self.path, self.header, self._fd, self.sync = path, header, fd, sync
        self._crc = header.crc
        self.size = size  # bytes known good; a failed append is cut back to this

    @property
    def records(self) -> int:
        return (self.size - HEADER_SIZE) // RECORD.itemsize

    @classmethod
    def create(cls, path: Path, header: LogHeader, sync: Sync = "batch") -> OverlayLog:
        """A new, empty segment; fails if the file exists (never clobber a log)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _write_all(fd, header.encode())
        os.fsync(fd)
        _fsync_dir(path)
        return cls(path, header, fd, sync, HEADER_SIZE)

    @classmethod
    def recover(cls, path: Path, sync: Sync = "batch") -> tuple[OverlayLog, Replay]:
        """Open an existing segment after a crash or restart, truncating a torn tail."""
        replay = parse(path.read_bytes(), str(path))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if replay.dropped_bytes:
            os.ftruncate(fd, replay.valid_bytes)
            os.fsync(fd)
        return cls(path, replay.header, fd, sync, replay.valid_bytes), replay

    def append(self, addrs: U64Array, bits: U64Array) -> None:
        """Append one batch; with sync="batch" it is on disk when this returns."""
        if addrs.shape[0] == 0:
            return
        if addrs.shape != bits.shape:
            raise InputError(f"{addrs.shape[0]} addresses but {bits.shape[0]} values", "pass one value each")
        data = encode_records(addrs, bits, self._crc)
        try:
            _write_all(self._fd, data)
            if self.sync == "batch":
                os.fsync(self._fd)
        except OSError:
            # A half-written batch would hide every later batch from replay: cut it off.
            os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
