"""Round trips, deduplication and stats of the content-addressed store."""

from __future__ import annotations

import io
import os
import random
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from fakes import DelegatingBackend

from memoplane.cas import (
    INLINE_MAX,
    BlobRef,
    FilesystemBackend,
    Provenance,
    ResultManifest,
    Store,
    StoredValue,
    b3,
    default_store_path,
    open_store,
)
from memoplane.cas.chunking import RAW, ZSTD, ChunkParams, Pools, ingest_buffer
from memoplane.cas.digests import object_name
from memoplane.cas.packs import read_range
from memoplane.cas.records import BlobManifest, seal
from memoplane.errors import InputError, NotFound

MiB = 1 << 20


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def text(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = ["store", "chunk", "memo", "plane", "result", "kube", "node", "cache", "digest", "tree"]
    out, size = [], 0
    while size < n:
        w = rng.choice(words) + str(rng.randrange(1000))
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()[:n]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    yield s
    s.close()


def stored_chunks(store: Store) -> dict[str, bytes]:
    """Every packed chunk's stored bytes (its flag byte first), by digest."""
    store.chunks.refresh()
    return {d: read_range(store.backend, object_name("packs", loc.pack), loc.offset, loc.length)
            for d, loc in store.chunks.index.entries()}


def prov(key: str) -> Provenance:
    return Provenance(key, {"x": b3(b"x")}, b3(b"runtime"), "node-a", 100.0, 101.5, 1.5)


def result_for(store: Store, key: str, value: object = None, out: bytes = b"out") -> ResultManifest:
    return ResultManifest(value=store.put_value(value), stdout=store.put_bytes(out),
                          stderr=store.put_bytes(b""), provenance=prov(key))


# -- blobs -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"x", b"hello world" * 3, rand(5 * MiB, 1)], ids=["empty", "1", "small", "5MiB"])
def test_bytes_round_trip(store: Store, data: bytes) -> None:
    ref = store.put_bytes(data)
    assert ref == BlobRef("b3:" + blake3.blake3(data).hexdigest(), len(data))
    assert store.get_bytes(ref.digest) == data


def test_big_blob_is_many_chunks_and_streams_identically(store: Store, tmp_path: Path) -> None:
    data = rand(20 * MiB, 2)  # bigger than the 8 MiB stream window: cuts must carry across windows
    a = store.put_bytes(data)
    b = store.put_stream(io.BytesIO(data))
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    c = store.put_file(f)
    assert a == b == c
    chunks = store.blob_manifest(a.digest).chunks
    assert len(chunks) > 100
    assert sum(n for _, n in chunks) == len(data)
    assert max(n for _, n in chunks) <= store.params.max_size
    assert b"".join(store.iter_blob(a.digest)) == data
    store.write_blob(a.digest, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data


def test_compressible_chunks_are_zstd_and_random_ones_raw(store: Store) -> None:
    store.put_bytes(text(1 * MiB, 3))
    flags = {stored[:1] for stored in stored_chunks(store).values()}
    assert flags == {ZSTD}
    s2 = Store(FilesystemBackend(Path(store.backend.describe()) / "../other", durability="none"))
    s2.put_bytes(rand(1 * MiB, 3))
    assert {stored[:1] for stored in stored_chunks(s2).values()} == {RAW}
    s2.close()


def test_missing_blob_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_bytes(b3(b"never stored"))


def test_put_file_missing_names_the_path(store: Store, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.bin"):
        store.put_file(tmp_path / "nope.bin")


# -- trees -------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "a/b/c").mkdir(parents=True)
    (root / "top.txt").write_bytes(b"top")
    (root / "a/data.bin").write_bytes(rand(300_000, 4))
    (root / "a/b/c/deep.txt").write_bytes(b"")
    tool = root / "a/b/run.sh"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)


def test_tree_round_trip_with_nested_dirs_and_exec_bits(store: Store, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    ref = store.put_tree(src)
    tree = store.get_tree(ref.digest)
    assert sorted(tree.entries) == ["a/b/c/deep.txt", "a/b/run.sh", "a/data.bin", "top.txt"]
    assert tree.entries["a/b/run.sh"].exec and not tree.entries["top.txt"].exec
    assert ref.size == 3 + 300_000 + 0 + len(b"#!/bin/sh\necho hi\n")
    store.materialize(ref.digest, dst)
    for rel in ["top.txt", "a/data.bin", "a/b/c/deep.txt", "a/b/run.sh"]:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert os.stat(dst / "a/b/run.sh").st_mode & stat.S_IXUSR
    assert not os.stat(dst / "top.txt").st_mode & stat.S_IXUSR
    assert stat.S_IMODE(os.stat(dst / "a/b/run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dst / "top.txt").st_mode) == 0o644
    assert store.put_tree(dst) == ref  # same content, same address


def test_materialize_refuses_a_non_empty_directory(store: Store, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_bytes(b"f")
    ref = store.put_tree(tmp_path / "src")
    with pytest.raises(InputError, match="not empty"):
        store.materialize(ref.digest, tmp_path / "src")


# -- values and results -------------------------------------------------------------


def test_values_inline_when_small_blob_when_large(store: Store) -> None:
    small = store.put_value({"total": 60})
    assert small.blob is None and store.load_value(small) == {"total": 60}
    big_value = {"rows": list(range(INLINE_MAX))}
    big = store.put_value(big_value)
    assert big.blob is not None and store.load_value(big) == big_value
    raw = store.put_value(b"\x00\x01", "bytes")
    assert store.load_value(raw) == b"\x00\x01"
    assert store.put_value(None, "none") == StoredValue("none")


def test_result_manifest_dict_round_trip_and_stable_digest(store: Store) -> None:
    m = result_for(store, b3(b"key"), {"a": [1, 2.5]})
    again = ResultManifest.from_dict(m.to_dict())
    assert again == m and again.digest == m.digest
    with pytest.raises(InputError, match=r"provenance\.cache_key"):
        ResultManifest.from_dict({**m.to_dict(), "provenance": {**m.provenance.to_dict(), "cache_key": "nope"}})


def test_commit_then_get_ref(store: Store) -> None:
    key = b3(b"job-1")
    m = result_for(store, key, {"total": 60})
    digest = store.commit(m)
    hit = store.get_ref(key)
    assert hit is not None and hit.digest == digest and hit.result == m
    assert store.get_ref(key, deep=True) is not None
    assert store.get_ref(b3(b"other")) is None


def test_result_before_its_blobs_is_refused(store: Store) -> None:
    m = result_for(store, b3(b"k"))
    m2 = ResultManifest(m.value, BlobRef(b3(b"unstored"), 8), m.stderr, m.provenance)
    with pytest.raises(NotFound, match="put the blob before the result"):
        store.put_result(m2)
    with pytest.raises(NotFound):
        store.set_ref(b3(b"k"), b3(b"no such result"))


def test_bad_cache_key_names_the_field(store: Store) -> None:
    with pytest.raises(InputError, match="cache key"):
        store.get_ref("sha256:abc")


# -- dedup and stats -----------------------------------------------------------------


def test_same_content_twice_is_stored_once(store: Store) -> None:
    data = rand(3 * MiB, 5)
    store.put_bytes(data)
    before = {i.name: i.size for i in store.backend.list("")}
    store.put_bytes(data)
    assert {i.name: i.size for i in store.backend.list("")} == before


def test_small_edit_to_a_large_blob_adds_few_chunks(store: Store) -> None:
    data = bytearray(text(8 * MiB, 6))
    first = store.put_bytes(bytes(data))
    n_before = len(stored_chunks(store))
    data[4 * MiB:4 * MiB] = b"an inserted sentence in the middle. "
    second = store.put_bytes(bytes(data))
    added = len(stored_chunks(store)) - n_before
    assert first != second
    assert 1 <= added <= 3, added
    assert store.get_bytes(second.digest) == bytes(data)


def test_stats_on_a_known_input(store: Store) -> None:
    data = rand(2 * MiB, 7)  # incompressible: stored chunks are raw plus one flag byte
    for i in range(3):  # three keys with the same output: logical 3x, unique 1x
        m = ResultManifest(value=StoredValue("bytes", blob=store.put_bytes(data)),
                           stdout=store.put_bytes(b""), stderr=store.put_bytes(b""),
                           provenance=prov(b3(b"%d" % i)))
        store.commit(m)
    st = store.stats()
    chunks = store.blob_manifest(b3(data)).chunks
    assert st.entries == 3
    assert st.logical_bytes == 3 * len(data)
    assert st.unique_bytes == len(data)
    assert st.chunks == len(stored_chunks(store)) == len(set(chunks))  # b"" has no chunks
    assert st.dedup_ratio == pytest.approx(3.0)
    chunk_bytes = sum(len(stored) for stored in stored_chunks(store).values())
    assert chunk_bytes == len(data) + len(set(chunks))
    assert st.stored_bytes > chunk_bytes  # plus pack trailers, index segments, manifests and refs
    assert st.storage_ratio == pytest.approx(3 * len(data) / st.stored_bytes)


# -- locations -----------------------------------------------------------------------


def test_default_store_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMOPLANE_STORE", str(tmp_path / "s"))
    assert default_store_path() == tmp_path / "s"
    monkeypatch.delenv("MEMOPLANE_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store_path() == tmp_path / "cache" / "memoplane" / "store"


def test_open_store_paths_and_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(f"file://{tmp_path}/u")
    assert s.describe() == str(tmp_path / "u")
    s.put_bytes(b"x")
    assert (tmp_path / "u" / "packs").is_dir() and not (tmp_path / "u" / "chunks").exists()
    for var in ("MEMOPLANE_S3_ENDPOINT", "MEMOPLANE_S3_ACCESS_KEY", "MEMOPLANE_S3_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match="MEMOPLANE_S3_ENDPOINT is not set"):
        open_store("s3://bucket/prefix")


class ReadOnly:
    """A stream with read() but no readinto(), like some HTTP bodies."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, 100_000))  # short reads, as sockets give


def test_put_stream_with_short_reads_and_no_readinto(store: Store) -> None:
    data = text(9 * MiB, 8)
    ref = store.put_stream(ReadOnly(data))  # type: ignore[arg-type]
    assert ref == store.put_bytes(data)
    assert store.get_bytes(ref.digest) == data


# -- packs -------------------------------------------------------------------------


class CountingBackend(DelegatingBackend):
    def __init__(self, inner: FilesystemBackend) -> None:
        super().__init__(inner)
        self.calls: Counter[tuple[str, str]] = Counter()

    def before(self, op: str, name: str) -> None:
        self.calls[(op, name.split("/", 1)[0])] += 1


def test_a_blob_is_a_few_requests_whatever_its_chunk_count(tmp_path: Path) -> None:
    backend = CountingBackend(FilesystemBackend(tmp_path / "s", durability="none"))
    with Store(backend) as store:  # type: ignore[arg-type]
        data = rand(5 * MiB, 11)
        ref = store.put_bytes(data)
        assert len(store.blob_manifest(ref.digest).chunks) > 100
        assert backend.calls[("put", "packs")] == 1 and backend.calls[("put", "index")] == 1
        assert not any(kind == "chunks" for _, kind in backend.calls)  # no object, no HEAD per chunk
        before = backend.calls.copy()
        store.put_bytes(data)  # deduplicated in memory: only the blob manifest is looked at
        assert set(backend.calls - before) == {("put_if_absent", "blobs")}
    with Store(backend) as reader:  # type: ignore[arg-type]
        before = backend.calls.copy()
        assert reader.get_bytes(ref.digest) == data
        reads = backend.calls - before
        assert reads[("get_range", "packs")] <= 2 and reads[("get", "index")] == 1


def test_a_store_written_before_packs_stays_readable(tmp_path: Path) -> None:
    backend = FilesystemBackend(tmp_path / "old", durability="none")
    data = text(300_000, 12)

    def old_put(digest: str, encode: Callable[[], bytes], plain_length: int) -> bool:
        return backend.put_if_absent(object_name("chunks", digest), encode)  # the old layout: an object a chunk

    pools = Pools(1)
    ing = ingest_buffer(data, ChunkParams(), pools, old_put)
    pools.close()
    backend.put(object_name("blobs", ing.digest), seal(BlobManifest(ing.size, tuple(ing.chunks)).to_dict()))
    with Store(backend) as store:
        m = ResultManifest(value=StoredValue("bytes", blob=BlobRef(ing.digest, ing.size)),
                           stdout=store.put_bytes(b""), stderr=store.put_bytes(b""), provenance=prov(b3(b"old")))
        store.commit(m)
        hit = store.get_ref(b3(b"old"))
        assert hit is not None and store.load_value(hit.result.value) == data
        before = {i.name for i in backend.list("chunks/")}
        assert len(before) == len(ing.chunks) > 3
        store.put_bytes(data)  # new writes go to packs only
        assert {i.name for i in backend.list("chunks/")} == before
        assert set(stored_chunks(store)) == {d for d, _ in ing.chunks}
    backend.delete(sorted(before)[0])
    with Store(backend) as store:  # the packed copies serve it now
        assert store.get_bytes(ing.digest) == data
