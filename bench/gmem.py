"""Benchmark the generative-memory engine against side-by-side baselines.

    python bench/gmem.py [--quick]

Everything runs on one thread (numpy's element-wise ops do not use threads), so
values/s are per core. Timings are the best of 3 interleaved runs (bench/_common).
Metrics:
- contiguous_float64_vs_{philox,sfc64}: GMem.fetch_range into a preallocated array,
  vs numpy Generator(Philox|SFC64).random(out=...) of the same length. numpy's
  generators are sequential streams; ours is random-access (any address, any order).
  Target >= 150 M values/s.
- contiguous_uint64_vs_sfc64: words, vs SFC64's random_raw.
- contiguous_float64_vs_pure_python: the same mixer as a Python loop (mixer.mix_scalar).
- random_fetch_overlay_1m: fetch_many at random addresses (half of them written)
  through a 1 M-entry overlay, vs the plain numpy approach (generate, then
  np.searchsorted in the sorted overlay). Target >= 15 M/s.
- log_append_fsync_per_batch: OverlayLog.append of 64 Ki-record batches, fsync
  after every batch (durable on return: the default policy), vs a pure-Python
  encoder (struct + zlib.crc32 per record) with the same write + fsync per batch.
  Target >= 1 M records/s.
- log_replay_10m_seconds: reopening a name whose active log holds 10 M records at
  random addresses (1 M with --quick): read, verify every checksum, rebuild the
  overlay. Baseline: only reading the file's bytes (the I/O floor); ratio = how
  many times longer the full replay takes.
- log_replay_vs_pure_python: replay records/s vs a Python loop (struct.iter_unpack
  + zlib.crc32 per record + a dict), the latter on the first 1 M records.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import best_seconds, emit, metric

from memoplane.cas.fs import FilesystemBackend
from memoplane.gmem import (
    GMem,
    GMemParams,
    GMemStore,
    Overlay,
    mixer,
)
from memoplane.gmem.log import HEADER_SIZE, LogHeader, OverlayLog

M = 1e6


def contiguous(n: int, py_n: int) -> dict[str, dict[str, float | str]]:
    out_f, out_u = np.empty(n), np.empty(n, dtype=np.uint64)
    g, gu = GMem(1337, "float64"), GMem(1337, "uint64")
    philox, sfc = np.random.Generator(np.random.Philox(1)), np.random.Generator(np.random.SFC64(1))
    t = best_seconds({
        "gmem_f64": lambda: g.fetch_range(2**40, n, out=out_f),
        "philox_f64": lambda: philox.random(out=out_f),
        "sfc64_f64": lambda: sfc.random(out=out_f),
        "gmem_u64": lambda: gu.fetch_range(2**40, n, out=out_u),
        "sfc64_u64": lambda: sfc.bit_generator.random_raw(n),
    })  # fmt: skip
    key = mixer.derive_key(1337)

    def pure_python() -> list[float]:
        return [(mixer.mix_scalar(a, key) >> 11) * 2.0**-53 for a in range(py_n)]

    t_py = best_seconds({"py": pure_python}, repeat=1)["py"]
    rate = {k: n / v for k, v in t.items()}
    print(f"contiguous float64: gmem {rate['gmem_f64'] / M:.0f} M/s, philox {rate['philox_f64'] / M:.0f}, "
          f"sfc64 {rate['sfc64_f64'] / M:.0f}, pure python {py_n / t_py / M:.2f}; "
          f"uint64: gmem {rate['gmem_u64'] / M:.0f}, sfc64 raw {rate['sfc64_u64'] / M:.0f}")  # fmt: skip
    unit = "values/s"
    return {
        "contiguous_float64_vs_philox": metric(rate["gmem_f64"], unit, "numpy Philox random()", rate["philox_f64"]),
        "contiguous_float64_vs_sfc64": metric(rate["gmem_f64"], unit, "numpy SFC64 random()", rate["sfc64_f64"]),
        "contiguous_uint64_vs_sfc64": metric(rate["gmem_u64"], unit, "numpy SFC64 random_raw()", rate["sfc64_u64"]),
        "contiguous_float64_vs_pure_python": metric(
            rate["gmem_f64"], unit, "Python loop of the same mixer", py_n / t_py
        ),
    }


def random_overlay(entries: int, queries: int) -> dict[str, dict[str, float | str]]:
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64 - 1, size=entries, dtype=np.uint64, endpoint=True)
    g = GMem(7, "float64", overlay=Overlay.from_arrays(keys, rng.random(entries)))
    q = rng.integers(0, 2**64 - 1, size=queries, dtype=np.uint64, endpoint=True)
    q[::2] = keys[rng.integers(0, entries, size=(queries + 1) // 2)]
    skeys, svals = g.overlay.to_arrays()
    g.fetch_many(q[:10])  # builds the hash index once (lazily, on first random read)

    def searchsorted() -> np.ndarray:
        out = g.generated(q)
        i = np.searchsorted(skeys, q)
        i[i == skeys.size] = 0
        hit = np.flatnonzero(skeys[i] == q)
        out[hit] = svals[i[hit]]
        return out

    assert np.array_equal(g.fetch_many(q), searchsorted())
    t = best_seconds({"hash": lambda: g.fetch_many(q), "bsearch": searchsorted})
    rate, base = queries / t["hash"], queries / t["bsearch"]
    print(f"random fetch via {entries} overlay entries: {rate / M:.1f} M/s, searchsorted {base / M:.1f} M/s")
    return {"random_fetch_overlay_1m": metric(rate, "values/s", "generate + np.searchsorted", base)}


def _python_encode(addrs: list[int], bits: list[int], start: int) -> bytes:
    out = bytearray()
    n = len(addrs)
    for i, (a, b) in enumerate(zip(addrs, bits, strict=True)):
        rec = struct.pack("<QQI", a, b, n - 1 - i)
        out += rec + struct.pack("<I", zlib.crc32(rec, start))
    return bytes(out)


def log_append(tmp: Path, records: int, batch: int) -> dict[str, dict[str, float | str]]:
    rng = np.random.default_rng(9)
    addrs = rng.integers(0, 2**64 - 1, size=records, dtype=np.uint64, endpoint=True)
    bits = rng.integers(0, 2**64 - 1, size=records, dtype=np.uint64, endpoint=True)
    hdr = LogHeader(seq=1, dtype="float64", params_digest=b"\0" * 32)
    py_records = min(records, 4 * batch)
    la, lb = addrs[:py_records].tolist(), bits[:py_records].tolist()

    def ours() -> None:
        (tmp / "a.log").unlink(missing_ok=True)
        log = OverlayLog.create(tmp / "a.log", hdr, sync="batch")
        for s in range(0, records, batch):
            log.append(addrs[s : s + batch], bits[s : s + batch])
        log.close()

    def python() -> None:
        with open(tmp / "b.log", "wb") as f:
            f.write(hdr.encode())
            for s in range(0, py_records, batch):
                f.write(_python_encode(la[s : s + batch], lb[s : s + batch], hdr.crc))
                f.flush()
                os.fsync(f.fileno())

    t = best_seconds({"ours": ours, "python": python})
    assert (tmp / "b.log").read_bytes() == (tmp / "a.log").read_bytes()[: HEADER_SIZE + 24 * py_records]
    rate, base = records / t["ours"], py_records / t["python"]
    print(f"log append, fsync per {batch}-record batch: {rate / M:.2f} M records/s, pure python {base / M:.2f}")
    return {"log_append_fsync_per_batch": metric(rate, "records/s", "struct + zlib.crc32 per record", base)}


def log_replay(tmp: Path, records: int, py_records: int) -> dict[str, dict[str, float | str]]:
    backend = FilesystemBackend(tmp / "store", durability="none")
    store = GMemStore(backend, tmp / "local", sync="none", segment_records=records + 1)
    params = GMemParams(3, "float64")
    s, _ = store.open("replay", params)
    rng = np.random.default_rng(11)
    for start in range(0, records, 1 << 20):
        n = min(1 << 20, records - start)
        s.gmem.write_many(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True), rng.random(n))
    s.close()
    path = store.active_path("replay")
    os.sync()

    def replay() -> None:
        s2, rep = store.open("replay", params)
        assert rep.active_records == records
        len(s2.gmem.overlay)
        s2.close()

    def python() -> dict[int, int]:
        data = path.read_bytes()
        start = LogHeader.decode(data, "x").crc
        body = memoryview(data)[HEADER_SIZE : HEADER_SIZE + 24 * py_records]
        out: dict[int, int] = {}
        for i, (a, b, _left, crc) in enumerate(struct.iter_unpack("<QQII", body)):
            if zlib.crc32(body[24 * i : 24 * i + 20], start) != crc:
                break
            out[a] = b
        return out

    t = best_seconds({"replay": replay, "read": path.read_bytes, "python": python})
    print(f"replay {records} records: {t['replay']:.2f} s (reading the bytes alone {t['read']:.2f} s), "
          f"{records / t['replay'] / M:.2f} M records/s vs pure python {py_records / t['python'] / M:.2f}")  # fmt: skip
    name = f"log_replay_{records // 1_000_000}m_seconds"
    return {
        name: metric(t["replay"], "s", "read the log file only", t["read"]),
        "log_replay_vs_pure_python": metric(
            records / t["replay"], "records/s", "struct.iter_unpack + zlib.crc32 + dict", py_records / t["python"]
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (~20 s)")
    quick = ap.parse_args().quick
    t0 = time.perf_counter()
    print("single-threaded; best of 3 interleaved runs; numpy", np.__version__)
    metrics: dict[str, dict[str, float | str]] = {}
    metrics |= contiguous(n=(1 << 22) if quick else (1 << 25), py_n=20_000 if quick else 100_000)
    metrics |= random_overlay(entries=1 << 20, queries=(1 << 20) if quick else (1 << 23))
    with tempfile.TemporaryDirectory(prefix="gmem-bench-") as d:
        metrics |= log_append(Path(d), records=(1 << 20) if quick else (1 << 23), batch=1 << 16)
        metrics |= log_replay(Path(d), records=1_000_000 if quick else 10_000_000, py_records=1_000_000)
    print(f"# {time.perf_counter() - t0:.0f} s", flush=True)
    emit("gmem", metrics)  # the last line


if __name__ == "__main__":
    main()
