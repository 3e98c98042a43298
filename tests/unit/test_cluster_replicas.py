"""spec.verify.replicas decisions, table-tested: where replicas go, when they are done, whether
they agree, what a dispute says, and when a stored result counts for a k-replica job."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakes import computed_result

from memoplane.api.conditions import kstatus
from memoplane.cas import FilesystemBackend, ResultManifest, Store
from memoplane.cluster import decide
from memoplane.cluster import protocol as p
from memoplane.cluster import replicas as rp
from memoplane.cluster import status as st
from memoplane.cluster.schedule import NodeView, pick_node
from memoplane.keys import KeyParts
from memoplane.trust import SigningKey, TrustPolicy, judge
from memoplane.trust.attestation import attest

R1 = "b3:" + "11" * 32
KEY_A, KEY_B = "b3:" + "aa" * 32, "b3:" + "bb" * 32
D1, D2 = "b3:" + "d1" * 32, "b3:" + "d2" * 32
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def parent(replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "sum", "namespace": "ml", "uid": "u-sum", "generation": 1},
            "spec": {"python": {"source": "def main(): return 1"}, "verify": {"replicas": replicas},
                     "cache": {"version": "v1"}, **spec},
            "status": {"phase": "Running", "cacheKey": KEY_A, "observedGeneration": 1}}


def replica(index: int, phase: str | None = None, node: str | None = None, digest: str | None = None,
            key: str = KEY_A, of: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
    manifest = rp.child_manifest(of or parent(), index)
    meta = {**manifest["metadata"], "uid": f"u-r{index}", "generation": 1}
    if node and phase in ("Scheduled", "Running"):
        meta["labels"] = {**meta["labels"], p.NODE_LABEL: node}
    status: dict[str, Any] = {"phase": phase, "cacheKey": key, "observedGeneration": 1, "reason": reason}
    if phase == "Succeeded":
        status.update(node=node, result={"digest": digest})
    return {**manifest, "metadata": meta, "status": status}


def by_name(*children: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children}


def nv(name: str, runtime: str = R1, age: float = 0.0) -> NodeView:
    return NodeView(name, 2, 0, {"python": runtime}, age, 10.0)


# -- replicas -----------------------------------------------------------------------------------


def test_a_replica_is_the_parents_spec_without_verify_and_bypassing_the_cache() -> None:
    manifest = rp.child_manifest(parent(3), 2)
    assert manifest["metadata"]["name"] == "sum-r2"
    assert manifest["metadata"]["labels"] == {rp.PARENT_LABEL: "u-sum", rp.INDEX_LABEL: "2"}
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "u-sum"
    assert "verify" not in manifest["spec"]
    assert manifest["spec"]["cache"] == {"version": "v1", "policy": "Bypass"}
    assert rp.is_replica(manifest) and not rp.is_replicated(manifest)
    assert rp.is_replicated(parent(2)) and not rp.is_replicated(parent(1))
    assert rp.replicas_of({"spec": {}}) == 1
    assert len(rp.child_name("x" * 260, 4)) == 253 and rp.child_name("x" * 260, 4).endswith("-r4")


@pytest.mark.parametrize(("replicas", "nodes", "problem"), [
    (2, [nv("a"), nv("b")], None),
    (3, [nv("a"), nv("b")], "3 replicas need 3 distinct live nodes serving profile 'python'; 2 do (a, b)"),
    (2, [nv("a"), nv("b", age=60)], "1 do (a)"),                        # b's lease is stale
    (2, [nv("a"), nv("b", runtime="b3:" + "99" * 32)], "1 do (a)"),     # b runs another runtime
    (2, [], "0 do: add nodes or lower replicas"),
])
def test_k_replicas_wait_for_k_capable_nodes(replicas: int, nodes: list[NodeView], problem: str | None) -> None:
    found = rp.nodes_problem(replicas, nodes, "python", R1)
    assert found is None if problem is None else (found is not None and problem in found
                                                  and found.startswith("spec.verify.replicas:"))


def test_a_replica_is_placed_away_from_its_siblings() -> None:
    me = replica(1, phase="Pending")
    siblings = [replica(0, phase="Running", node="a"), me, replica(2, phase="Succeeded", node="c", digest=D1)]
    assert rp.taken_nodes(me, siblings) == frozenset({"a", "c"})
    assert rp.sibling_names(me) == ["sum-r0"] and rp.sibling_names(replica(0, of=parent(3))) == ["sum-r1", "sum-r2"]
    nodes = [nv("a"), nv("b"), nv("c")]
    assert pick_node(nodes, "python", R1, {}, exclude=frozenset({"a", "c"})) == "b"
    assert pick_node(nodes, "python", R1, {"b": 9}, exclude=frozenset({"a", "c"})) == "b"  # busy still beats taken
    wait = decide.place(me, [nv("a"), nv("c")], {}, "python", R1, frozenset({"a", "c"}))
    assert isinstance(wait, decide.Wait) and wait.reason == p.REASON_NO_NODE
    assert "other than its sibling replicas' (a, c)" in wait.message
    placed = decide.place(me, nodes, {}, "python", R1, frozenset({"a", "c"}))
    assert isinstance(placed, decide.Schedule) and placed.node == "b"


# -- progress and verdict -------------------------------------------------------------------------


def test_step_creates_the_missing_replicas_then_waits_for_them() -> None:
    first = rp.step(parent(2), {})
    assert isinstance(first, rp.Missing) and [m["metadata"]["name"] for m in first.create] == ["sum-r0", "sum-r1"]
    half = rp.step(parent(2), by_name(replica(0, "Succeeded", "a", D1), replica(1, "Running", "b")))
    assert isinstance(half, rp.Missing) and half.waiting_on == ["sum-r1"] and rp.nodes_of(half.done) == ["a"]
    changed = parent(2, env={"MODE": "fast"})
    stale = rp.step(changed, by_name(replica(0, "Succeeded", "a", D1), replica(1, "Succeeded", "b", D1)))
    assert isinstance(stale, rp.Missing) and len(stale.update) == 2   # the parent's spec changed


def test_step_agreement_dispute_and_failure() -> None:
    agreed = rp.step(parent(2), by_name(replica(0, "Succeeded", "a", D1), replica(1, "Succeeded", "b", D1)))
    assert isinstance(agreed, rp.Agreed) and agreed.digest == D1 and agreed.key == KEY_A
    three = rp.step(parent(3), by_name(*(replica(i, "Succeeded", n, d, of=parent(3))
                                         for i, (n, d) in enumerate([("a", D1), ("b", D1), ("c", D2)]))))
    assert isinstance(three, rp.Disagreed)
    x, y = three.pair
    assert (x.node, y.node, x.digest, y.digest) == ("a", "c", D1, D2)
    failed = rp.step(parent(2), by_name(replica(0, "Succeeded", "a", D1), replica(1, "Failed", "b", reason="Timeout")))
    assert isinstance(failed, rp.ReplicaFailed) and failed.name == "sum-r1" and failed.reason == "Timeout"
    keys = rp.step(parent(2), by_name(replica(0, "Succeeded", "a", D1), replica(1, "Succeeded", "b", D1, KEY_B)))
    assert isinstance(keys, rp.ReplicaFailed) and keys.reason == "KeysDiffer"


# -- the difference ------------------------------------------------------------------------------


def outputs(value: Any = None, kind: str = "json", files: dict[str, str] | None = None, stdout: bytes = b"",
            stderr: bytes = b"", meta: dict[str, Any] | None = None) -> rp.Outputs:
    return rp.Outputs(kind, value, files or {}, stdout, stderr, meta or {})


@pytest.mark.parametrize(("a", "b", "want"), [
    ({"sum": 4}, {"sum": 5}, ("$.sum", 4, 5)),
    ({"a": [1, 2, {"t": 1}]}, {"a": [1, 2, {"t": 2}]}, ("$.a[2].t", 1, 2)),
    ([1, 2], [1, 2, 3], ("$[2]", None, 3)),
    (1, True, ("$", 1, True)),
    (1, 1.0, ("$", 1, 1.0)),
    ({"x": 1}, {"x": 1}, None),
])
def test_first_json_difference(a: Any, b: Any, want: tuple[str, Any, Any] | None) -> None:
    found = rp.first_json_difference(a, b)
    if want is None:
        assert found is None
        return
    assert found is not None and found[0] == want[0]
    assert (None if found[1] is rp._ABSENT else found[1]) == want[1] and found[2] == want[2]


def test_first_byte_difference() -> None:
    assert rp.first_byte_difference(b"abc", b"abc") is None
    assert rp.first_byte_difference(b"time=123;ok", b"time=456;ok") == (5, 8, b"123", b"456")
    assert rp.first_byte_difference(b"ab", b"abcd") == (2, 4, b"", b"cd")
    start, end, x, _ = rp.first_byte_difference(b"\0" * 100, b"\1" * 100) or (0, 0, b"", b"")
    assert (start, end - start, len(x)) == (0, rp.BYTES_SHOWN, rp.BYTES_SHOWN)


def test_difference_names_each_output_that_differs() -> None:
    names = ("node-a", "node-c")
    assert rp.difference(outputs({"sum": 4}), outputs({"sum": 5}), names) == [
        "value differs at $.sum: 4 (node-a) vs 5 (node-c)"]
    lines = rp.difference(outputs(1, files={"out/a.csv": D1, "out/b": D1}, stdout=b"t=1\n"),
                          outputs(1, files={"out/a.csv": D2, "out/c": D1}, stdout=b"t=2\n"), names)
    assert lines == ["output files: out/a.csv differ; only node-a wrote out/b; only node-c wrote out/c",
                     "stdout differs at bytes 2..3: b'1' (node-a) vs b'2' (node-c); lengths 4 and 4"]
    assert rp.difference(outputs(b"\x00\x01", "bytes"), outputs(b"\x00\x02", "bytes"), names) == [
        "value differs at bytes 1..2: b'\\x01' (node-a) vs b'\\x02' (node-c); lengths 2 and 2"]
    assert rp.difference(outputs(1), outputs(b"1", "bytes"), names) == [
        "value: a json value (node-a) vs a bytes value (node-c)"]
    assert rp.difference(outputs(1, meta={"exit_code": 0}), outputs(1, meta={"exit_code": 1}), names) == [
        "the outputs agree; the run differs: meta.exit_code: 0 vs 1"]
    long = rp.difference(outputs({"v": "x" * 500}), outputs({"v": "y" * 500}), names)[0]
    assert len(long) < 2 * rp.VALUE_CHARS + 80 and "…" in long


def test_a_dispute_message_names_nodes_difference_and_both_digests() -> None:
    disagreed = rp.Disagreed([rp.Outcome("sum-r0", "node-a", D1, KEY_A), rp.Outcome("sum-r1", "node-c", D2, KEY_A)])
    message = rp.dispute_message(disagreed, ["value differs at $.sum: 4 (node-a) vs 5 (node-c)"])
    assert message.startswith("replicas disagree: node-a (sum-r0) and node-c (sum-r1) returned different results")
    assert "value differs at $.sum" in message and D1 in message and D2 in message
    assert message.endswith("nothing was cached")


def test_a_disputed_job_is_not_ready_and_a_new_generation_clears_it() -> None:
    outcomes = [{"job": "sum-r0", "node": "node-a", "digest": D1}, {"job": "sum-r1", "node": "node-c", "digest": D2}]
    patch = st.disputed({}, 1, KEY_A, outcomes, "value differs", "replicas disagree: …", T0, rp.REASON_DISPUTED)
    assert patch["phase"] == "Failed" and patch["reason"] == "Disputed" and patch["result"] is None
    conditions = {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}
    assert conditions == {"Stalled": ("True", "Disputed"), "Ready": ("False", "Disputed"),
                          "Disputed": ("True", "Disputed")}
    assert kstatus(1, 1, patch["conditions"]) == "Failed"
    assert patch["verify"] == {"replicas": outcomes, "agreed": False, "difference": "value differs"}
    again = st.replicating(patch, 2, KEY_A, 0, 2, [], T0, rp.REASON_REPLICATING, rp.REASON_DISPUTED)
    assert "Disputed" not in {c["type"] for c in again["conditions"]} and kstatus(2, 2, again["conditions"]) == \
        "InProgress"


# -- attestations on a real store -------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FilesystemBackend(tmp_path / "store", durability="none"))


def computed(store: Store, key: str, value: Any, node: str, started: float) -> ResultManifest:
    return computed_result(store, key, value, node, started, R1)


def test_honest_replicas_store_one_digest_each_attested_and_k_nodes_make_a_hit(store: Store) -> None:
    parts = KeyParts(code="b3:" + "c0" * 32, entrypoint="main", runtime=R1, inputs={})
    key = parts.key
    keys = {node: SigningKey.generate(f"{node}-1") for node in ("node-a", "node-b", "node-c")}
    policy = TrustPolicy.of([k.public for k in keys.values()])
    digests = set()
    for node, started in (("node-a", 10.0), ("node-b", 20.0), ("node-c", 30.0)):
        agents = keys[node]   # each node signs with its own key
        result = rp.replica_result(computed(store, key, {"sum": 4}, node, started))
        assert result.provenance.node == rp.REPLICATED_NODE and "isolation" not in result.meta
        digest = store.put_result(result)
        digests.add(digest)
        store.put_attestation(key, digest, attest(key, parts.components(), digest, agents, node, started, started + 1))
    (digest,) = digests  # who ran it and when are in the attestations only
    envelopes = store.attestations(key, digest)
    nodes = rp.attesting_nodes(policy, key, digest, envelopes)
    assert nodes == {"node-a", "node-b", "node-c"}   # three nodes, each with its own key
    assert rp.enough_nodes(policy, key, digest, envelopes, 3) and not rp.enough_nodes(policy, key, digest, envelopes, 4)
    agreed = rp.Agreed(digest, key, [rp.Outcome("j-r0", "node-a", digest, key),
                                     rp.Outcome("j-r1", "node-x", digest, key)])
    assert rp.unattested(agreed, nodes) == ["node-x"]
    assert judge(policy, key, digest, envelopes[:1]).trusted
    assert not rp.enough_nodes(policy, key, digest, envelopes[:1], 2)  # a single node's word is not agreement
    stranger = TrustPolicy.of([SigningKey.generate("x-1").public])
    assert not rp.enough_nodes(stranger, key, digest, envelopes, 1) and not rp.attesting_nodes(stranger, key, digest,
                                                                                               envelopes)
    strict = TrustPolicy.of([keys["node-a"].public], min_signatures=2)   # the cache's own rule still applies
    assert not rp.enough_nodes(strict, key, digest, envelopes, 2)
    # node-a's key saying node-d computed it does not make node-d an attesting node.
    posing = attest(key, parts.components(), digest, keys["node-a"], "node-d", 40.0, 41.0)
    assert rp.attesting_nodes(policy, key, digest, [posing]) == frozenset()
    other = KeyParts(code="b3:" + "c1" * 32, entrypoint="main", runtime=R1, inputs={}).key
    assert not rp.attesting_nodes(policy, other, digest, envelopes)  # attestations for another key do not count
