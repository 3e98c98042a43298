"""The overlay log: format, checksums, torn tails and atomic batches."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from memoplane.errors import StoreCorrupted
from memoplane.gmem.log import HEADER_SIZE, RECORD, LogHeader, OverlayLog, crc32_rows, parse

HDR = LogHeader(seq=1, dtype="float64", params_digest=b"\x07" * 32)


def batch(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(start, start + n, dtype=np.uint64)
    return a, a * np.uint64(3)


def written(path: Path, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    log = OverlayLog.create(path, HDR)
    batches = [batch(100 * i, n) for i, n in enumerate(sizes)]
    for a, b in batches:
        log.append(a, b)
    log.close()
    return batches


def test_vector_crc_is_zlib_crc32() -> None:
    rows = np.random.default_rng(0).integers(0, 256, size=(500, 20), dtype=np.uint8)
    for start in (0, 0xDEADBEEF):
        got = crc32_rows(rows, start)
        assert got.tolist() == [zlib.crc32(r.tobytes(), start) for r in rows]


def test_format_header_then_24_byte_records(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [3, 2])
    data = p.read_bytes()
    assert data[:8] == b"MPGMLOG1" and len(data) == HEADER_SIZE + 5 * 24
    recs = np.frombuffer(data[HEADER_SIZE:], dtype=RECORD)
    assert recs["left"].tolist() == [2, 1, 0, 1, 0]
    assert recs["crc"][0] == zlib.crc32(data[HEADER_SIZE : HEADER_SIZE + 20], HDR.crc)
    r = parse(data, "x")
    assert r.header == HDR and r.addrs.tolist() == [0, 1, 2, 100, 101] and r.dropped_records == 0


def test_every_torn_length_keeps_exactly_the_complete_batches(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [4, 3, 5])
    data = p.read_bytes()
    ends = [HEADER_SIZE + 24 * k for k in (0, 4, 7, 12)]
    for cut in range(HEADER_SIZE, len(data) + 1):
        p.write_bytes(data[:cut])
        log, r = OverlayLog.recover(p)
        log.close()
        keep = max(e for e in ends if e <= cut)
        assert r.valid_bytes == keep and p.stat().st_size == keep, cut
        assert r.addrs.size == (keep - HEADER_SIZE) // 24


def test_garbage_tail_and_bit_flips_are_detected(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [4, 3])
    data = bytearray(p.read_bytes())
    # A bit flip anywhere in the second batch drops that batch and only that batch.
    for off in range(HEADER_SIZE + 4 * 24, len(data), 5):
        bad = bytearray(data)
        bad[off] ^= 0x10
        r = parse(bytes(bad), "x")
        assert r.addrs.tolist() == [0, 1, 2, 3], off
    # Zero-filled blocks (a filesystem that extended the file but lost the data).
    r = parse(bytes(data) + b"\0" * 4096, "x")
    assert r.addrs.size == 7 and r.dropped_bytes == 4096


def test_recovered_log_appends_after_the_cut(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [2, 2])
    with open(p, "ab") as f:
        f.write(b"\x01" * 30)  # a torn partial record
    log, r = OverlayLog.recover(p)
    assert r.dropped_bytes == 30
    log.append(*batch(500, 2))
    log.close()
    assert parse(p.read_bytes(), "x").addrs.tolist() == [0, 1, 100, 101, 500, 501]


def test_header_damage_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [1])
    data = bytearray(p.read_bytes())
    for off in (0, 9, 20, 50):
        bad = bytearray(data)
        bad[off] ^= 1
        with pytest.raises(StoreCorrupted):
            parse(bytes(bad), "x")
    with pytest.raises(StoreCorrupted):
        parse(b"MPGM", "x")


def test_records_are_bound_to_their_log(tmp_path: Path) -> None:
    # Records copied from another log (another seq) fail their checksums.
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    written(a, [3])
    OverlayLog.create(b, LogHeader(seq=2, dtype="float64", params_digest=b"\x07" * 32)).close()
    with open(b, "ab") as f:
        f.write(a.read_bytes()[HEADER_SIZE:])
    assert parse(b.read_bytes(), "x").addrs.size == 0


def test_create_never_clobbers(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    written(p, [1])
    with pytest.raises(FileExistsError):
        OverlayLog.create(p, HDR)


def test_failed_append_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.log"
    log = OverlayLog.create(p, HDR)
    log.append(*batch(0, 2))
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        if len(data) > 24:
            real_write(fd, bytes(data[:30]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError):
        log.append(*batch(10, 3))
    monkeypatch.undo()
    log.append(*batch(20, 1))
    log.close()
    assert parse(p.read_bytes(), "x").addrs.tolist() == [0, 1, 20]
