"""Several processes writing overlapping content and refs at once never corrupt the store."""

from __future__ import annotations

import multiprocessing as mp
import random
from pathlib import Path

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store, StoredValue, b3

MiB = 1 << 20
WRITERS = 4
ROUNDS = 6


def content(i: int) -> bytes:
    """Overlapping content: a shared 2 MiB base plus a part unique to `i`."""
    base = random.Random(0).randbytes(2 * MiB)
    return base + random.Random(1000 + i).randbytes(200_000)


def writer(root: str, wid: int, durability: str) -> None:
    store = Store(FilesystemBackend(root, durability=durability))  # type: ignore[arg-type]
    for r in range(ROUNDS):
        i = (wid + r) % WRITERS  # every writer writes every content, in a different order
        key = b3(b"key-%d" % (r % 3))  # shared keys: last writer wins, each write must be whole
        out = store.put_bytes(content(i))
        m = ResultManifest(value=StoredValue("bytes", blob=out), stdout=store.put_bytes(b"log %d" % i),
                           stderr=store.put_bytes(b""),
                           provenance=Provenance(key, {}, b3(b"rt"), f"w{wid}", 0.0, 1.0, 1.0))
        store.commit(m)
    store.close()


def test_concurrent_writers_in_separate_processes(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=writer, args=(root, w, "flush" if w == 0 else "none")) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    store = Store(FilesystemBackend(root))
    report = store.verify()
    assert report.ok, report.damaged
    for i in range(WRITERS):
        assert store.get_bytes(b3(content(i))) == content(i)
    for r in range(3):
        hit = store.get_ref(b3(b"key-%d" % r), deep=True)
        assert hit is not None
        assert store.load_value(hit.result.value) in [content(i) for i in range(WRITERS)]
    assert not list((tmp_path / "store").rglob(".tmp-*"))  # no temp file left behind
    st = store.stats()
    assert st.entries == 3
    assert st.dedup_ratio > 1.0  # the shared base is stored once
    store.close()
