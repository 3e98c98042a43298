"""trust.reexecute's pure decisions (memoplane.cluster.spotcheck), the store's part (withdrawing
a disputed ref, the streaks), and the agent's part (vouching for a served result it reproduced)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakes import computed_result
from memoplane_agent.replica import store_replica

from memoplane.cas import FilesystemBackend, ResultManifest, Store
from memoplane.cluster import mapping
from memoplane.cluster import protocol as p
from memoplane.cluster import replicas as rp
from memoplane.cluster import spotcheck as sc
from memoplane.jobs import Job, PythonCode
from memoplane.trust import SigningKey, TrustPolicy
from memoplane.trust.attestation import attest

R1 = "b3:" + "11" * 32
D1, D2 = "b3:" + "d1" * 32, "b3:" + "d2" * 32
KEY = "b3:" + "aa" * 32


def served(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "sum", "namespace": "ml", "uid": "u-sum", "generation": 1},
            "spec": {"python": {"source": "def main(): return 1"}, "cache": {"version": "v1"}},
            "status": {"phase": "Succeeded", "cacheKey": KEY, "observedGeneration": 1, "result": {"digest": D1},
                       **status}}


def check(phase: str | None = "Succeeded", digest: str | None = D1, judged: str | None = None) -> dict[str, Any]:
    manifest = sc.check_manifest(served(), D1, ["node-a"])
    meta = {**manifest["metadata"], "uid": "u-check", "generation": 1}
    if judged:
        meta["annotations"] = {**meta["annotations"], sc.JUDGED_ANNOTATION: judged}
    status: dict[str, Any] = {"phase": phase, "cacheKey": KEY, "observedGeneration": 1, "node": "node-b"}
    if digest:
        status["result"] = {"digest": digest}
    return {**manifest, "metadata": meta, "status": status}


# -- which hits are checked --------------------------------------------------------------------

ADAPTIVE, FIXED = sc.Reexecute(0.4), sc.Reexecute(0.4, adaptive=False)


@pytest.mark.parametrize(("wanted", "streak", "want"), [
    (FIXED, sc.Streak(), 0.4),
    (FIXED, sc.Streak(streak=50), 0.4),                        # not adaptive: the fraction, always
    (FIXED, sc.Streak(probation=3), 0.4),
    (ADAPTIVE, sc.Streak(), 0.4),                              # a new pair: the fraction
    (ADAPTIVE, sc.Streak(streak=sc.HALVING), 0.2),             # N agreements in a row halve it
    (ADAPTIVE, sc.Streak(streak=2 * sc.HALVING), 0.1),
    (ADAPTIVE, sc.Streak(streak=sc.HALVING // 2), 0.4 / 2 ** 0.5),
    (ADAPTIVE, sc.Streak(streak=1000), 0.4 * sc.FLOOR_SHARE),  # never below the floor
    (ADAPTIVE, sc.Streak(streak=1000, probation=1), 1.0),      # after a dispute: every hit
])
def test_probability(wanted: sc.Reexecute, streak: sc.Streak, want: float) -> None:
    assert sc.probability(wanted, streak) == pytest.approx(want)


def test_the_least_proven_attesting_pair_decides() -> None:
    streaks = {sc.pair("node-a", R1): sc.Streak(streak=100), sc.pair("node-b", R1): sc.Streak(streak=sc.HALVING)}
    assert sc.chance(ADAPTIVE, streaks, [sc.pair("node-a", R1)]) == pytest.approx(0.4 * sc.FLOOR_SHARE)
    assert sc.chance(ADAPTIVE, streaks, [sc.pair("node-a", R1), sc.pair("node-b", R1)]) == pytest.approx(0.2)
    assert sc.chance(ADAPTIVE, streaks, [sc.pair("node-c", R1)]) == pytest.approx(0.4)   # unknown: the fraction
    assert sc.chance(ADAPTIVE, streaks, [sc.pair("node-a", "b3:" + "22" * 32)]) == pytest.approx(0.4)  # per runtime
    assert sc.chance(ADAPTIVE, streaks, []) == pytest.approx(0.4)


def test_the_draw_is_deterministic_and_a_fraction_of_one_checks_every_hit() -> None:
    seeds = [sc.seed_of({"metadata": {"uid": f"u-{i}"}}, KEY) for i in range(2000)]
    assert [sc.draw(s) for s in seeds] == [sc.draw(s) for s in seeds]
    assert all(0.0 <= sc.draw(s) < 1.0 for s in seeds)
    assert all(sc.should_check(sc.Reexecute(1.0), {}, [], s) for s in seeds)
    share = sum(sc.should_check(FIXED, {}, [], s) for s in seeds) / len(seeds)
    assert 0.35 < share < 0.45


def test_agreement_lowers_the_rate_and_a_dispute_restores_it() -> None:
    streaks: dict[str, sc.Streak] = {}
    pair = sc.pair("node-a", R1)
    checked = []
    for i in range(400):  # the pair agrees every time it is checked
        hit = sc.should_check(ADAPTIVE, streaks, [pair], f"u-{i}:{KEY}")
        checked.append(hit)
        if hit:
            streaks[pair] = sc.agreed(streaks.get(pair, sc.NO_STREAK))
    assert sum(checked[:100]) > 2 * sum(checked[300:])
    assert sum(checked[300:]) >= 1                       # the floor: never zero
    streaks[pair] = sc.disputed(streaks[pair])
    assert streaks[pair].streak == 0 and streaks[pair].disputes == 1
    for _ in range(sc.PROBATION):                         # on probation: every hit is checked
        assert sc.chance(ADAPTIVE, streaks, [pair]) == 1.0
        streaks[pair] = sc.agreed(streaks[pair])
    assert sc.chance(ADAPTIVE, streaks, [pair]) < 1.0


def test_streaks_round_trip_and_garbage_counts_as_none() -> None:
    streaks = {sc.pair("node-a", R1): sc.Streak(3, 1, 9, 2), sc.pair("node-b", R1): sc.Streak()}
    assert sc.decode(sc.encode(streaks)) == streaks
    for bad in (None, b"", b"{", b"[]", b'{"pairs": {"x": 3}}'):
        assert sc.decode(bad) == {}


# -- the check -------------------------------------------------------------------------------------


def test_a_check_is_a_replica_of_the_served_job_away_from_the_attesting_nodes() -> None:
    made = sc.check_manifest(served(), D1, ["node-b", "node-a"])
    assert made["metadata"]["name"] == "sum-check"
    assert rp.is_replica(made) and sc.is_check(made) and not sc.is_check(served())
    assert made["spec"]["cache"]["policy"] == "Bypass" and "verify" not in made["spec"]
    assert sc.checked_digest(made) == D1 and sc.checked_digest(served()) is None
    assert sc.avoided(made) == {"node-a", "node-b"} and sc.avoided(served()) == frozenset()
    assert made["metadata"]["ownerReferences"][0]["uid"] == "u-sum" and sc.served_name(made) == "sum"
    assert rp.sibling_names(made) == []                     # no replica siblings to keep away from
    assert len(sc.check_name("x" * 300)) <= 253


def test_a_map_elements_check_is_the_elements_job_owned_by_the_parent_one_name_per_element_key() -> None:
    parent = {**served(), "spec": {**served()["spec"], "inputs": [{"name": "x", "value": [1, 2]}],
                                   "map": {"over": "x"}}}
    element = {**parent, "spec": mapping.child_spec(parent, 2)}
    name = sc.element_check_name("sum", KEY)
    made = sc.check_manifest(element, D1, ["node-a"], name)
    assert made["metadata"]["name"] == name == "sum-aaaaaaaaaa-check"
    assert made["spec"]["inputs"] == [{"name": "x", "value": 2}] and "map" not in made["spec"]
    assert made["spec"]["cache"]["policy"] == "Bypass" and sc.checked_digest(made) == D1
    assert sc.served_name(made) == "sum" and sc.avoided(made) == {"node-a"}
    assert sc.element_check_name("sum", "b3:" + "bb" * 32) != name                 # one per element key
    assert name != mapping.batch_name("sum", [KEY]) and name != sc.check_name("sum")
    assert len(sc.element_check_name("x" * 300, KEY)) <= 253


@pytest.mark.parametrize(("obj", "expected", "want"), [
    (check(digest=D1), D1, sc.AGREED),
    (check(digest=D2), D1, sc.DISPUTED),
    (check(phase="Failed", digest=None), D1, sc.FAILED),
    (check(digest=D1), None, sc.FAILED),                   # the served result cannot be read
])
def test_verdict(obj: dict[str, Any], expected: str | None, want: str) -> None:
    assert sc.verdict(obj, expected) == want


def test_a_settled_check_awaits_its_verdict_once() -> None:
    assert sc.awaiting_verdict(check())
    assert not sc.awaiting_verdict(check(judged=sc.AGREED))
    assert not sc.awaiting_verdict(check(phase="Running", digest=None))
    assert not sc.awaiting_verdict(served())


def test_still_served() -> None:
    assert sc.still_served(served(), D1)
    assert not sc.still_served(served(), D2)
    assert not sc.still_served(served(phase="Failed"), D1)
    assert not sc.still_served({**served(), "metadata": {**served()["metadata"], "generation": 2}}, D1)


def test_reexecute_of_a_cache() -> None:
    assert sc.reexecute_of({"spec": {"trust": {"reexecute": {"fraction": 0.05}}}}) == sc.Reexecute(0.05, True)
    assert sc.reexecute_of({"spec": {"trust": {"reexecute": {"fraction": 1, "adaptive": False}}}}) == \
        sc.Reexecute(1.0, False)
    assert sc.reexecute_of({"spec": {"trust": {}}}) is None and sc.reexecute_of({"spec": {}}) is None


# -- the store and the agent -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FilesystemBackend(tmp_path / "store", durability="none"))


def computed(store: Store, key: str, value: Any, node: str, started: float) -> ResultManifest:
    return computed_result(store, key, value, node, started, R1)


def test_a_disputed_ref_is_withdrawn_only_while_it_names_the_result(store: Store) -> None:
    first = store.put_result(computed(store, KEY, 1, "node-a", 1.0))
    second = store.put_result(computed(store, KEY, 2, "node-a", 1.0))
    store.set_ref(KEY, first)
    assert not store.withdraw_ref(KEY, second, "disputed")      # re-pointed meanwhile: left alone
    assert store.read_ref(KEY) == first
    assert store.withdraw_ref(KEY, first, "disputed") and store.read_ref(KEY) is None
    assert not store.withdraw_ref(KEY, first, "disputed")       # no ref: nothing to do
    assert any(info.name.startswith("quarantine/refs%") for info in store.backend.list("quarantine/"))


def test_the_streaks_are_kept_in_the_store(store: Store) -> None:
    assert store.spot_check_streaks() is None
    streaks = {sc.pair("node-a", R1): sc.Streak(streak=4, checks=4)}
    store.set_spot_check_streaks(sc.encode(streaks))
    assert sc.decode(store.spot_check_streaks()) == streaks


def test_a_checking_node_vouches_for_the_served_result_only_when_it_reproduced_it(store: Store) -> None:
    job = Job(PythonCode("def main():\n    return {'sum': 4}\n"), runtime=R1)
    parts = job.key_parts()
    key = job.key
    a, b, c = (SigningKey.generate(f"node-{n}-1") for n in "abc")  # each agent signs with its own key
    policy = TrustPolicy.of([a.public, b.public, c.public])
    original = computed(store, key, {"sum": 4}, "node-a", 10.0)
    digest = store.put_result(original)
    store.put_attestation(key, digest, attest(key, parts.components(), digest, a, "node-a", 10.0, 11.0))
    _, honest = store_replica(store, job, computed(store, key, {"sum": 4}, "node-b", 20.0), b, "node-b", digest)
    assert honest == rp.replica_result(original).digest
    assert rp.attesting_nodes(policy, key, digest, store.attestations(key, digest)) == {"node-a", "node-b"}
    assert rp.attesting_nodes(policy, key, honest, store.attestations(key, honest)) == {"node-b"}
    _, other = store_replica(store, job, computed(store, key, {"sum": 5}, "node-c", 30.0), c, "node-c", digest)
    assert other != honest
    assert rp.attesting_nodes(policy, key, digest, store.attestations(key, digest)) == {"node-a", "node-b"}
    assert p.GROUP in sc.CHECK_OF_ANNOTATION
