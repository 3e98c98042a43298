"""What a /v1/run hit on Kubernetes keeps between calls: reads reused for a bounded time, and the
caches' stores kept open (bounded; one pushed out is closed once no call reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memoplane.cas import Store, open_backend
from memoplane.cluster import protocol as p
from memoplane.server.cluster_runs import OpenStores, Recent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_read_is_reused_for_its_seconds_and_read_again_after() -> None:
    clock, reads = Clock(), []
    recent = Recent(2.0, clock)

    def read() -> str:
        reads.append(clock.now)
        return f"policy-{len(reads)}"

    assert recent.get("ns", read) == "policy-1"
    clock.now += 1.9
    assert recent.get("ns", read) == "policy-1" and reads == [100.0]
    clock.now += 0.1   # 2 s after the first read began: the revoked key it missed is read now
    assert recent.get("ns", read) == "policy-2" and reads == [100.0, 102.0]
    assert recent.get("other", read) == "policy-3"


def test_nothing_there_and_a_failed_read_are_not_kept() -> None:
    recent, values = Recent(60.0, Clock()), iter([None, "made"])
    assert recent.get("ns", lambda: next(values)) is None
    assert recent.get("ns", lambda: next(values)) == "made"   # the cache the operator made since

    def unusable() -> str:
        raise RuntimeError("minSignatures: 2 signers needed, 1 key(s)")

    with pytest.raises(RuntimeError):
        recent.get("bad", unusable)
    assert recent.get("bad", lambda: "fixed") == "fixed"


class Recorded(Store):
    closed: list[str]

    def close(self) -> None:
        self.closed.append(str(self.backend))
        super().close()


def cache(prefix: str) -> dict[str, Any]:
    return {"apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": "default", "namespace": prefix},
            "spec": {"store": {"bucket": "b", "prefix": prefix}}}


def test_a_store_is_opened_once_and_one_pushed_out_is_closed_when_no_call_reads_it(tmp_path: Path) -> None:
    opened: list[str] = []
    closed: list[str] = []

    def opener(rc: dict[str, Any]) -> Store:
        prefix = rc["spec"]["store"]["prefix"]
        opened.append(prefix)
        store = Recorded(open_backend(tmp_path / prefix))
        store.closed = closed
        return store

    stores = OpenStores(size=2, opener=opener)
    with stores.borrowed(cache("a")) as a:
        with stores.borrowed(cache("a")) as again:
            assert again is a
        with stores.borrowed(cache("b")), stores.borrowed(cache("c")):   # "a" is pushed out while read
            assert opened == ["a", "b", "c"] and closed == []
    assert len(closed) == 1 and closed[0] == str(a.backend)   # once its last reader is done
    with stores.borrowed(cache("a")) as reopened:
        assert reopened is not a and opened == ["a", "b", "c", "a"]
    stores.close()
    assert len(closed) == 4   # b pushed out by the new a; c and a at shutdown
