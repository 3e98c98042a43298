"""@memoize: keys by content, one computation per key, verified reads."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes import damage_packed_chunks

import memoplane
from memoplane.errors import InputError
from memoplane.fingerprint import fingerprint

CALLS: list[tuple] = []


def _make(store: Path, **options):
    @memoplane.memoize(store=store, **options)
    def total(rows, scale=1.0, verbose=False):
        CALLS.append((rows, scale))
        return {"total": float(np.sum(rows)) * scale}

    return total


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def test_second_call_is_a_hit(tmp_path: Path) -> None:
    total = _make(tmp_path)
    assert total([1, 2, 3], 2.0) == {"total": 12.0}
    assert total([1, 2, 3], 2.0) == {"total": 12.0}
    assert len(CALLS) == 1


def test_hit_survives_a_new_process_state(tmp_path: Path) -> None:
    _make(tmp_path)([1, 2], 3.0)
    fresh = _make(tmp_path, memory_bytes=0)  # nothing in memory: served from the store
    assert fresh([1, 2], 3.0) == {"total": 9.0}
    assert len(CALLS) == 1


def test_binding_positional_and_keyword_is_one_call(tmp_path: Path) -> None:
    total = _make(tmp_path)
    assert total.key([1], 1.0) == total.key(rows=[1], scale=1.0) == total.key([1])


def test_arguments_change_the_key(tmp_path: Path) -> None:
    total = _make(tmp_path)
    assert total.key([1, 2]) != total.key([1, 3])
    assert total.key([1, 2]) != total.key((1, 2))
    assert total.key([1, 2], 1.0) != total.key([1, 2], 1)


def test_ignore_leaves_an_argument_out(tmp_path: Path) -> None:
    total = _make(tmp_path, ignore=["verbose"])
    assert total.key([1], verbose=True) == total.key([1], verbose=False)


def test_ignore_names_must_be_parameters(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not parameters"):
        _make(tmp_path, ignore=["nope"])


def test_version_salt_changes_the_key(tmp_path: Path) -> None:
    assert _make(tmp_path).key([1]) != _make(tmp_path, version="2").key([1])


def test_arrays_by_content_not_identity(tmp_path: Path) -> None:
    total = _make(tmp_path)
    a = np.arange(1000, dtype=np.float64)
    assert total.key(a) == total.key(a.copy())
    b = a.copy()
    b[500] += 1
    assert total.key(a) != total.key(b)
    assert total.key(a) != total.key(a.astype(np.float32))
    assert fingerprint(a) != fingerprint(a.reshape(10, 100))


def test_frames_by_content(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    assert fingerprint(frame) == fingerprint(frame.copy())
    assert fingerprint(frame) != fingerprint(frame.assign(y=["a", "b", "d"]))
    assert fingerprint(frame) != fingerprint(frame.rename(columns={"x": "z"}))


def test_unhashable_argument_names_the_parameter(tmp_path: Path) -> None:
    total = _make(tmp_path)
    with pytest.raises(InputError, match=r"rows=\.\.\."):
        total(object())


def test_return_types_round_trip(tmp_path: Path) -> None:
    @memoplane.memoize(store=tmp_path, memory_bytes=0)
    def produce(kind: str):
        return {"json": [1, "a", None], "bytes": b"\x00\x01", "array": np.arange(6).reshape(2, 3),
                "tuple": (1, 2)}[kind]

    for kind in ("json", "bytes", "array", "tuple"):
        first, second = produce(kind), produce(kind)
        if kind == "array":
            np.testing.assert_array_equal(first, second)
            assert second.shape == (2, 3)
        else:
            assert first == second and type(first) is type(second)


def test_mutating_a_result_does_not_change_the_next_hit(tmp_path: Path) -> None:
    total = _make(tmp_path)
    first = total([1])
    first["total"] = -1
    assert total([1]) == {"total": 1.0}


def test_exceptions_are_not_cached(tmp_path: Path) -> None:
    attempts = []

    @memoplane.memoize(store=tmp_path)
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise RuntimeError("first time fails")
        return x

    with pytest.raises(RuntimeError):
        flaky(1)
    assert flaky(1) == 1 and flaky(1) == 1
    assert len(attempts) == 2


def test_corrupted_store_recomputes(tmp_path: Path) -> None:
    @memoplane.memoize(store=tmp_path, memory_bytes=0)
    def big(n: int) -> bytes:
        CALLS.append((n,))
        return bytes(range(256)) * n

    assert big(4096) == bytes(range(256)) * 4096
    assert damage_packed_chunks(tmp_path) > 0
    assert big(4096) == bytes(range(256)) * 4096
    assert len(CALLS) == 2


def _count_in_child(store: str, counter: str) -> None:
    @memoplane.memoize(store=store)
    def slow(x: int) -> int:
        with open(counter, "a") as handle:
            handle.write("x")
        import time

        time.sleep(0.3)
        return x * 2

    assert slow(21) == 42


def test_concurrent_processes_compute_once(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_count_in_child, args=(str(tmp_path / "store"), str(counter))) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert counter.read_text() == "x"
