"""GMemSeed: spec validation, status, fromSeed resolution, and the operator's seed
reconciler (inbox batches applied, sealed, compacted; spec changes stall; deletion drops)
over a filesystem store and a fake of memoplane's own Kube wrapper."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeKube
from memoplane_operator.gmemseed import SeedReconciler

from memoplane.api.conditions import get_condition
from memoplane.cluster import protocol as p
from memoplane.cluster import seeds as sd
from memoplane.cluster.resolve import LookupError_, Resolved, Waiting, resolve
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.gmem import GMem, GMemParams, GMemStore, Layer, seed_digest
from memoplane.gmem.transfer import load_overlay
from memoplane.jobs import BlobInput, Input, SeedInput

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RUNTIME = "b3:" + "ab" * 32
UID = "0b5f8a3e-1111-4222-8333-444455556666"
SEED = (p.GMEMSEEDS, "ml", "field")   # where FakeKube keeps the seed the reconciler tests use


def seed_obj(spec: dict[str, Any], generation: int = 1, name: str = "field") -> dict[str, Any]:
    return {"apiVersion": p.API_VERSION, "kind": "GMemSeed",
            "metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": generation},
            "spec": spec}


def ready_seed(digest: str, blob: tuple[str, int] | None = None) -> dict[str, Any]:
    obj = seed_obj({"seed": 1337, "layers": [{"seed": 7, "weight": 0.5}]})
    state = sd.SeedState(digest, 1, 1 if blob else 0, "s3://memoplane/ml", blob)
    obj["status"] = sd.ready({}, 1, state, T0)
    return obj


# -- pure decisions ------------------------------------------------------------------------------


def test_invalid_specs_name_the_field() -> None:
    assert "spec.seed" in str(sd.parse_seed(seed_obj({"dtype": "float64"})))
    assert "spec.dtype" in str(sd.parse_seed(seed_obj({"seed": 1, "dtype": "int8"})))
    xor = sd.parse_seed(seed_obj({"seed": 1, "dtype": "uint64", "layers": [{"seed": 2, "weight": 0.5}]}))
    assert isinstance(xor, str) and "uint64 layers combine by XOR" in xor
    weight = sd.parse_seed(seed_obj({"seed": 1, "layers": [{"seed": 2, "weight": -1}]}))
    assert isinstance(weight, str) and "positive" in weight
    assert sd.parse_seed(seed_obj({"seed": 1, "layers": [{"seed": 2, "weight": 0.5}]})) == \
        GMemParams(1, "float64", (Layer(2, 0.5),))


def test_status_patches_follow_kstatus() -> None:
    state = sd.SeedState("b3:" + "cd" * 32, 3, 120, "s3://memoplane/ml", ("b3:" + "ef" * 32, 1960))
    patch = sd.ready({}, 2, state, T0)
    assert (patch["digest"], patch["version"], patch["overlayEntries"]) == (state.digest, 3, 120)
    assert patch["overlayBlob"] == {"digest": "b3:" + "ef" * 32, "size": 1960} and patch["observedGeneration"] == 2
    assert get_condition(patch["conditions"], "Ready")["status"] == "True"  # type: ignore[index]
    assert sd.unchanged(patch, sd.ready(patch, 2, state, T0))
    stalled = sd.stalled(patch, 3, sd.REASON_PARAMS_CHANGED, "changed", T0)
    assert get_condition(stalled["conditions"], "Ready")["status"] == "False"  # type: ignore[index]
    assert get_condition(stalled["conditions"], "Stalled")["reason"] == "ParametersChanged"  # type: ignore[index]
    assert not sd.unchanged(patch, stalled)
    assert sd.compaction_due(sd.COMPACT_SEGMENTS, 0) and sd.compaction_due(1, sd.COMPACT_RECORDS)
    assert not sd.compaction_due(1, 10)


def test_seed_view_needs_a_ready_current_status() -> None:
    obj = seed_obj({"seed": 1})
    assert "not Ready" in str(sd.seed_view(obj))
    ready = ready_seed("b3:" + "12" * 32)
    view = sd.seed_view(ready)
    assert isinstance(view, sd.SeedView) and view.digest == "b3:" + "12" * 32 and view.overlay_blob is None
    ready["metadata"]["generation"] = 2
    assert "being reconciled" in str(sd.seed_view(ready))


class Lookups:
    def __init__(self, seeds: Mapping[str, dict[str, Any]]) -> None:
        self.seeds = dict(seeds)
        self.copied: list[tuple[str, str]] = []

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        return None

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return None

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        raise LookupError_("Nope", "no results here")

    def object_refusal(self, bucket: str, key: str) -> str | None:
        return None

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        return None

    def put_bytes(self, data: bytes) -> BlobInput:
        raise AssertionError("not used")

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.seeds.get(name)

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        self.copied.append((digest, store_url))
        if store_url == "s3://gone":
            raise LookupError_(p.REASON_STORE, "the store is unreachable")
        return BlobInput(digest, 99)


def job(offset: int = 0, count: int = 1000) -> dict[str, Any]:
    return {"apiVersion": p.API_VERSION, "kind": "ComputeJob",
            "metadata": {"name": "mc", "namespace": "ml", "generation": 1, "uid": "uid-mc",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"python": {"source": "def main(noise):\n    return float(noise.sum())\n"},
                     "inputs": [{"name": "noise", "fromSeed": {"name": "field", "offset": offset, "count": count}}]}}


def test_from_seed_resolves_to_the_status_digest_and_overlay() -> None:
    plain = resolve(job(), RUNTIME, Lookups({"field": ready_seed("b3:" + "01" * 32)}), T0)
    assert isinstance(plain, Resolved)
    got = plain.job.inputs["noise"]
    assert isinstance(got, SeedInput) and got.overlay is None and (got.offset, got.count) == (0, 1000)
    assert got.params == {"seed": 1337, "dtype": "float64", "layers": [{"seed": 7, "weight": 0.5}]}
    assert plain.input_digests == {"noise": "b3:" + "01" * 32}
    lookups = Lookups({"field": ready_seed("b3:" + "02" * 32, ("b3:" + "aa" * 32, 40))})
    written = resolve(job(), RUNTIME, lookups, T0)
    assert isinstance(written, Resolved) and written.job.key != plain.job.key
    assert written.job.inputs["noise"] == SeedInput(got.params, "b3:" + "02" * 32, 0, 1000, BlobInput("b3:" + "aa" * 32, 99))
    assert lookups.copied == [("b3:" + "aa" * 32, "s3://memoplane/ml")]
    other_range = resolve(job(offset=1000), RUNTIME, Lookups({"field": ready_seed("b3:" + "01" * 32)}), T0)
    assert isinstance(other_range, Resolved) and other_range.job.key != plain.job.key


def test_from_seed_waits_while_the_seed_is_not_ready() -> None:
    got = resolve(job(), RUNTIME, Lookups({"field": seed_obj({"seed": 1})}), T0)
    assert isinstance(got, Waiting) and got.reason == sd.REASON_SEED_NOT_READY and "not Ready" in got.message
    missing = resolve(job(), RUNTIME, Lookups({}), T0)
    assert isinstance(missing, Waiting) and missing.reason == p.REASON_NOT_FOUND
    gone = ready_seed("b3:" + "02" * 32, ("b3:" + "aa" * 32, 40))
    gone["status"]["store"] = "s3://gone"
    got = resolve(job(), RUNTIME, Lookups({"field": gone}), T0)
    assert isinstance(got, Waiting) and got.reason == p.REASON_STORE


# -- the operator's seed reconciler ---------------------------------------------------------------


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[tuple[SeedReconciler, FakeKube, Stores]]:
    kube = FakeKube()
    stores = Stores(StoreSettings(root=str(tmp_path / "s3")))
    seeds = SeedReconciler(kube, stores, [])
    try:
        yield seeds, kube, stores
    finally:
        seeds.stop()
        stores.close()


def put_batch(stores: Stores, params: GMemParams, addrs: list[int], values: list[float], n: int) -> str:
    data = sd.encode_batch(params, np.array(addrs, dtype=np.uint64), np.array(values))
    return GMemStore.of(stores.get(*sd.location("ml"))).queue_batch(sd.store_name(UID), data, n, "t")


def status(kube: FakeKube) -> dict[str, Any]:
    found: dict[str, Any] = kube.objects[SEED]["status"]
    return found


def test_batches_are_applied_sealed_compacted_and_published(operator: Any) -> None:
    seeds, kube, stores = operator
    params = GMemParams(1337, "float64", (Layer(7, 0.5),))
    kube.objects[SEED] = seed_obj({"seed": 1337, "layers": [{"seed": 7, "weight": 0.5}]})
    seeds.reconcile("ml", "field")
    assert status(kube)["digest"] == seed_digest(params) and status(kube)["version"] == 0
    assert status(kube)["store"] == "s3://memoplane/ml" and "overlayBlob" not in status(kube)
    expected = GMem(1337, "float64", [Layer(7, 0.5)])
    backend = stores.get(*sd.location("ml")).backend
    for i in range(sd.COMPACT_SEGMENTS):
        batch = put_batch(stores, params, [i, 1000 + i], [0.5, 0.25], i + 1)
        expected.write_many([i, 1000 + i], [0.5, 0.25])
        seeds.reconcile("ml", "field")
        assert not backend.exists(batch)  # applied, then forgotten
        assert status(kube)["digest"] == seed_digest(params, expected.overlay)
        assert status(kube)["version"] == i + 1 and status(kube)["overlayEntries"] == 2 * (i + 1)
    names = sorted(info.name.rsplit("/", 1)[1] for info in backend.list(f"gmem/{sd.store_name(UID)}/"))
    assert names == ["params.json", f"snapshot-{sd.COMPACT_SEGMENTS:016d}"]  # compacted: logs dropped
    blob = status(kube)["overlayBlob"]
    data = stores.get(*sd.location("ml")).get_bytes(blob["digest"])
    assert seed_digest(params, load_overlay(data, "float64")) == status(kube)["digest"]
    # A restarted operator reads the same state back from the store.
    fresh = SeedReconciler(kube, stores, [])
    before = copy.deepcopy(status(kube))
    fresh.reconcile("ml", "field")
    fresh.stop()
    assert {k: v for k, v in status(kube).items() if k != "conditions"} == \
        {k: v for k, v in before.items() if k != "conditions"}
    assert [e.reason for e in kube.events].count("OverlayUpdated") == 1 + sd.COMPACT_SEGMENTS  # the first: created


def test_foreign_batches_are_rejected_and_spec_changes_stall(operator: Any) -> None:
    seeds, kube, stores = operator
    kube.objects[SEED] = seed_obj({"seed": 5})
    seeds.reconcile("ml", "field")
    digest = status(kube)["digest"]
    put_batch(stores, GMemParams(6), [1], [0.5], 1)  # written for other parameters
    seeds.reconcile("ml", "field")
    assert status(kube)["digest"] == digest and ("WriteRejected" in {e.reason for e in kube.events})
    put_batch(stores, GMemParams(5), [1], [0.5], 2)
    seeds.reconcile("ml", "field")
    assert status(kube)["overlayEntries"] == 1
    kube.objects[SEED]["spec"] = {"seed": 6}
    kube.objects[SEED]["metadata"]["generation"] = 2
    seeds.reconcile("ml", "field")
    stalled = get_condition(status(kube)["conditions"], "Stalled")
    assert stalled is not None and stalled["reason"] == sd.REASON_PARAMS_CHANGED and "delete and recreate" in \
        stalled["message"]
    assert status(kube)["observedGeneration"] == 2
    kube.objects[SEED]["spec"] = {"seed": 5}
    kube.objects[SEED]["metadata"]["generation"] = 3
    seeds.reconcile("ml", "field")
    assert get_condition(status(kube)["conditions"], "Ready")["status"] == "True"  # type: ignore[index]
    assert status(kube)["overlayEntries"] == 1 and get_condition(status(kube)["conditions"], "Stalled") is None
    kube.objects[SEED]["spec"] = {"seed": 5, "dtype": "uint64", "layers": [{"seed": 1, "weight": 2.0}]}
    seeds.reconcile("ml", "field")
    assert get_condition(status(kube)["conditions"], "Stalled")["reason"] == p.REASON_INVALID  # type: ignore[index]


def test_deletion_drops_the_overlay(operator: Any) -> None:
    seeds, kube, stores = operator
    kube.objects[SEED] = seed_obj({"seed": 5})
    seeds.reconcile("ml", "field")
    put_batch(stores, GMemParams(5), [1], [0.5], 1)
    seeds.reconcile("ml", "field")
    put_batch(stores, GMemParams(5), [2], [0.5], 2)  # still in the inbox
    seeds.drop(kube.objects.pop(SEED))
    assert list(stores.get(*sd.location("ml")).backend.list(f"gmem/{sd.store_name(UID)}/")) == []
