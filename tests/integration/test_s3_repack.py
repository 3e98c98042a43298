"""Repacking GC on the S3 backend (the local MinIO): both passes under concurrent writers, a
writer killed (SIGKILL) before its segment, a GC process killed mid-repack and one stopped in
pass 2, each finished by the next run; every live chunk stays readable and verified, and dead
bytes are gone after pass 2. Scenarios: tests/repack_scenarios.py."""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from repack_scenarios import GRACE, WRITE, Crash, Dying, later, next_second, run_killed, seeded, spec_of, wait_for

from memoplane.cas import S3Backend
from memoplane.cas.packs import INDEX, PACKS
from memoplane.cas.s3 import make_client
from memoplane.testing import cluster


@pytest.fixture
def backend(control_plane: cluster.ClusterInfo) -> Iterator[S3Backend]:
    env = control_plane.env()
    client = make_client(env["MEMOPLANE_S3_ENDPOINT"], env["MEMOPLANE_S3_ACCESS_KEY"],
                         env["MEMOPLANE_S3_SECRET_KEY"])
    bucket = f"mp-repack-{secrets.token_hex(6)}"
    b = S3Backend(client, bucket, "team/")
    b.ensure_bucket()
    yield b
    for obj in client.list_objects(bucket, recursive=True):
        if obj.object_name:
            client.remove_object(bucket, obj.object_name)
    client.remove_bucket(bucket)


def test_concurrent_writers_lose_nothing_across_both_passes_on_s3(backend: S3Backend) -> None:
    s = seeded(backend)
    t0 = next_second()
    stop = threading.Event()
    cycles = [0, 0]
    errors: list[Exception] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        try:
            while not stop.is_set():
                s.write([rng.randrange(90) for _ in range(6)] + [f"s3-{n}-{cycles[n]}-{i}" for i in range(4)])
                cycles[n] += 1
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(cycles) >= 2, "the writers to get going")
        first = s.gc(t0 + GRACE)
        assert first.packs_condemned > 0
        t1 = next_second()
        seen = list(cycles)
        wait_for(lambda: all(c >= n + 2 for c, n in zip(cycles, seen, strict=True)), "two cycles per writer")
        assert s.gc(t1 + GRACE).packs_deleted >= first.packs_condemned
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    s.check_live()
    s.gc(later())
    s.gc(later())
    assert s.worth_repacking() == set() and s.unindexed() == set() and s.tombstones() == 0
    s.check_live()


def test_a_writer_killed_before_its_segment_on_s3(backend: S3Backend) -> None:
    s = seeded(backend)
    run_killed("write", json.dumps(spec_of(backend)), "3", "12")
    orphans = s.unindexed()
    assert orphans
    assert s.gc(time.time()).packs_deleted == 0 and s.unindexed() == orphans  # young: kept
    s.gc(later())
    s.gc(later())
    assert s.unindexed() == set() and s.dead_in_packs() == set()
    s.check_live()


def test_a_gc_killed_mid_repack_and_stopped_in_pass_2_on_s3(backend: S3Backend, tmp_path: Path) -> None:
    s = seeded(backend)
    before = s.pack_bytes()
    live = tmp_path / "live.json"
    live.write_text(json.dumps(sorted(s.mark())))
    run_killed("gc", json.dumps(spec_of(backend)), str(live), WRITE, PACKS, "2", str(later()))
    assert s.unindexed()
    s.check_live()
    s.gc(later())  # pass 1, and the killed run's pack deleted
    with pytest.raises(Crash):
        s.gc(later(), Dying(backend, "delete", INDEX, 1))  # pass 2 stopped after its consolidated segment
    s.check_live()
    s.gc(later())
    assert s.dead_in_packs() == set() and s.unindexed() == set() and s.tombstones() == 0
    assert s.pack_bytes() < before
    s.check_live()
