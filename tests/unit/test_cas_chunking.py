"""The ingest pipeline (cas/chunking.py): windows, the batch queue and its helpers must not
change a boundary or a digest, whatever the window size, the number of threads or the
way the content arrives."""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Callable, Iterator

import blake3
import pytest

from memoplane.cas import chunking
from memoplane.cas.chunking import ChunkParams, Ingested, Pools, decode_chunk, ingest_buffer, ingest_stream
from memoplane.cas.digests import PREFIX

KiB = 1 << 10
PARAMS = ChunkParams()


def content(size: int, seed: int) -> bytes:
    """Compressible, with cut points: words from a small vocabulary."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def one_pass(data: bytes) -> list[tuple[str, int]]:
    """The reference: FastCDC over the whole content at once, blake3 of every chunk."""
    return [(PREFIX + blake3.blake3(c.data).hexdigest(), c.length) for c in PARAMS.chunker().cut_buf(data)]


@pytest.fixture
def pools() -> Iterator[Pools]:
    p = Pools(3)
    yield p
    p.close()


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # many windows per blob: carries, backpressure and the hash thread's ordering all run
    monkeypatch.setattr(chunking, "WINDOW", 192 * KiB)


def check(got: Ingested, data: bytes) -> None:
    assert got.digest == PREFIX + blake3.blake3(data).hexdigest()
    assert got.size == len(data)
    assert got.chunks == one_pass(data)


@pytest.mark.usefixtures("small_windows")
@pytest.mark.parametrize("size", [0, 1, 16 * KiB, 192 * KiB, 384 * KiB, 384 * KiB + 1, 3 * 1024 * KiB + 5])
def test_buffer_and_stream_cut_as_one_pass_does(pools: Pools, size: int) -> None:
    data = content(size, size)
    check(ingest_buffer(data, PARAMS, pools, None), data)
    check(ingest_buffer(memoryview(bytearray(data)), PARAMS, pools, None), data)
    check(ingest_stream(io.BytesIO(data), PARAMS, pools, None), data)


def test_default_window_keeps_boundaries_across_windows(pools: Pools) -> None:
    data = content(2 * chunking.WINDOW + 300 * KiB, 7)
    check(ingest_buffer(data, PARAMS, pools, None), data)


@pytest.mark.usefixtures("small_windows")
def test_each_new_chunk_is_put_once_with_its_stored_form(pools: Pools) -> None:
    data = content(2 * 1024 * KiB, 3) * 2  # the second half repeats the first: its chunks are known
    stored: dict[str, bytes] = {}
    lock = threading.Lock()

    def put(digest: str, encode: Callable[[], bytes], plain: int) -> bool:
        with lock:
            if digest in stored:
                return False
            stored[digest] = encode()
        assert len(decode_chunk(stored[digest])) == plain
        return True

    got = ingest_buffer(data, PARAMS, pools, put)
    check(got, data)
    assert got.new_chunks == len(stored) == len(set(got.chunks))
    for d, _ in got.chunks:
        assert PREFIX + blake3.blake3(decode_chunk(stored[d])).hexdigest() == d


@pytest.mark.usefixtures("small_windows")
def test_a_failing_put_fails_the_ingest(pools: Pools) -> None:
    def put(digest: str, encode: Callable[[], bytes], plain: int) -> bool:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ingest_stream(io.BytesIO(content(1024 * KiB, 4)), PARAMS, pools, put)
    data = content(1024 * KiB, 5)  # the pools still work afterwards
    check(ingest_buffer(data, PARAMS, pools, None), data)


@pytest.mark.usefixtures("small_windows")
def test_concurrent_ingests_share_the_pools(pools: Pools) -> None:
    blobs = [content(1024 * KiB + i * 4099, 10 + i) for i in range(4)]
    results: dict[int, Ingested] = {}

    def run(i: int) -> None:
        results[i] = ingest_stream(io.BytesIO(blobs[i]), PARAMS, pools, None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, data in enumerate(blobs):
        check(results[i], data)


def test_a_frame_declaring_more_than_any_chunk_is_refused_before_it_is_decompressed() -> None:
    import zstandard

    from memoplane.cas.chunking import MAX_CHUNK_PLAIN, ZSTD, ChunkDecodeError

    bomb = ZSTD + zstandard.ZstdCompressor().compress(bytes(MAX_CHUNK_PLAIN + 1))  # ~1 KiB declaring 16 MiB + 1
    with pytest.raises(ChunkDecodeError, match="declares"):
        decode_chunk(bomb)
    fine = ZSTD + zstandard.ZstdCompressor().compress(bytes(1000))
    assert decode_chunk(fine) == bytes(1000)
