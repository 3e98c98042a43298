"""Benchmark the store on MinIO (S3Backend) against the local filesystem store, and packs
against raw 4 MiB objects on the same server.

    python bench/store_s3.py [--quick] [--server minio|versitygw] [--only store|packs] [--route packs|store]

Uses the local control plane's MinIO, or with --server its other S3 server
(memoplane.testing.cluster.S3_SERVERS; results then go under store_s3_<server>): reuses a running one,
or starts it and stops it again at the end (only if this run started it). Works in its
own bucket, removed afterwards.

Data: 64 MiB (16 MiB with --quick) of word-like text, deterministic (its chunks are stored in 33 MiB:
zstd level 1 on ~24 KiB chunks). With --quick, requests per 64 MiB are 4x those of 16 MiB, so a
partly filled pack counts four times.
Metrics (MiB/s; each baseline is the filesystem store, durability "none", in $TMPDIR,
measured in the same run, interleaved; ratio = S3 / filesystem):
- s3_ingest: Store.put_bytes into an empty store (every chunk uploaded).
- s3_dedup_put: put_bytes of the same bytes again (a HEAD per chunk, nothing uploaded).
- s3_hit_read: get_ref + load_value of a result holding the blob (verified read).
- s3_cached_hit_read: the same through a warm node-local CachingBackend.

Pack section (issue 14; baseline: the same bytes as 4 MiB objects, PUT or GET concurrently on
the same WORKERS threads, interleaved with the measured path, same server, same run):
- pack_ingest: the data cut, hashed, compressed and written through a PackWriter into an empty
  prefix (packs PUT as they fill, then the index segment), against raw PUTs. Target >= 0.5x.
- pack_read: every chunk read back cold (no node cache; the index loaded beforehand, as a running
  Store has it) by packs.read_chunks on WORKERS threads, each chunk verified, against raw GETs.
  Target >= 0.5x.
- pack_gets / pack_puts: HTTP requests of one read / one ingest, per 64 MiB (counted on the
  client's connection pool, by method), against the raw objects' 16. Target <= 20 GETs, <= 8 PUTs.
The measured path is a Route (write, read); `--route store` points it at a Store (store_route), and
the metrics are then named store_* instead of pack_*.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import best_seconds, emit, metric

from memoplane.cas import CachingBackend, FilesystemBackend, Provenance, ResultManifest, S3Backend, Store, StoredValue
from memoplane.cas.chunking import ChunkParams, Pools, ingest_buffer
from memoplane.cas.packs import PackIndex, PackWriter, read_chunks
from memoplane.cas.s3 import make_client
from memoplane.testing import cluster

MiB = 1 << 20
KEY = "b3:" + "5" * 64
RAW_OBJECT = 4 * MiB  # the baseline's object size
WORKERS = 4  # threads doing the raw PUTs/GETs and the pack reads' spans


def text(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(5000)]
    out = bytearray()
    while len(out) < n:
        out += " ".join(rng.choices(vocab, k=1000)).encode() + b".\n"
    return bytes(out[:n])


def commit(store: Store, data: bytes) -> None:
    store.commit(ResultManifest(value=StoredValue("bytes", blob=store.put_bytes(data)),
                                stdout=store.put_bytes(b""), stderr=store.put_bytes(b""),
                                provenance=Provenance(KEY, {}, "b3:" + "2" * 64, "bench", 0.0, 1.0, 1.0)))


def hit_read(store: Store, size: int) -> None:
    hit = store.get_ref(KEY)
    assert hit is not None and len(store.load_value(hit.result.value)) == size


class Requests:
    """Every HTTP request a minio client sends, by method (wraps its connection pool)."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        send = client._http.urlopen

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.counts[method] += 1
            return send(method, url, *args, **kwargs)

        client._http.urlopen = counted

    def during(self, fn: Callable[[], object]) -> tuple[Counter[str], float]:
        """The requests `fn()` sent, and this process's CPU seconds meanwhile."""
        before, cpu = Counter(self.counts), time.process_time()
        fn()
        return self.counts - before, time.process_time() - cpu


@dataclass
class Route:
    """A measured write/read path: `write(data)` stores into a fresh place; `ready(written)`,
    not timed, returns what `read` needs to read it all back, verified (a running Store has its
    pack index loaded already, so loading it is not part of a read)."""

    write: Callable[[bytes], Any]
    read: Callable[[Any], int]  # returns the bytes read
    ready: Callable[[Any], Any] = lambda written: written


def pack_route(client: Any, bucket: str, work: ThreadPoolExecutor, pools: Pools) -> Route:
    runs = iter(range(1000))

    def write(data: bytes) -> tuple[S3Backend, list[str]]:
        backend = S3Backend(client, bucket, f"packs{next(runs)}")
        writer = PackWriter(backend, PackIndex())
        ingested = ingest_buffer(data, ChunkParams(), pools, writer.add)
        writer.flush()
        return backend, [d for d, _ in ingested.chunks]

    def ready(written: tuple[S3Backend, list[str]]) -> tuple[S3Backend, PackIndex, list[str]]:
        backend, digests = written
        index = PackIndex()
        index.refresh(backend)
        return backend, index, digests

    def read(handle: tuple[S3Backend, PackIndex, list[str]]) -> int:
        backend, index, digests = handle
        got = read_chunks(backend, index, digests, executor=work)
        return sum(len(got[d]) for d in digests)

    return Route(write, read, ready)


def store_route(client: Any, bucket: str) -> Route:
    """A Store's own write and read (put_bytes into a fresh Store, get_bytes from another one):
    `--route store`, the pack section's path once the Store writes packs."""
    runs = iter(range(1000))

    def write(data: bytes) -> tuple[str, str]:
        prefix = f"store{next(runs)}"
        return prefix, Store(S3Backend(client, bucket, prefix)).put_bytes(data).digest

    def ready(written: tuple[str, str]) -> tuple[Store, str]:
        prefix, digest = written
        return Store(S3Backend(client, bucket, prefix)), digest

    def read(handle: tuple[Store, str]) -> int:
        store, digest = handle
        return len(store.get_bytes(digest))

    return Route(write, read, ready)


def raw_route(client: Any, bucket: str, work: ThreadPoolExecutor) -> Route:
    """The baseline: the bytes as RAW_OBJECT-sized objects, PUT and GET on `work`."""
    runs = iter(range(1000))

    def write(data: bytes) -> tuple[S3Backend, int]:
        backend = S3Backend(client, bucket, f"raw{next(runs)}")
        parts = range(0, len(data), RAW_OBJECT)
        list(work.map(lambda at: backend.put(f"o/{at}", data[at:at + RAW_OBJECT]), parts))
        return backend, len(data)

    def read(handle: tuple[S3Backend, int]) -> int:
        backend, size = handle
        return sum(map(len, work.map(lambda at: backend.get(f"o/{at}"), range(0, size, RAW_OBJECT))))

    return Route(write, read)


def compare(measured: Route, raw: Route, data: bytes, requests: Requests, repeat: int,
            prefix: str = "pack") -> dict[str, dict[str, Any]]:
    """Ingest and read rates of `measured` against `raw` (interleaved, best of `repeat`), and the
    HTTP requests of one ingest and one read of each, per 64 MiB."""
    handles: dict[str, Any] = {}
    paths = {"measured": measured, "raw": raw}
    wrote = {name: requests.during(lambda p=path, n=name: handles.update({n: p.write(data)}))  # type: ignore[misc]
             for name, path in paths.items()}
    ingest = best_seconds({"measured": lambda: measured.write(data), "raw": lambda: raw.write(data)}, repeat)
    read_all = {name: partial(_read_all, path, path.ready(handles[name]), len(data)) for name, path in paths.items()}
    read = {name: requests.during(fn) for name, fn in read_all.items()}
    reads = best_seconds(dict(read_all), repeat)
    mib, per64 = len(data) / MiB, 64 * MiB / len(data)
    for what, done in (("ingest", wrote), ("read", read)):
        print(f"one {what}: measured {dict(done['measured'][0])}, client CPU {done['measured'][1] * 1e3:.0f} ms; "
              f"raw {dict(done['raw'][0])}, client CPU {done['raw'][1] * 1e3:.0f} ms", flush=True)
    raw_name = f"the same bytes as {RAW_OBJECT // MiB} MiB objects, {WORKERS} threads"
    return {
        f"{prefix}_ingest": metric(mib / ingest["measured"], "MiB/s", "raw PUT of " + raw_name, mib / ingest["raw"]),
        f"{prefix}_read": metric(mib / reads["measured"], "MiB/s", "raw GET of " + raw_name, mib / reads["raw"]),
        f"{prefix}_gets": metric(read["measured"][0]["GET"] * per64, "GETs per 64 MiB", "raw GET of " + raw_name,
                            read["raw"][0]["GET"] * per64),
        f"{prefix}_puts": metric(wrote["measured"][0]["PUT"] * per64, "PUTs per 64 MiB", "raw PUT of " + raw_name,
                            wrote["raw"][0]["PUT"] * per64),
    }


def _read_all(route: Route, handle: Any, size: int) -> None:
    got = route.read(handle)
    assert got == size, f"read {got} bytes of {size}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--server", choices=cluster.S3_SERVERS, default="minio")
    ap.add_argument("--only", choices=("store", "packs"), help="run one section")
    ap.add_argument("--route", choices=("packs", "store"), default="packs",
                    help="what the pack section measures: PackWriter + read_chunks, or a Store's put_bytes + get_bytes")
    args = ap.parse_args()
    size = (16 if args.quick else 64) * MiB
    data = text(size)
    up = cluster.up(owner="bench")
    info = up.info
    client = make_client(info.env(args.server)["MEMOPLANE_S3_ENDPOINT"], info.s3_access_key, info.s3_secret_key)
    requests = Requests(client)
    bucket = f"mp-bench-{secrets.token_hex(6)}"
    S3Backend(client, bucket).ensure_bucket()
    tmp = Path(tempfile.mkdtemp(prefix="memoplane-bench-s3-"))
    metrics: dict[str, dict[str, Any]] = {}
    try:
        if args.only != "packs":
            metrics.update(store_section(client, bucket, tmp, data))
        if args.only != "store":
            pools = Pools(os.cpu_count() or 2)  # as a Store's ingest threads
            with ThreadPoolExecutor(WORKERS) as work:
                try:
                    route = pack_route(client, bucket, work, pools) if args.route == "packs" else \
                        store_route(client, bucket)
                    metrics.update(compare(route, raw_route(client, bucket, work), data, requests,
                                           repeat=3 if args.quick else 5, prefix=args.route.rstrip("s")))
                finally:
                    pools.close()
    finally:
        for obj in client.list_objects(bucket, recursive=True):
            if obj.object_name:
                client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)
        shutil.rmtree(tmp, ignore_errors=True)
        if not up.already_running:
            cluster.down()
    emit("store_s3" if args.server == "minio" else f"store_s3_{args.server}", metrics)


def store_section(client: Any, bucket: str, tmp: Path, data: bytes) -> dict[str, dict[str, Any]]:
    """The Store on S3 against the filesystem store (the module docstring's first four metrics)."""
    size = len(data)
    runs = iter(range(1000))

    def fresh_s3() -> Store:
        return Store(S3Backend(client, bucket, f"ingest{next(runs)}"))

    def fresh_fs() -> Store:
        return Store(FilesystemBackend(tmp / f"fs{next(runs)}", durability="none"))

    ingest = best_seconds({"s3": lambda: fresh_s3().put_bytes(data),
                           "fs": lambda: fresh_fs().put_bytes(data)}, repeat=2)
    s3 = Store(S3Backend(client, bucket, "main"))
    fs = Store(FilesystemBackend(tmp / "main", durability="none"))
    commit(s3, data)
    commit(fs, data)
    dedup = best_seconds({"s3": lambda: s3.put_bytes(data), "fs": lambda: fs.put_bytes(data)}, repeat=2)
    cached = Store(CachingBackend(S3Backend(client, bucket, "main"),
                                  FilesystemBackend(tmp / "cache", durability="none")))
    hit_read(cached, size)  # warm the node-local cache
    read = best_seconds({"s3": lambda: hit_read(s3, size), "cached": lambda: hit_read(cached, size),
                         "fs": lambda: hit_read(fs, size)}, repeat=3)
    mib = size / MiB

    def rate(t: dict[str, float], name: str) -> float:
        return mib / t[name]

    fs_name = "filesystem store (durability none)"
    return {
        "s3_ingest": metric(rate(ingest, "s3"), "MiB/s", fs_name, rate(ingest, "fs")),
        "s3_dedup_put": metric(rate(dedup, "s3"), "MiB/s", fs_name, rate(dedup, "fs")),
        "s3_hit_read": metric(rate(read, "s3"), "MiB/s", fs_name, rate(read, "fs")),
        "s3_cached_hit_read": metric(rate(read, "cached"), "MiB/s", fs_name, rate(read, "fs")),
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
