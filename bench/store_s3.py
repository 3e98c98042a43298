"""Benchmark the store on MinIO (S3Backend) against the local filesystem store.

    python bench/store_s3.py [--quick] [--server minio|versitygw]

Uses the local control plane's MinIO, or with --server its other S3 server
(memoplane.testing.cluster.S3_SERVERS; results then go under store_s3_<server>): reuses a running one,
or starts it and stops it again at the end (only if this run started it). Works in its
own bucket, removed afterwards.

Data: 64 MiB (16 MiB with --quick) of word-like text (zstd ~3x), deterministic.
Metrics (MiB/s; each baseline is the filesystem store, durability "none", in $TMPDIR,
measured in the same run, interleaved; ratio = S3 / filesystem):
- s3_ingest: Store.put_bytes into an empty store (every chunk uploaded).
- s3_dedup_put: put_bytes of the same bytes again (a HEAD per chunk, nothing uploaded).
- s3_hit_read: get_ref + load_value of a result holding the blob (verified read).
- s3_cached_hit_read: the same through a warm node-local CachingBackend.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import best_seconds, emit, metric

from memoplane.cas import CachingBackend, FilesystemBackend, Provenance, ResultManifest, S3Backend, Store, StoredValue
from memoplane.cas.s3 import make_client
from memoplane.testing import cluster

MiB = 1 << 20
KEY = "b3:" + "5" * 64


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--server", choices=cluster.S3_SERVERS, default="minio")
    args = ap.parse_args()
    size = (16 if args.quick else 64) * MiB
    data = text(size)
    up = cluster.up(owner="bench")
    info = up.info
    client = make_client(info.env(args.server)["MEMOPLANE_S3_ENDPOINT"], info.s3_access_key, info.s3_secret_key)
    bucket = f"mp-bench-{secrets.token_hex(6)}"
    S3Backend(client, bucket).ensure_bucket()
    tmp = Path(tempfile.mkdtemp(prefix="memoplane-bench-s3-"))
    runs = iter(range(1000))
    try:
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
    finally:
        for obj in client.list_objects(bucket, recursive=True):
            if obj.object_name:
                client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)
        shutil.rmtree(tmp, ignore_errors=True)
        if not up.already_running:
            cluster.down()
    mib = size / MiB

    def rate(t: dict[str, float], name: str) -> float:
        return mib / t[name]

    fs_name = "filesystem store (durability none)"
    emit("store_s3" if args.server == "minio" else f"store_s3_{args.server}", {
        "s3_ingest": metric(rate(ingest, "s3"), "MiB/s", fs_name, rate(ingest, "fs")),
        "s3_dedup_put": metric(rate(dedup, "s3"), "MiB/s", fs_name, rate(dedup, "fs")),
        "s3_hit_read": metric(rate(read, "s3"), "MiB/s", fs_name, rate(read, "fs")),
        "s3_cached_hit_read": metric(rate(read, "cached"), "MiB/s", fs_name, rate(read, "fs")),
    })


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
