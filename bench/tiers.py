"""The cold tier's cost (memoplane.cas.tiers), side by side in one run on the filesystem backend:

- hot hit read: a 32 MiB blob read (verified) through a TieredBackend whose hot store holds it,
  against the same read from the same store without the tier: the tier's hit path adds an
  in-memory note per object (target ratio ~1.0);
- hit check: Store.get_ref (the result and the presence of every chunk), tiered against plain;
- cold read: the same blob after demotion, read through and re-warmed, against the hot read
  (what a first read of moved content costs: both tiers here are local directories, so this
  shows the tier's own overhead, not a slower medium's).

    python bench/tiers.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_seconds, emit, metric

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store, StoredValue
from memoplane.cas.tiers import TieredBackend, demote

KEY = "b3:" + "9" * 64
AFTER = 30 * 86400.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = (8 if args.quick else 32) << 20
    checks = 20 if args.quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        hot = FilesystemBackend(Path(tmp) / "hot", durability="none")
        cold = FilesystemBackend(Path(tmp) / "cold", durability="none")
        tiered = TieredBackend(hot, cold, after=AFTER)
        with Store(hot, workers=2) as writer:
            payload = random.Random(7).randbytes(size)
            value = StoredValue("bytes", blob=writer.put_bytes(payload))
            assert value.blob is not None
            digest = value.blob.digest
            empty = writer.put_bytes(b"")
            writer.commit(ResultManifest(value, empty, empty, Provenance(KEY, {}, KEY, "bench", 0.0, 1.0, 1.0)))
        plain_store, tiered_store = Store(hot, workers=2), Store(tiered, workers=2)   # readers alike but for the tier

        reads = best_seconds({"plain": lambda: plain_store.get_bytes(digest),
                              "tiered": lambda: tiered_store.get_bytes(digest)}, repeat=5)
        hits = best_seconds({"plain": lambda: [plain_store.get_ref(KEY) for _ in range(checks)],
                             "tiered": lambda: [tiered_store.get_ref(KEY) for _ in range(checks)]}, repeat=5)
        cold_best = float("inf")
        for _ in range(3):
            demote(tiered, now=time.time() + 2 * AFTER)   # untimed: everything moves
            started = time.perf_counter()
            tiered_store.get_bytes(digest)
            cold_best = min(cold_best, time.perf_counter() - started)
        mib = size / (1 << 20)
        print(f"hot read {mib:.0f} MiB: plain {mib / reads['plain']:.0f} MiB/s, tiered {mib / reads['tiered']:.0f} "
              f"MiB/s; get_ref x{checks}: plain {hits['plain'] * 1e3:.1f} ms, tiered {hits['tiered'] * 1e3:.1f} ms; "
              f"cold read-through {mib / cold_best:.0f} MiB/s")
        plain_store.close()
        tiered_store.close()
    emit("tiers", {
        "hot_read_mib_s": metric(mib / reads["tiered"], "MiB/s", "the same read without the tier",
                                 mib / reads["plain"]),
        "hit_check_ms": metric(hits["tiered"] * 1e3 / checks, "ms", "get_ref without the tier",
                               hits["plain"] * 1e3 / checks),
        "cold_read_mib_s": metric(mib / cold_best, "MiB/s", "the hot read through the tier", mib / reads["tiered"]),
    })


if __name__ == "__main__":
    main()
