"""fromSeed inputs: a job gets exactly GMem(...).fetch_range, generated where it runs;
the seed's digest (parameters + overlay) is in the key."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memoplane.cas import FilesystemBackend, Store
from memoplane.errors import StoreCorrupted
from memoplane.execute import execute
from memoplane.gmem import GMem, GMemParams, Layer, Overlay, seed_digest
from memoplane.gmem.transfer import load_overlay, overlay_npy
from memoplane.jobs import BlobInput, CommandCode, Job, JsonInput, PythonCode, SeedInput, job_from_dict, job_to_dict
from memoplane.sandbox import Limits, SandboxPool

PARAMS = GMemParams(1337, "float64", (Layer(7, 0.5),))


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(size=1) as p:
        yield p


def seed_input(store: Store, overlay: Overlay | None, offset: int, count: int,
               params: GMemParams = PARAMS) -> SeedInput:
    data = overlay_npy(overlay) if overlay is not None else None
    blob = None
    if data is not None:
        ref = store.put_bytes(data)
        blob = BlobInput(ref.digest, ref.size)
    return SeedInput(params.to_json(), seed_digest(params, overlay), offset, count, blob)


def load(store: Store, digest: str) -> np.ndarray:
    return np.load(io.BytesIO(store.get_bytes(digest)), allow_pickle=False)


def job(source: str, **inputs: SeedInput | JsonInput) -> Job:
    return Job(PythonCode(source), inputs=inputs, limits=Limits(timeout_s=30))


RETURN = "def main(noise):\n    return noise\n"


def test_a_job_gets_exactly_the_generated_range(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    run = execute(job(RETURN, noise=seed_input(store, None, 10**12, 5000)), store, pool)
    assert run.outcome.ok, run.failure
    got = load(store, run.result.value.blob.digest)  # type: ignore[union-attr]
    expected = GMem(1337, "float64", [Layer(7, 0.5)]).fetch_range(10**12, 5000)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_with_an_overlay_and_the_key_follows_it(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    source = "def main(noise, scale):\n    return float(noise.sum()) * scale\n"
    plain = job(source, noise=seed_input(store, None, 0, 1000), scale=JsonInput(2))
    g = GMem(1337, "float64", [Layer(7, 0.5)])
    g.write_many([3, 999, 5000], [0.25, 0.5, 0.75])
    written = job(source, noise=seed_input(store, g.overlay, 0, 1000), scale=JsonInput(2))
    assert plain.key != written.key
    run = execute(written, store, pool)
    assert run.outcome.ok, run.failure
    assert run.outcome.value == float(g.fetch_range(0, 1000).sum()) * 2
    # The same overlay written in another order is the same seed: the same key.
    again = GMem(1337, "float64", [Layer(7, 0.5)])
    again.write_many([5000, 999], [0.75, 0.5])
    again.write(3, 0.25)
    assert job(source, noise=seed_input(store, again.overlay, 0, 1000), scale=JsonInput(2)).key == written.key
    # Another range is another input.
    assert job(source, noise=seed_input(store, g.overlay, 1, 1000), scale=JsonInput(2)).key != written.key


def test_float32_and_uint64_seeds(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    for dtype in ("float32", "uint64"):
        params = GMemParams(99, dtype)  # type: ignore[arg-type]
        g = GMem(99, dtype)  # type: ignore[arg-type]
        g.write_many([1], [7 if dtype == "uint64" else 0.5])
        run = execute(job(RETURN, noise=seed_input(store, g.overlay, 0, 300, params)), store, pool)
        assert run.outcome.ok, run.failure
        got = load(store, run.result.value.blob.digest)  # type: ignore[union-attr]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, g.fetch_range(0, 300))


def test_command_jobs_find_the_values_in_a_file(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    cmd = Job(CommandCode(("sh", "-c", 'cp "$MEMOPLANE_IN/noise" "$MEMOPLANE_OUT/noise.npy"')),
              inputs={"noise": seed_input(store, None, 5, 100)})
    run = execute(cmd, store, pool)
    assert run.outcome.ok, run.failure
    assert run.result is not None and run.result.output_tree is not None
    entry = store.get_tree(run.result.output_tree.digest).entries["noise.npy"]
    np.testing.assert_array_equal(load(store, str(entry.digest)), GMem(1337, "float64", [Layer(7, 0.5)])
                                  .fetch_range(5, 100))


def test_an_overlay_that_does_not_match_the_digest_is_refused(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    g = GMem(1337, "float64", [Layer(7, 0.5)])
    g.write_many([1], [0.5])
    honest = seed_input(store, g.overlay, 0, 10)
    forged = SeedInput(honest.params, seed_digest(PARAMS, None), 0, 10, honest.overlay)  # claims: no writes
    with pytest.raises(StoreCorrupted, match="do not hash"):
        execute(job(RETURN, noise=forged), store, pool)


def test_bad_ranges_fail_the_job_clearly(pool: SandboxPool, tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    run = execute(job(RETURN, noise=seed_input(store, None, 2**64 - 1, 2)), store, pool)
    assert not run.outcome.ok and run.failure is not None
    assert run.failure.reason == "bad-input" and "2^64" in run.failure.message


def test_manifest_round_trip_keeps_the_key(tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store"))
    g = GMem(1337, "float64", [Layer(7, 0.5)])
    g.write_many([1, 2], [0.5, 0.25])
    j = job(RETURN, noise=seed_input(store, g.overlay, 4, 8))
    back = job_from_dict(job_to_dict(j))
    assert back.inputs == j.inputs and back.key == j.key
    assert job_to_dict(j)["inputs"]["noise"]["seed"]["overlay"]["digest"] == j.inputs["noise"].overlay.digest  # type: ignore[union-attr]
    # A v1 manifest without seeds reads as before.
    old = job_to_dict(job(RETURN, noise=JsonInput([1])))
    assert job_from_dict(old).inputs["noise"] == JsonInput([1])


def test_overlay_file_round_trip() -> None:
    g = GMem(5, "float32")
    g.write_many([9, 2**64 - 1], [0.5, 0.125])
    data = overlay_npy(g.overlay)
    assert data is not None and overlay_npy(Overlay(np.dtype(np.float32))) is None
    back = load_overlay(data, "float32")
    assert seed_digest(GMemParams(5, "float32"), back) == seed_digest(GMemParams(5, "float32"), g.overlay)
