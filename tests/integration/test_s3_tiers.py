"""The cold tier over two independent S3 servers: hot in MinIO, cold in Versity's gateway
(cas/tiers.py). Demotion moves content there, a hit reads it back through the hot store,
verified, and re-warms it; a crash mid-demotion loses nothing; a forged cold pack is never
served nor re-warmed. Each test works in its own random buckets and removes them afterwards."""

from __future__ import annotations

import io
import random
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import minio
import pytest

from memoplane.cas import Provenance, ResultManifest, S3Backend, Store, StoredValue
from memoplane.cas.chunking import encode_chunk
from memoplane.cas.digests import b3, object_name
from memoplane.cas.packs import PACKS, parse_pack
from memoplane.cas.s3 import make_client
from memoplane.cas.tiers import TieredBackend, demote
from memoplane.errors import StoreCorrupted
from memoplane.testing import cluster

KEY = "b3:" + "5" * 64
AFTER = 30 * 86400.0
LATER = 1e10  # a `now` past every object's mtime plus AFTER


@dataclass
class Bucket:
    client: minio.Minio
    name: str

    def backend(self) -> S3Backend:
        return S3Backend(self.client, self.name, "team/")

    def keys(self, under: str) -> set[str]:
        return {o.object_name[len("team/"):] for o in self.client.list_objects(self.name, prefix="team/" + under,
                                                                               recursive=True) if o.object_name}

    def overwrite(self, name: str, data: bytes) -> None:
        self.client.put_object(self.name, "team/" + name, io.BytesIO(data), len(data))


def _bucket(info: cluster.ClusterInfo, server: str) -> Iterator[Bucket]:
    env = info.env(server)
    client = make_client(env["MEMOPLANE_S3_ENDPOINT"], env["MEMOPLANE_S3_ACCESS_KEY"], env["MEMOPLANE_S3_SECRET_KEY"])
    bucket = Bucket(client, f"mp-tier-{secrets.token_hex(6)}")
    bucket.backend().ensure_bucket()
    yield bucket
    for obj in client.list_objects(bucket.name, recursive=True):
        if obj.object_name:
            client.remove_object(bucket.name, obj.object_name)
    client.remove_bucket(bucket.name)


@pytest.fixture
def hot(control_plane: cluster.ClusterInfo) -> Iterator[Bucket]:
    yield from _bucket(control_plane, "minio")


@pytest.fixture
def cold(control_plane: cluster.ClusterInfo) -> Iterator[Bucket]:
    yield from _bucket(control_plane, "versitygw")


def commit(store: Store, data: bytes) -> str:
    value = StoredValue("bytes", blob=store.put_bytes(data))
    assert value.blob is not None
    store.commit(ResultManifest(value=value, stdout=store.put_bytes(b""), stderr=store.put_bytes(b""),
                                provenance=Provenance(KEY, {}, "b3:" + "2" * 64, "n", 0.0, 1.0, 1.0)))
    return value.blob.digest


def packs_of(store: Store, blob: str) -> set[str]:
    """The packs holding the chunks of `blob` (what reading it reads)."""
    return {object_name("packs", loc.pack) for c, _ in store.blob_manifest(blob).chunks
            for loc in store.chunks.index.locations(c)}


def test_demoted_content_is_read_through_from_the_second_server_and_rewarmed(hot: Bucket, cold: Bucket) -> None:
    tiered = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    payload = random.Random(3).randbytes(2 << 20)
    with Store(tiered, workers=4) as store:
        blob = commit(store, payload)
        packs = hot.keys(PACKS)
        report = demote(tiered, now=LATER)
        assert report.moved == len(packs) > 0 and report.bytes_moved > 0
        assert not hot.keys(PACKS) and cold.keys(PACKS) == packs
        assert hot.keys("refs/") and hot.keys("blobs/") and not cold.keys("refs/")
        assert hot.keys("index/") and not cold.keys("index/")   # index segments stay hot
    second = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    with Store(second, workers=4) as reader:  # another node
        assert reader.get_ref(KEY) is not None
        assert reader.get_bytes(blob) == payload
        read = packs_of(reader, blob)
        assert hot.keys(PACKS) == read   # re-warmed into MinIO, each pack fetched once
        assert second.counters.cold_reads == len(read)


def test_a_crash_between_copy_and_delete_loses_nothing(hot: Bucket, cold: Bucket) -> None:
    class DiesOnDelete(S3Backend):
        def delete(self, name: str) -> None:
            raise OSError(f"killed before deleting {name}")

    tiered = TieredBackend(DiesOnDelete(hot.client, hot.name, "team/"), cold.backend(), after=AFTER)
    payload = random.Random(4).randbytes(1 << 20)
    with Store(tiered, workers=4) as store:
        blob = commit(store, payload)
        with pytest.raises(OSError, match="killed"):
            demote(tiered, now=LATER)
    assert cold.keys(PACKS) and hot.keys(PACKS) >= cold.keys(PACKS)  # copied, nothing deleted yet
    again = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    assert demote(again, now=LATER).failed == 0
    with Store(again, workers=4) as store:
        assert not hot.keys(PACKS) and store.get_bytes(blob) == payload


def test_a_forged_pack_in_the_cold_server_is_never_served_nor_rewarmed(hot: Bucket, cold: Bucket) -> None:
    tiered = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    with Store(tiered, workers=4) as store:
        blob = commit(store, random.Random(5).randbytes(1 << 20))
        demote(tiered, now=LATER)
        (victim,) = packs_of(store, blob)
    body = cold.backend().get(victim)
    _, offset, length, _ = parse_pack(body)[0]
    forged = encode_chunk(random.Random(7).randbytes(length * 2))[:length]   # its first chunk, same length
    cold.overwrite(victim, body[:offset] + forged + body[offset + length:])
    reading = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    with Store(reading, workers=4) as reader:  # another node
        with pytest.raises(StoreCorrupted):
            reader.get_bytes(blob)
        assert reader.get_ref(KEY) is None   # not served with a chunk gone
    assert victim not in hot.keys(PACKS) and reading.counters.cold_reads == 0   # never re-warmed
    records = [k for k in hot.keys("quarantine/") if k.startswith("quarantine/" + victim.replace("/", "%"))]
    assert records and all(hot.backend().get(k) == forged for k in records)   # the bytes read, kept aside


def test_ranged_reads_of_a_cold_pack_fetch_it_once(hot: Bucket, cold: Bucket) -> None:
    tiered = TieredBackend(hot.backend(), cold.backend(), after=AFTER)
    pack = random.Random(6).randbytes(4 << 20)
    name = object_name("packs", b3(pack))
    cold.backend().put(name, pack)
    got: dict[int, bytes] = {}
    start = threading.Barrier(6)

    def read(i: int) -> None:
        start.wait()
        got[i] = tiered.get_range(name, i * 500_000, 1000)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: pack[i * 500_000:i * 500_000 + 1000] for i in range(6)}
    assert tiered.counters.cold_reads == 1 and name in hot.keys("packs/")
