"""Packs on the S3 backend (local MinIO and Versity's gateway): an ingest is one PUT request per
pack plus one index segment, and a read is one ranged GET per pack, every chunk verified."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from minio import Minio

from memoplane.cas import S3Backend
from memoplane.cas.chunking import ChunkParams, Pools, ingest_buffer
from memoplane.cas.digests import object_name
from memoplane.cas.packs import (
    INDEX,
    MAX_SPAN,
    PACKS,
    PackDamaged,
    PackIndex,
    PackWriter,
    plan_reads,
    read_chunk,
    read_chunks,
)
from memoplane.cas.s3 import make_client
from memoplane.testing import cluster

MiB = 1 << 20


class _Counted(S3Backend):
    """Counts the requests packs make: PUTs (a pack and a segment are one plain PUT each, no HEAD)
    and ranged GETs, and every HTTP request the client sends, by method."""

    puts = ranged = 0

    def __init__(self, client: Minio, bucket: str, prefix: str) -> None:
        super().__init__(client, bucket, prefix)
        self.http: Counter[str] = Counter()
        send = client._http.urlopen

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.http[method] += 1
            return send(method, url, *args, **kwargs)

        client._http.urlopen = counted  # type: ignore[method-assign]

    def put(self, name: str, data: bytes) -> None:
        self.puts += 1
        super().put(name, data)

    def put_if_absent(self, name: str, data: object) -> bool:  # type: ignore[override]
        self.puts += 2  # a HEAD, then a PUT
        return super().put_if_absent(name, data)  # type: ignore[arg-type]

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.ranged += 1
        return super().get_range(name, offset, length)


@pytest.fixture(params=cluster.S3_SERVERS)
def backend(control_plane: cluster.ClusterInfo, request: pytest.FixtureRequest) -> Iterator[_Counted]:
    env = control_plane.env(request.param)
    client = make_client(env["MEMOPLANE_S3_ENDPOINT"], env["MEMOPLANE_S3_ACCESS_KEY"],
                         env["MEMOPLANE_S3_SECRET_KEY"])
    bucket = f"mp-packs-{secrets.token_hex(6)}"
    b = _Counted(client, bucket, "team/")
    b.ensure_bucket()
    yield b
    for obj in client.list_objects(bucket, recursive=True):
        if obj.object_name:
            client.remove_object(bucket, obj.object_name)
    client.remove_bucket(bucket)


def test_packs_on_s3_cost_a_request_per_pack(backend: _Counted) -> None:
    data = random.Random(7).randbytes(8 * MiB)
    writer = PackWriter(backend, PackIndex(), target=2 * MiB)
    pools = Pools(2)
    try:
        ingested = ingest_buffer(data, ChunkParams(), pools, writer.add)
    finally:
        pools.close()
    writer.flush()
    packs = [info.name for info in backend.list(PACKS)]
    assert len(packs) == 4 and backend.puts == len(packs) + 1
    assert len(list(backend.list(INDEX))) == 1

    index = PackIndex()
    index.refresh(backend)
    got = read_chunks(backend, index, [d for d, _ in ingested.chunks])
    assert b"".join(got[d] for d, _ in ingested.chunks) == data
    assert backend.ranged == len(packs)


def test_a_big_pack_is_one_put_request_and_a_span_one_get(backend: _Counted) -> None:
    data = random.Random(9).randbytes(16 * MiB)
    backend.http.clear()  # the bucket's creation
    writer = PackWriter(backend, PackIndex(), target=6 * MiB)  # over the client's 5 MiB multipart size
    pools = Pools(2)
    try:
        ingested = ingest_buffer(data, ChunkParams(), pools, writer.add)
    finally:
        pools.close()
    writer.flush()
    packs = [info.name for info in backend.list(PACKS)]
    assert len(packs) == 3
    assert backend.http["PUT"] == len(packs) + 1 and backend.http["POST"] == 0  # one request per pack
    backend.http.clear()

    index = PackIndex()
    index.refresh(backend)
    backend.http.clear()
    got = read_chunks(backend, index, [d for d, _ in ingested.chunks])
    assert b"".join(got[d] for d, _ in ingested.chunks) == data
    spans = plan_reads((d, index.locations(d)[0]) for d, _ in ingested.chunks)
    assert len(packs) <= len(spans) <= 16 * MiB // MAX_SPAN + len(packs)   # spans of MAX_SPAN, not chunks
    assert backend.http == Counter({"GET": len(spans)})   # one request per span: no client-side splitting


def test_a_chunk_damaged_on_s3_is_not_served(backend: _Counted) -> None:
    plain = random.Random(8).randbytes(64 << 10)
    writer = PackWriter(backend, PackIndex())
    pools = Pools(1)
    try:
        (digest, _), = ingest_buffer(plain, ChunkParams(min_size=64 << 10, avg_size=64 << 10, max_size=128 << 10),
                                     pools, writer.add).chunks
    finally:
        pools.close()
    writer.flush()
    index = PackIndex()
    index.refresh(backend)
    loc = index.locations(digest)[0]
    name = object_name("packs", loc.pack)
    damaged = bytearray(backend.get(name))
    damaged[loc.offset + 10] ^= 0x01
    backend.put(name, bytes(damaged))
    with pytest.raises(PackDamaged):
        read_chunk(backend, index, digest)
