"""Damage is detected and quarantined, signatures are enforced, gc and evict keep live data."""

from __future__ import annotations

import base64
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import packed_copy

from memoplane.canonical import canonical_json
from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store, b3
from memoplane.cas.chunks import location_label
from memoplane.cas.digests import object_name, ref_name
from memoplane.cas.records import seal
from memoplane.errors import NotFound, StoreCorrupted

MiB = 1 << 20


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Store:
    s = Store(FilesystemBackend(root, durability="none"))
    yield s
    s.close()


def commit(store: Store, name: bytes, out: bytes) -> tuple[str, ResultManifest]:
    key = b3(name)
    m = ResultManifest(value=store.put_value({"name": name.decode()}), stdout=store.put_bytes(out),
                       stderr=store.put_bytes(b"warn"),
                       provenance=Provenance(key, {}, b3(b"rt"), "n1", 1.0, 2.0, 1.0))
    store.commit(m)
    return key, m


def path_of(root: Path, name: str) -> Path:
    return root / name


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def quarantined(root: Path) -> list[str]:
    q = root / "quarantine"
    return sorted(p.name for p in q.iterdir()) if q.exists() else []


# -- corruption ----------------------------------------------------------------------


def test_flipped_chunk_byte_is_never_served_and_is_quarantined(store: Store, root: Path) -> None:
    data = rand(1 * MiB, 1)
    ref = store.put_bytes(data)
    victim = store.blob_manifest(ref.digest).chunks[3][0]
    pack, loc = packed_copy(store, root, victim)
    flip(pack, loc.offset + 100)
    with pytest.raises(StoreCorrupted, match="does not hash to its address"):
        store.get_bytes(ref.digest)
    assert victim not in store.chunks.index  # the damaged copy is not used again ...
    assert any(victim[3:] in q and loc.pack[3:] in q for q in quarantined(root))  # ... and is on record
    with pytest.raises(StoreCorrupted, match="missing"):  # still never served
        store.get_bytes(ref.digest)
    with Store(FilesystemBackend(root, durability="none")) as other:  # another process reads the record
        with pytest.raises(StoreCorrupted, match="missing"):
            other.get_bytes(ref.digest)
    store.put_bytes(data)  # writing the content again heals the store
    assert store.get_bytes(ref.digest) == data
    with Store(FilesystemBackend(root, durability="none")) as other:
        assert other.get_bytes(ref.digest) == data


def test_a_pack_rewritten_under_its_name_heals_its_quarantined_copy(store: Store, root: Path) -> None:
    data = rand(3_000, 7)  # one chunk, alone in its pack
    ref = store.put_bytes(data)
    (chunk, _), = store.blob_manifest(ref.digest).chunks
    pack, loc = packed_copy(store, root, chunk)
    good = pack.read_bytes()
    flip(pack, loc.offset + 10)
    with pytest.raises(StoreCorrupted):
        store.get_bytes(ref.digest)
    with Store(FilesystemBackend(root, durability="none")) as fresh:
        fresh.put_bytes(data)  # packs the same chunks again: the same pack name, the right bytes
        assert pack.read_bytes() == good
    with Store(FilesystemBackend(root, durability="none")) as later:
        assert later.get_bytes(ref.digest) == data and later.verify().ok


def test_damaged_zstd_chunk_is_caught(store: Store, root: Path) -> None:
    ref = store.put_bytes(b"compressible " * 10_000)
    chunk = store.blob_manifest(ref.digest).chunks[0][0]
    pack, loc = packed_copy(store, root, chunk)
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length - 7:loc.offset + loc.length] = bytes(7)  # a torn write
    pack.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted, match="zstd frame is damaged"):
        store.get_bytes(ref.digest)
    assert chunk not in store.chunks.index


def test_truncated_manifest_is_caught(store: Store, root: Path) -> None:
    key, m = commit(store, b"job", rand(200_000, 4))  # too big to be carried inline by the result
    p = path_of(root, object_name("blobs", m.stdout.digest))
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(StoreCorrupted, match="checksum"):
        store.get_bytes(m.stdout.digest)
    assert store.get_ref(key) is None  # the ref is not served ...
    assert not store.backend.exists(ref_name(key))  # ... and is quarantined


def test_missing_chunk_means_the_ref_is_not_served(store: Store, root: Path) -> None:
    key, _ = commit(store, b"job", rand(300_000, 2))
    for segment in (root / "index").rglob("*"):  # no index names the chunks any more
        if segment.is_file():
            segment.unlink()
    with Store(FilesystemBackend(root, durability="none")) as other:
        assert other.get_ref(key) is None
        assert not other.backend.exists(ref_name(key))


def test_a_vanished_pack_is_never_served_and_then_its_ref_is_not(store: Store, root: Path) -> None:
    key, m = commit(store, b"job", rand(300_000, 2))
    pack, _ = packed_copy(store, root, store.blob_manifest(m.stdout.digest).chunks[-1][0])
    os.unlink(pack)  # not through GC: the index still names it
    hit = store.get_ref(key)
    assert hit is not None
    with pytest.raises(StoreCorrupted, match="missing"):
        store.get_bytes(hit.result.stdout.digest)
    assert store.get_ref(key) is None
    assert not store.backend.exists(ref_name(key))


def test_small_results_are_inlined_and_read_without_blobs(root: Path) -> None:
    with Store(FilesystemBackend(root, durability="none")) as writer:
        key, _ = commit(writer, b"job", b"a small output")
    for kind in ("blobs", "packs", "index"):  # only the result manifest can serve the hit now
        for p in (root / kind).rglob("*"):
            if p.is_file():
                p.unlink()
    with Store(FilesystemBackend(root, durability="none")) as reader:
        hit = reader.get_ref(key)
        assert hit is not None and reader.get_bytes(hit.result.stdout.digest) == b"a small output"
        assert reader.get_bytes(hit.result.stderr.digest) == b"warn"


def test_a_forged_inline_copy_is_never_served(root: Path) -> None:
    with Store(FilesystemBackend(root, durability="none")) as writer:
        key, m = commit(writer, b"job", b"a small output")
    digest = m.digest
    body = {**m.to_dict(), "inline": {m.stdout.digest: base64.b64encode(b"forged output!").decode()}}
    path_of(root, object_name("results", digest)).write_bytes(seal(body))  # same address: inline is no part of it
    with Store(FilesystemBackend(root, durability="none")) as reader:
        with pytest.raises(StoreCorrupted, match="inline copy"):
            reader.get_result(digest)
        assert reader.get_ref(key) is None


def test_tampered_result_manifest_does_not_match_its_address(store: Store, root: Path) -> None:
    key, m = commit(store, b"job", b"out")
    digest = store.read_ref(key)
    assert digest is not None
    forged = replace(m, value=store.put_value({"name": "evil"}))
    path_of(root, object_name("results", digest)).write_bytes(seal(forged.to_dict()))
    with pytest.raises(StoreCorrupted, match="address"):
        store.get_result(digest)
    assert store.get_ref(key) is None


def test_verify_reports_damage_and_is_clean_otherwise(store: Store, root: Path) -> None:
    _key, m = commit(store, b"job", rand(500_000, 3))
    assert store.verify().ok
    chunk = store.blob_manifest(m.stdout.digest).chunks[0][0]
    pack, loc = packed_copy(store, root, chunk)
    flip(pack, loc.offset + 50)
    report = store.verify()
    assert not report.ok
    names = {d.name for d in report.damaged}
    assert location_label(loc) in names
    assert object_name("blobs", m.stdout.digest) in names  # the blob that needs the chunk
    assert report.to_dict()["ok"] is False


def test_ref_to_a_missing_result_is_damage(store: Store, root: Path) -> None:
    key, _ = commit(store, b"job", b"x")
    digest = store.read_ref(key)
    assert digest is not None
    os.unlink(path_of(root, object_name("results", digest)))
    assert any(d.name == ref_name(key) for d in store.verify().damaged)


def test_crafted_tree_cannot_escape(store: Store, root: Path, tmp_path: Path) -> None:
    blob = store.put_bytes(b"payload")
    body = {"v": 1, "entries": {"../escape": {"digest": blob.digest, "size": 7, "exec": False}}}
    digest = b3(canonical_json(body))
    store.backend.put(object_name("trees", digest), seal(body))
    with pytest.raises(StoreCorrupted, match=r"tree entry '\.\./escape' has an empty, '\.' or '\.\.' component"):
        store.materialize(digest, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


# -- gc and evict ---------------------------------------------------------------------------


def age(root: Path, seconds: float) -> None:
    """Make every object look `seconds` old."""
    t = time.time() - seconds
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (t, t))


def test_gc_keeps_live_data_and_removes_unreferenced_past_grace(store: Store, root: Path) -> None:
    key, m = commit(store, b"live", rand(400_000, 4))
    orphan = store.put_bytes(rand(400_000, 5))
    age(root, 7200)
    young = store.put_bytes(rand(400_000, 6))  # an in-flight write: no ref yet
    report = store.gc(grace_seconds=3600)
    assert report.deleted > 0 and report.kept_young > 0
    with pytest.raises(NotFound):
        store.get_bytes(orphan.digest)
    assert store.get_bytes(young.digest) == rand(400_000, 6)
    hit = store.get_ref(key, deep=True)
    assert hit is not None and store.get_bytes(m.stdout.digest) == rand(400_000, 4)
    assert store.verify().ok


def test_dedup_against_an_old_orphan_protects_it_from_gc(store: Store, root: Path) -> None:
    data = rand(300_000, 7)
    store.put_bytes(data)
    age(root, 7200)
    store.put_bytes(data)  # refreshes the old chunks' mtime
    assert store.gc(grace_seconds=3600).deleted == 0
    assert store.get_bytes(b3(data)) == data


def test_evict_by_age_then_gc(store: Store, root: Path) -> None:
    old_key, old = commit(store, b"old", rand(200_000, 8))
    age(root, 10_000)
    new_key, _ = commit(store, b"new", rand(200_000, 9))
    report = store.evict(max_age=5000)
    assert report.evicted == [old_key] and report.remaining == 1
    assert store.get_ref(old_key) is None and store.get_ref(new_key) is not None
    store.gc(grace_seconds=3600)
    with pytest.raises(NotFound):
        store.get_bytes(old.stdout.digest)


def test_evict_by_size_drops_oldest_first(store: Store, root: Path) -> None:
    keys = []
    for i in range(4):
        keys.append(commit(store, b"k%d" % i, rand(300_000, 10 + i))[0])
        t = time.time() - 1000 * (4 - i)  # earlier commits are older
        os.utime(path_of(root, ref_name(keys[-1])), (t, t))
    before = store.evict(max_bytes=10 ** 12)
    assert before.evicted == []
    limit = int(before.live_bytes_before * 0.6)  # each ref holds ~1/4 of the bytes, plus shared blobs
    report = store.evict(max_bytes=limit)
    assert report.evicted == keys[:2]
    assert report.live_bytes_after <= limit
    assert [store.get_ref(k) is not None for k in keys] == [False, False, True, True]


def test_concurrent_reader_sees_no_temp_files(store: Store, root: Path) -> None:
    (root / "chunks" / "ab").mkdir(parents=True, exist_ok=True)
    stale = root / "chunks" / "ab" / ".tmp-1-2-3"
    stale.write_bytes(b"partial")
    assert all(".tmp-" not in i.name for i in store.backend.list(""))
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.gc(grace_seconds=3600).temp_removed == 1 and not stale.exists()


@pytest.mark.parametrize("durability", ["flush", "always"])
def test_durable_policies_round_trip(tmp_path: Path, durability: str) -> None:
    backend = FilesystemBackend(tmp_path / durability, durability=durability)  # type: ignore[arg-type]
    s = Store(backend)
    key, m = commit(s, b"job", rand(2 * MiB, 20))  # > FSYNC_MAX chunk files: flush takes the syncfs path
    assert backend._pending == []  # flushed before the ref was written
    hit = s.get_ref(key, deep=True)
    assert hit is not None and s.get_bytes(m.stdout.digest) == rand(2 * MiB, 20)
    s.close()


def test_a_long_lived_writer_packs_a_chunk_anew_once_another_reader_quarantined_it(store: Store, root: Path) -> None:
    data = rand(300_000, 8)
    ref = store.put_bytes(data)  # the writer (an agent) has its index loaded from here on
    chunk = store.blob_manifest(ref.digest).chunks[1][0]
    pack, loc = packed_copy(store, root, chunk)
    flip(pack, loc.offset + 5)
    with Store(FilesystemBackend(root, durability="none")) as reader:  # the operator finds the damage
        with pytest.raises(StoreCorrupted, match="quarantined"):
            reader.get_bytes(ref.digest)
        store.put_bytes(data)  # the job recomputed on the writer: the damaged copy is not deduplicated against
        assert reader.get_bytes(ref.digest) == data  # a refresh finds the new copy
    with Store(FilesystemBackend(root, durability="none")) as fresh:
        assert fresh.get_bytes(ref.digest) == data and fresh.verify().ok
