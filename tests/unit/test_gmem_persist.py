"""GMemStore: overlays persisted as local log segments plus store objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memoplane.cas.backend import Backend, ObjectInfo
from memoplane.cas.fs import FilesystemBackend
from memoplane.errors import InputError, NotFound, StoreCorrupted
from memoplane.gmem import GMemParams, GMemStore, Layer, seed_digest
from memoplane.gmem.persist import decode_snapshot

PARAMS = GMemParams(1337, "float64", (Layer(7, 0.5),))


class MemoryBackend:
    """A fake of our own Backend protocol, to see exactly which objects exist."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> None:
        self.objects[name] = bytes(data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        return self.objects.setdefault(name, bytes(data)) is data

    def get(self, name: str) -> bytes:
        if name not in self.objects:
            raise NotFound(name)
        return self.objects[name]

    def exists(self, name: str) -> bool:
        return name in self.objects

    def delete(self, name: str) -> None:
        self.objects.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for k in sorted(self.objects):
            if k.startswith(prefix):
                yield ObjectInfo(k, len(self.objects[k]), 0.0)

    def describe(self) -> str:
        return "memory"


@pytest.fixture(params=["memory", "filesystem"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    return FilesystemBackend(tmp_path / "store", durability="none")


def names(backend: Backend) -> list[str]:
    return sorted(o.name for o in backend.list("gmem/"))


def test_writes_survive_reopen(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, rep = store.open("field", PARAMS)
    assert rep.active_records == 0 and s.status()["overlayEntries"] == 0
    s.gmem.write_many([1, 2, 3], [0.1, 0.2, 0.3])
    s.gmem.write(2, 0.9)
    s.close()  # flushes the single write
    s2, rep = store.open("field", PARAMS)
    assert rep.active_records == 4 and s2.gmem.fetch_many([1, 2, 3]).tolist() == [0.1, 0.9, 0.3]
    assert s2.digest() == s.digest()
    s2.close()


def test_seal_and_compact_move_everything_into_the_store(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([1, 2], [0.1, 0.2])
    assert s.seal() == 1
    s.gmem.write_many([2, 5], [0.7, 0.5])
    assert s.seal() == 2 and s.seal() == 2  # nothing new: no empty segment
    assert names(backend) == [
        "gmem/field/log-0000000000000001", "gmem/field/log-0000000000000002", "gmem/field/params.json",
    ]  # fmt: skip
    before = s.digest()
    snap = s.compact()
    assert names(backend) == ["gmem/field/params.json", "gmem/field/snapshot-0000000000000002"]
    version, keys, _ = decode_snapshot(backend.get("gmem/field/snapshot-0000000000000002"), PARAMS, "x")
    assert version == 2 and keys.tolist() == [1, 2, 5] and snap.startswith("b3:")
    s.gmem.write_many([9], [0.9])
    s.close()
    # A fresh machine: no local directory, only the store (and no active writes lost
    # here because this one kept its local segment).
    s2, rep = store.open("field", PARAMS)
    assert rep.snapshot_version == 2 and rep.active_records == 1
    assert s2.gmem.fetch_many([1, 2, 5, 9]).tolist() == [0.1, 0.7, 0.5, 0.9]
    assert s2.status()["version"] == 2 and s2.status()["overlayEntries"] == 4
    assert s2.digest() != before
    s2.close()
    s3, _ = GMemStore(backend, tmp_path / "elsewhere").open("field", PARAMS)
    assert s3.gmem.fetch_many([2, 9]).tolist() == [0.7, s3.gmem.generated([9])[0]]
    s3.close()


def test_digest_is_state_based_across_seal_compact_and_reopen(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([4, 8], [0.4, 0.8])
    d = s.digest()
    s.seal()
    assert s.digest() == d
    s.compact()
    assert s.digest() == d
    s.close()
    s2, _ = store.open("field", PARAMS)
    assert s2.digest() == d == seed_digest(PARAMS, s2.gmem.overlay)
    s2.close()


def test_torn_active_tail_is_dropped_and_earlier_batches_kept(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([1, 2], [0.1, 0.2])
    s.gmem.write_many([3, 4, 5], [0.3, 0.4, 0.5])
    s.close()
    path = store.active_path("field")
    path.write_bytes(path.read_bytes()[:-30])  # the crash tore the last batch
    s2, rep = store.open("field", PARAMS)
    # 72 bytes of batch 2 minus the 30 torn off: one whole record and a fragment.
    assert rep.dropped_records == 1 and rep.dropped_bytes == 72 - 30
    assert s2.gmem.fetch_many([1, 2, 3]).tolist() == [0.1, 0.2, s2.gmem.generated([3])[0]]
    s2.close()


def test_crash_after_sealing_before_unlink_does_not_double_apply(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([1], [0.1])
    s.close()
    path = store.active_path("field")
    saved = path.read_bytes()
    s, _ = store.open("field", PARAMS)
    s.seal()
    s.close()
    path.unlink()
    path.write_bytes(saved)  # as if the unlink never happened
    s2, rep = store.open("field", PARAMS)
    assert rep.sealed_segments == 1 and rep.active_records == 0 and s2.version == 1
    s2.gmem.write_many([2], [0.2])
    assert s2.seal() == 2
    s2.close()


def test_a_missing_sealed_segment_is_reported(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    for i in range(3):
        s.gmem.write_many([i], [0.5])
        s.seal()
    s.close()
    backend.delete("gmem/field/log-0000000000000002")
    with pytest.raises(StoreCorrupted, match="missing"):
        store.open("field", PARAMS)


def test_damaged_objects_are_refused(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([1], [0.5])
    s.compact()
    s.gmem.write_many([2], [0.5])
    s.seal()
    s.close()
    for obj in ("gmem/field/snapshot-0000000000000001", "gmem/field/log-0000000000000002"):
        good = backend.get(obj)
        bad = bytearray(good)
        bad[-3] ^= 1
        backend.put(obj, bytes(bad))
        with pytest.raises(StoreCorrupted):
            GMemStore(backend, tmp_path / "fresh").open("field", PARAMS)
        backend.put(obj, good)


def test_a_name_is_bound_to_its_parameters(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local")
    s, _ = store.open("field", PARAMS)
    s.gmem.write_many([1], [0.5])
    s.close()
    with pytest.raises(InputError, match="other parameters"):
        store.open("field", GMemParams(1338, "float64"))
    store.drop("field")
    s2, _ = store.open("field", GMemParams(1338, "float64"))
    assert len(s2.gmem.overlay) == 0
    s2.close()
    with pytest.raises(InputError):
        store.open("../etc", PARAMS)


def test_auto_seal_by_segment_size_and_uint64_float32_roundtrip(backend: Backend, tmp_path: Path) -> None:
    for dtype, vals in (("uint64", [2**64 - 1, 0, 7]), ("float32", [0.5, -1.25, 3.0])):
        params = GMemParams(3, dtype)  # type: ignore[arg-type]
        store = GMemStore(backend, tmp_path / dtype, segment_records=4)
        s, _ = store.open(f"g-{dtype}", params)
        s.gmem.write_many([10, 11, 12], vals)
        s.gmem.write_many([13, 14], vals[:2])  # crosses 4 records: sealed
        assert s.version == 1
        s.close()
        s2, _ = store.open(f"g-{dtype}", params)
        got = s2.gmem.fetch_many(np.arange(10, 15, dtype=np.uint64)).tolist()
        assert got == vals + vals[:2]
        s2.close()


def test_single_writes_flush_once_even_when_the_flush_seals(backend: Backend, tmp_path: Path) -> None:
    store = GMemStore(backend, tmp_path / "local", segment_records=1)
    s, _ = store.open("field", PARAMS)
    s.gmem.write(1, 0.5)
    s.gmem.write(2, 0.25)
    s.gmem.write_many([3], [0.125])  # flushes the two singles first, as one batch
    assert s.version == 2 and len(list(store.objects("field"))) == 2
    s.close()
    s2, rep = store.open("field", PARAMS)
    assert rep.sealed_segments == 2 and s2.gmem.fetch_many([1, 2, 3]).tolist() == [0.5, 0.25, 0.125]
    s2.close()
