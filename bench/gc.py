"""GC and stats over a store of N entries (default 100,000), and operator hit latency while GC runs.

A private stack (bench/_cluster.py) whose operator runs a retention pass every second and, once
the cache has spec.retention, sweeps its store back to back (MEMOPLANE_GC_SECONDS=0). N small
results (inline values) are committed straight into the namespace's store with parallel puts;
one job computes the key the hits are then served from.

Measured, same run:
- first indexing: from the end of the fill until the ResultCache's status counts every entry
  (the operator reads refs in bounded batches per pass; once per cache);
- a stats pass as the operator now makes it (merge the usage log, count from the index) against
  the full store scan it made every 30 s before (store.stats()), both timed here on the same store;
- one sweep (gc: mark from every ref, delete what nothing reaches), timed here;
- cache hit apply -> Ready p50/p99 while the operator's retention worker sweeps, against the same
  hits with it idle (blocks: idle, then sweeping);
- packs (a filesystem store in a temp dir, no stack): both repack passes (cas/repack.py) over packs
  a third of whose chunks are dead, against copying the same live chunks' stored bytes into new
  packs without verifying them (GET every pack, PUT the copies: the I/O a repack cannot avoid);
  and the pack bytes left against the live chunks' stored bytes.

    python bench/gc.py [-n ENTRIES] [--hits N] [--quick] [--packs-only]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Bench, Watcher, load_note, quantile_ms, ready, stack
from _common import emit, metric

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store, b3
from memoplane.cas.chunking import encode_chunk
from memoplane.cas.digests import object_name
from memoplane.cas.packs import PACKS, PackIndex, PackWriter, build_pack, parse_pack, read_chunks
from memoplane.cas.repack import Policy, collect
from memoplane.cluster import protocol as p
from memoplane.cluster import retention as rt
from memoplane.cluster.decide import default_cache
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.testing import processes

SOURCE = 'def main(rows):\n    return {"total": sum(rows)}\n'
RUNTIME = "b3:" + "11" * 32
ENV = {"MEMOPLANE_RETENTION_SECONDS": "1", "MEMOPLANE_GC_SECONDS": "0", "MEMOPLANE_GC_GRACE_SECONDS": "3600",
       "MEMOPLANE_REINDEX_SECONDS": "3600"}


def fill(store: Store, n: int, salt: str) -> float:
    """Commit n small results in parallel; seconds taken."""
    empty = store.put_bytes(b"")

    def put(i: int) -> None:
        key = b3(f"{salt}-{i}".encode())
        now = time.time()
        store.commit(ResultManifest(store.put_value({"i": i}), empty, empty,
                                    Provenance(key, {}, RUNTIME, "bench", now, now, 0.0)))

    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        for _ in pool.map(put, range(n)):
            pass
    return time.perf_counter() - started


def wait_entries(b: Bench, at_least: int, timeout: float) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        rc = b.kube.get(p.RESULTCACHES, b.ns, p.DEFAULT_RESULT_CACHE) or {}
        if int((rc.get("status") or {}).get("entries") or 0) >= at_least:
            return time.perf_counter() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cache counts {(rc.get('status') or {}).get('entries')} of {at_least} entries")
        time.sleep(0.5)


def hits(b: Bench, watcher: Watcher, salt: str, label: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        name = f"{label}-{i:04d}"
        t = time.perf_counter()
        b.create(b.ns, b.job(name, SOURCE, {"rows": [1, 2, 3]}, salt))
        out.append(watcher.wait(name) - t)
    return out


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sweeps_logged(b: Bench, word: str = "swept") -> int:
    """Sweeps the operator logged as finished ("swept") or started ("sweeping")."""
    proc = processes.load(b.cfg.directory, processes.OPERATOR)
    return 0 if proc is None else processes.log_tail(proc, 100_000).count(f" {word} ")


def wait_sweeping(b: Bench, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not sweeps_logged(b, "sweeping"):
        if time.monotonic() > deadline:
            raise TimeoutError("the operator did not start sweeping")
        time.sleep(0.2)


def packed_store(root: Path, mib: int) -> tuple[FilesystemBackend, set[str], int]:
    """A store of `mib` MiB of 24 KiB chunks in packs; two thirds of them live. Returns the
    backend, the live digests and their stored bytes."""
    backend = FilesystemBackend(root, durability="none")
    writer = PackWriter(backend, PackIndex())
    rng = random.Random(7)
    live: set[str] = set()
    live_bytes = 0
    for i in range(mib * 1024 // 24):
        plain = rng.randbytes(12 << 10) + bytes([i % 251]) * (12 << 10)
        digest = b3(plain)
        writer.add(digest, partial(encode_chunk, plain), len(plain))
        if i % 3:
            live.add(digest)
            live_bytes += len(encode_chunk(plain))
    writer.flush()
    return backend, live, live_bytes


def copy_live(backend: FilesystemBackend, live: set[str]) -> None:
    """The baseline: every pack read whole, its live chunks' stored bytes PUT as new packs."""
    for info in list(backend.list(PACKS)):
        data = backend.get(info.name)
        kept = [(d, data[o:o + n], plain) for d, o, n, plain in parse_pack(data) if d in live]
        pack, _ = build_pack(kept)
        backend.put_if_absent(object_name("packs", b3(pack)), pack)


def both_passes(backend: FilesystemBackend, live: set[str], policy: Policy) -> None:
    """Pass 1 then pass 2, a grace period apart on the injected clock."""
    later = time.time() + 2 * policy.grace
    for _ in range(2):
        collect(backend, live, policy, later)


def pack_section(quick: bool) -> dict[str, dict[str, Any]]:
    mib = 64 if quick else 256
    policy = Policy(grace=3600.0, min_pack_age=3600.0)
    repack_s = copy_s = float("inf")
    left = live_bytes = 0
    for _ in range(3):  # fastest of three, each on fresh stores: a repack changes its store
        with tempfile.TemporaryDirectory(prefix="mp-bench-packs-") as tmp:
            backend, live, live_bytes = packed_store(Path(tmp) / "gc", mib)
            baseline, _, _ = packed_store(Path(tmp) / "copy", mib)
            copy_s = min(copy_s, timed(partial(copy_live, baseline, live)))
            repack_s = min(repack_s, timed(partial(both_passes, backend, live, policy)))
            index = PackIndex()
            index.refresh(backend)
            assert len(read_chunks(backend, index, live)) == len(live)  # every live chunk, verified
            left = sum(i.size for i in backend.list(PACKS))
    print(f"packs: {mib} MiB of chunks (plain), a third dead: both repack passes {repack_s:.2f} s, copying the live "
          f"bytes {copy_s:.2f} s; {left} pack bytes left for {live_bytes} live stored bytes", flush=True)
    return {"repack_both_passes_seconds": metric(round(repack_s, 3), "s", "copy_live_bytes_seconds", round(copy_s, 3)),
            "pack_bytes_left": metric(left, "B", "live_stored_bytes", live_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=None, help="entries in the store (default 100,000)")
    parser.add_argument("--hits", type=int, default=None, help="hits timed each way (default 100)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--packs-only", action="store_true", help="only the packs section (no stack)")
    args = parser.parse_args()
    packs = pack_section(args.quick)
    if args.packs_only:
        emit("gc", packs)
        return
    n = args.n or (2_000 if args.quick else 100_000)
    n_hits = args.hits or (20 if args.quick else 100)
    salt = uuid.uuid4().hex[:12]
    with stack("gc", ENV) as b:
        stores = Stores(StoreSettings.from_env(b.cfg.env))
        store = stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(b.ns))
        fill_s = fill(store, n, salt)
        print(f"filled {n} entries in {fill_s:.1f} s", flush=True)
        assert b.kube.create(p.RESULTCACHES, b.ns, default_cache(b.ns)) is not None  # indexed from here
        served = Watcher(b.kube, b.ns, ready(cached=True))
        computed = Watcher(b.kube, b.ns, ready(cached=False))
        b.create(b.ns, b.job("warm", SOURCE, {"rows": [1, 2, 3]}, salt))
        computed.wait("warm", timeout=300)
        index_s = wait_entries(b, n + 1, timeout=max(600.0, n / 50))
        print(f"first indexing of {n + 1} entries by the operator: {index_s:.1f} s", flush=True)
        full_s = timed(store.stats)
        incremental_s = timed(lambda: rt.stats_fields(store.usage(), {}))
        sweep_s = timed(lambda: store.gc(3600.0))
        print(f"stats pass {incremental_s:.3f} s (full scan {full_s:.1f} s), one sweep {sweep_s:.1f} s", flush=True)
        hits(b, served, salt, "warmup", 3)
        idle = hits(b, served, salt, "idle", n_hits)
        b.kube.custom.patch_namespaced_custom_object(p.GROUP, p.VERSION, b.ns, p.RESULTCACHES,
                                                     p.DEFAULT_RESULT_CACHE, {"spec": {"retention": {"maxAge": "720h"}}})
        wait_sweeping(b)  # the worker sweeps from now on, again after every pass
        before = sweeps_logged(b)
        during = hits(b, served, salt, "gc", n_hits)
        sweeps = sweeps_logged(b) - before
        assert sweeps_logged(b, "sweeping") > 0
        for w in (served, computed):
            w.close()
        stores.close()
    metrics = {
        **packs,
        "stats_pass_seconds": metric(round(incremental_s, 4), "s", "full_store_scan_seconds", round(full_s, 3)),
        "sweep_seconds": metric(round(sweep_s, 3), "s", "full_store_scan_seconds", round(full_s, 3)),
        "first_index_seconds": metric(round(index_s, 2), "s", "full_store_scan_seconds", round(full_s, 3)),
    }
    for q in (50, 99):
        ours, base = quantile_ms(during, q), quantile_ms(idle, q)
        metrics[f"hit_during_gc_p{q}"] = metric(round(ours, 2), "ms", f"hit_gc_idle_p{q}", round(base, 2))
        print(f"p{q}: hit apply->Ready while sweeping {ours:7.1f} ms   idle {base:7.1f} ms   ratio {ours / base:5.2f}")
    print(f"{n} entries, {n_hits} hits each way (the second block began after the first sweep started; "
          f"{sweeps} sweeps finished during it), {load_note()}")
    emit("gc", metrics)


if __name__ == "__main__":
    main()
