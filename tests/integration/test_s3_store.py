"""The store over real S3 servers (S3Backend, CachingBackend, open_store("s3://...")): every test
runs against each of cluster.S3_SERVERS (MinIO and Versity's gateway), so "any S3" is tested.

Each test works in its own bucket with a random name and removes it afterwards: other
sessions may share the running control plane.
"""

from __future__ import annotations

import io
import os
import random
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import minio
import pytest

from memoplane.cas import (
    BlobRef,
    CachingBackend,
    FilesystemBackend,
    ObjectInfo,
    Provenance,
    ResultManifest,
    S3Backend,
    Store,
    StoredValue,
    StoreUnavailable,
    open_store,
    store_from_settings,
)
from memoplane.cas.digests import object_name
from memoplane.cas.s3 import make_client
from memoplane.errors import InputError, NotFound, StoreCorrupted
from memoplane.testing import cluster

MiB = 1 << 20


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def key(i: int) -> str:
    return "b3:" + f"{i:064x}"


@dataclass
class S3:
    client: minio.Minio
    bucket: str
    prefix: str
    env: dict[str, str]

    def backend(self, **kw: float) -> S3Backend:
        return S3Backend(self.client, self.bucket, self.prefix, **kw)

    def store(self, **kw: float) -> Store:
        return Store(self.backend(**kw), workers=4)

    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def keys(self, under: str = "") -> set[str]:
        return {o.object_name for o in self.client.list_objects(self.bucket, prefix=self.prefix + under,
                                                                recursive=True) if o.object_name}

    def raw(self, name: str) -> bytes:
        r = self.client.get_object(self.bucket, self.prefix + name)
        try:
            return bytes(r.read())
        finally:
            r.close()
            r.release_conn()

    def overwrite(self, name: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self.prefix + name, io.BytesIO(data), len(data))


@pytest.fixture(params=cluster.S3_SERVERS)
def s3(control_plane: cluster.ClusterInfo, request: pytest.FixtureRequest) -> Iterator[S3]:
    env = control_plane.env(request.param)
    client = make_client(env["MEMOPLANE_S3_ENDPOINT"], env["MEMOPLANE_S3_ACCESS_KEY"],
                         env["MEMOPLANE_S3_SECRET_KEY"])
    bucket = f"mp-test-{secrets.token_hex(6)}"
    backend = S3Backend(client, bucket, "team/")
    assert backend.ensure_bucket() and not backend.ensure_bucket()
    yield S3(client, bucket, "team/", env)
    for obj in client.list_objects(bucket, recursive=True):
        if obj.object_name:
            client.remove_object(bucket, obj.object_name)
    client.remove_bucket(bucket)


def prov(k: str) -> Provenance:
    return Provenance(k, {"x": "b3:" + "3" * 64}, "b3:" + "2" * 64, "node-a", 0.0, 1.0, 1.0)


def commit_bytes(store: Store, k: str, data: bytes, tree: BlobRef | None = None) -> str:
    return store.commit(ResultManifest(value=StoredValue("bytes", blob=store.put_bytes(data)),
                                       stdout=store.put_bytes(b"log " + k.encode()),
                                       stderr=store.put_bytes(b""), provenance=prov(k), output_tree=tree))


# -- the backend itself ------------------------------------------------------------------


def test_backend_protocol(s3: S3) -> None:
    b = s3.backend()
    assert b.describe() == f"s3://{s3.bucket}/team/"
    b.put("refs/" + "a" * 64, b"ref")
    assert b.get("refs/" + "a" * 64) == b"ref" and b.exists("refs/" + "a" * 64)
    assert b.put_if_absent("chunks/ab/" + "b" * 64, lambda: b"one")
    assert not b.put_if_absent("chunks/ab/" + "b" * 64, lambda: pytest.fail("compressed a deduplicated chunk"))
    assert [i.name for i in b.list("chunks/")] == ["chunks/ab/" + "b" * 64]  # relative to the prefix
    assert {i.name for i in b.list()} == {"refs/" + "a" * 64, "chunks/ab/" + "b" * 64}
    info = next(iter(b.list("refs/")))
    assert isinstance(info, ObjectInfo) and info.size == 3 and info.mtime > 0
    with pytest.raises(NotFound):
        b.get("chunks/cd/" + "c" * 64)
    assert not b.exists("chunks/cd/" + "c" * 64)
    b.delete("refs/" + "a" * 64)
    b.delete("refs/" + "a" * 64)  # idempotent
    assert not b.exists("refs/" + "a" * 64)
    b.flush()
    other = S3Backend(s3.client, s3.bucket, "elsewhere")
    assert list(other.list()) == []  # prefixes isolate stores in one bucket


def test_dedup_refreshes_age_only_when_old(s3: S3) -> None:
    name = "chunks/ab/" + "d" * 64
    young = s3.backend()
    young.put_if_absent(name, b"data")
    young.put_if_absent(name, b"data")
    meta = s3.client.stat_object(s3.bucket, s3.prefix + name).metadata
    assert meta is not None and "x-amz-meta-memoplane-touched" not in meta  # young: a HEAD only, no copy
    before = s3.client.stat_object(s3.bucket, s3.prefix + name).last_modified
    s3.backend(refresh_after=0).put_if_absent(name, b"data")  # "old" for this backend
    after = s3.client.stat_object(s3.bucket, s3.prefix + name)
    assert after.metadata is not None and "x-amz-meta-memoplane-touched" in after.metadata  # copied onto itself: LastModified is now
    assert after.last_modified is not None and before is not None and after.last_modified >= before
    assert s3.raw(name) == b"data"


def test_errors_name_endpoint_and_fix(s3: S3) -> None:
    with pytest.raises(StoreUnavailable, match=r"cannot reach the object store at http://127\.0\.0\.1:1 .*"
                                               r"MEMOPLANE_S3_ENDPOINT"):
        store_from_settings("http://127.0.0.1:1", "a", "b", "some-bucket")
    with pytest.raises(StoreUnavailable, match="refused the credentials"):
        store_from_settings(s3.env["MEMOPLANE_S3_ENDPOINT"], "nobody", "wrong-secret", s3.bucket)
    missing = store_from_settings(s3.env["MEMOPLANE_S3_ENDPOINT"], s3.env["MEMOPLANE_S3_ACCESS_KEY"],
                                  s3.env["MEMOPLANE_S3_SECRET_KEY"], f"{s3.bucket}-none", create_bucket=False)
    with pytest.raises(StoreUnavailable, match=r"does not exist.*ensure_bucket"):
        missing.put_bytes(b"x")
    with pytest.raises(InputError, match="bucket name"):
        S3Backend(s3.client, "X")


def test_open_store_from_environment(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MEMOPLANE_STORE", s3.url())
    store = open_store()
    assert store.describe() == s3.url()
    ref = store.put_bytes(b"hello")
    assert open_store(s3.url()).get_bytes(ref.digest) == b"hello"
    monkeypatch.setenv("MEMOPLANE_LOCAL_CACHE", str(tmp_path / "cache"))
    cached = open_store(s3.url())
    assert isinstance(cached.backend, CachingBackend) and cached.get_bytes(ref.digest) == b"hello"
    monkeypatch.delenv("MEMOPLANE_S3_ACCESS_KEY")
    with pytest.raises(InputError, match="MEMOPLANE_S3_ACCESS_KEY is not set"):
        open_store(s3.url())
    with pytest.raises(InputError, match="use s3://bucket/prefix"):
        open_store("http://127.0.0.1:9000/bucket")


# -- the store over S3 ----------------------------------------------------------------------


def test_round_trip(s3: S3, tmp_path: Path) -> None:
    store = s3.store()
    for data in (b"", b"x", rand(3 * MiB, 1)):
        assert store.get_bytes(store.put_bytes(data).digest) == data
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(rand(200_000, 2))
    (src / "sub" / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "sub" / "run.sh", 0o755)
    tree = store.put_tree(src)
    value = rand(1 * MiB, 3)
    digest = commit_bytes(store, key(1), value, tree)
    hit = Store(s3.backend()).get_ref(key(1), deep=True)  # a fresh client, as another node
    assert hit is not None and hit.digest == digest
    assert store.load_value(hit.result.value) == value
    store.materialize(tree.digest, tmp_path / "back")
    assert (tmp_path / "back" / "a.bin").read_bytes() == rand(200_000, 2)
    assert os.access(tmp_path / "back" / "sub" / "run.sh", os.X_OK)
    assert sorted(p.name for p in (tmp_path / "back").rglob("*")) == ["a.bin", "run.sh", "sub"]
    big = store.put_value({"rows": list(range(5000))})  # JSON above the inline limit: a blob
    assert big.blob is not None and store.load_value(big) == {"rows": list(range(5000))}
    assert store.get_ref(key(2)) is None
    store.delete_ref(key(1))
    assert store.get_ref(key(1)) is None
    assert store.verify().ok


def test_dedup_uploads_nothing_new(s3: S3) -> None:
    store = s3.store()
    data = rand(4 * MiB, 4)
    ref = store.put_bytes(data)
    before = s3.keys()
    assert len(store.blob_manifest(ref.digest).chunks) > 100
    assert not any("/chunks/" in k for k in before)  # chunks are no objects of their own ...
    assert len([k for k in before if "/packs/" in k]) == len([k for k in before if "/index/" in k]) == 1  # one pack
    edited = bytearray(data)
    edited[2 * MiB:2 * MiB + 10] = b"0123456789"
    store.put_bytes(data)
    assert s3.keys() == before  # the same bytes again: not one new object
    store.put_bytes(bytes(edited))
    new = s3.keys() - before
    assert len(new) == 3  # a pack, its index segment and the blob manifest
    (pack,) = (k.rsplit("/", 1)[-1] for k in new if "/packs/" in k)
    assert 1 <= len([d for d, loc in store.chunks.index.entries() if loc.pack == "b3:" + pack]) <= 4  # few chunks


def test_corrupt_chunk_is_detected_quarantined_and_never_served(s3: S3) -> None:
    store = s3.store()
    data = rand(1 * MiB, 5)
    commit_bytes(store, key(3), data)
    hit = store.get_ref(key(3))
    assert hit is not None and hit.result.value.blob is not None
    chunk = store.blob_manifest(hit.result.value.blob.digest).chunks[7][0]
    (loc,) = store.chunks.index.locations(chunk)
    pack = object_name("packs", loc.pack)
    damaged = bytearray(s3.raw(pack))
    damaged[loc.offset:loc.offset + 100] = bytes(100)
    s3.overwrite(pack, bytes(damaged))
    with pytest.raises(StoreCorrupted, match="quarantined"):
        store.load_value(hit.result.value)
    assert chunk not in store.chunks.index  # set aside, not served again ...
    assert any(k.startswith(s3.prefix + "quarantine/packs%") and chunk[3:] in k for k in s3.keys())  # ... on record
    assert s3.store().chunks.missing([chunk]) == [chunk]  # for every other reader too
    assert store.get_ref(key(3)) is None  # the ref names a missing chunk: a miss, never a hit
    report = store.verify()  # the blob that lost its chunk and the result naming it; nothing else
    assert {d.name for d in report.damaged} == {object_name("blobs", hit.result.value.blob.digest),
                                                object_name("results", hit.digest)}


def test_corrupt_result_manifest_is_a_miss(s3: S3) -> None:
    store = s3.store()
    digest = commit_bytes(store, key(4), b"v")
    s3.overwrite(object_name("results", digest), b'{"v": 1}\nb3:bad')
    assert store.get_ref(key(4)) is None
    assert s3.prefix + object_name("results", digest) not in s3.keys()


_WRITER = """
import sys
from memoplane.cas import open_store, Provenance, ResultManifest, StoredValue
import random
store = open_store(sys.argv[1])
for i in range(int(sys.argv[2]), int(sys.argv[2]) + 6):
    k = "b3:" + f"{i:064x}"
    data = random.Random(i % 4).randbytes(300_000)  # overlapping content across writers
    store.commit(ResultManifest(value=StoredValue("bytes", blob=store.put_bytes(data)),
                                stdout=store.put_bytes(b"log"), stderr=store.put_bytes(b""),
                                provenance=Provenance(k, {}, "b3:" + "2" * 64, "p", 0.0, 1.0, 1.0)))
"""


def test_concurrent_writers_threads_and_processes(s3: S3) -> None:
    env = {**os.environ, **s3.env}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, s3.url(), str(start)], env=env,
                              stderr=subprocess.PIPE, text=True) for start in (100, 103)]
    store = s3.store()
    errors: list[BaseException] = []

    def write(start: int) -> None:
        try:
            for i in range(start, start + 6):
                commit_bytes(store, key(i), random.Random(i % 4).randbytes(300_000))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in (100, 102, 104)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    assert not errors, errors
    report = store.verify()
    assert report.ok, report.to_dict()
    assert report.checked["refs"] == 10  # keys 100..109
    for i in range(100, 110):
        hit = store.get_ref(key(i), deep=True)
        assert hit is not None


def test_gc_keeps_live_data(s3: S3) -> None:
    store = s3.store()
    live = rand(1 * MiB, 6)
    commit_bytes(store, key(5), live)
    store.put_bytes(rand(1 * MiB, 7))  # unreferenced
    young = store.gc(grace_seconds=3600)
    assert young.deleted == 0 and young.kept_young > 0
    report = store.gc(grace_seconds=0)
    assert report.deleted > 0 and report.deleted == young.kept_young
    hit = store.get_ref(key(5), deep=True)
    assert hit is not None and store.load_value(hit.result.value) == live
    assert store.verify().ok


# -- the node-local cache over S3 -------------------------------------------------------------


class CountingS3(S3Backend):
    """Counts remote GETs per kind of object."""

    def __init__(self, *a: object, **kw: float) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.gets: Counter[str] = Counter()

    def get(self, name: str) -> bytes:
        self.gets[name.split("/", 1)[0]] += 1
        return super().get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.gets[name.split("/", 1)[0]] += 1
        return super().get_range(name, offset, length)


def test_cache_serves_second_read_locally_and_heals_local_damage(s3: S3, tmp_path: Path) -> None:
    data = rand(2 * MiB, 8)
    commit_bytes(s3.store(), key(6), data)  # another node wrote it
    remote = CountingS3(s3.client, s3.bucket, s3.prefix)
    local = FilesystemBackend(tmp_path / "cache", durability="none")
    cache = CachingBackend(remote, local)
    store = Store(cache, workers=4)
    hit = store.get_ref(key(6))
    assert hit is not None and store.load_value(hit.result.value) == data
    first = remote.gets.copy()
    assert hit.result.value.blob is not None
    chunks = store.blob_manifest(hit.result.value.blob.digest).chunks
    assert len(chunks) > 50 and 1 <= first["packs"] <= 3  # a few ranged reads, not one per chunk
    hit = store.get_ref(key(6))
    assert hit is not None and store.load_value(hit.result.value) == data
    assert remote.gets - first == Counter({"refs": 1})  # content came from the local cache
    # Damage one chunk in a kept range: the range is dropped, read again from the server, served correctly.
    loc = store.chunks.index.locations(chunks[3][0])[0]
    pack = object_name("packs", loc.pack)
    remote_before = s3.raw(pack)
    (kept,) = [p for p in (local.root / "ranges").rglob("*-*")
               if int(p.name.split("-")[0]) <= loc.offset < sum(map(int, p.name.split("-")))]
    damaged = bytearray(kept.read_bytes())
    start = loc.offset - int(kept.name.split("-")[0])
    damaged[start:start + 64] = b"\xff" * 64
    kept.write_bytes(bytes(damaged))
    before = remote.gets.copy()
    assert store.load_value(hit.result.value) == data
    assert set(remote.gets - before) == {"packs"}  # ranges of the pack, nothing else
    assert s3.raw(pack) == remote_before  # the server's copy untouched
    assert not any(k.startswith(s3.prefix + "quarantine/") for k in s3.keys())
    assert cache.counters.dropped_damaged == 1
    assert store.get_ref(key(6), deep=True) is not None


def test_cache_with_store_from_settings(s3: S3, tmp_path: Path) -> None:
    store = store_from_settings(s3.env["MEMOPLANE_S3_ENDPOINT"], s3.env["MEMOPLANE_S3_ACCESS_KEY"],
                                s3.env["MEMOPLANE_S3_SECRET_KEY"], s3.bucket, "viasettings",
                                cache_dir=tmp_path / "c", cache_max_bytes=256 * 1024)
    data = rand(1 * MiB, 9)
    commit_bytes(store, key(7), data)
    hit = store.get_ref(key(7))
    assert hit is not None and store.load_value(hit.result.value) == data
    assert isinstance(store.backend, CachingBackend)
    assert store.backend.cached_bytes() <= 256 * 1024  # bounded: LRU eviction ran
    assert store.describe().startswith(f"s3://{s3.bucket}/viasettings/")
    assert store.verify().ok


def test_memoize_on_s3_signs_and_never_serves_a_forged_ref(s3: S3) -> None:
    """Trust does not depend on the backend: on S3 a forged ref is refused, recomputed, and
    `verify`'s scan (a listing of refs/) names it."""
    import dataclasses

    import memoplane
    from memoplane.trust import untrusted_refs
    from memoplane.trust.local import Keyring

    store, calls = s3.store(), []

    def make() -> memoplane.Memoized:
        @memoplane.memoize(store=store, memory_bytes=0)
        def add(a: int, b: int) -> dict[str, int]:
            calls.append(a)
            return {"sum": a + b}
        return add  # type: ignore[return-value]

    assert make()(2, 2) == {"sum": 4} and make()(2, 2) == {"sum": 4} and len(calls) == 1
    k = make().key(2, 2)
    honest = store.get_result(store.read_ref(k) or "")
    forged = store.commit(dataclasses.replace(honest, value=store.put_value({"sum": 5})))
    judged, untrusted = untrusted_refs(store, Keyring().policy())
    assert judged == 1 and [(u.key, u.result) for u in untrusted] == [(k, forged)]
    assert make()(2, 2) == {"sum": 4} and len(calls) == 2
    assert untrusted_refs(store, Keyring().policy()) == (1, [])
