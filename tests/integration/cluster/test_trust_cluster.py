"""Trust on the cluster (DESIGN §11): the operator serves a stored result only if the job's
ResultCache trusts who attested it; the agents attest what they compute. Real API server,
MinIO, operator and agents. Whoever can write the store is the attacker here, using the
public Store API; the agents' private key is what the attacker does not have.

The 2+2=5 forgery of issue 11 is the first test. The poisoning test generates (seeded) at
least 1,000 attempts, applies each to MinIO and judges it with the operator's own lookup
(memoplane_operator.hits.verified_hit) and the cache's real policy, then shows a sample end
to end through ComputeJobs: each recomputes the right value, none is served.
"""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from memoplane_operator.hits import verified_hit

from memoplane.api.specs import computejob_manifest
from memoplane.cas import BlobRef, Provenance, ResultManifest, Store
from memoplane.cas.digests import attestation_name, b3, object_name, ref_name
from memoplane.cluster import protocol as p
from memoplane.cluster import trust as tr
from memoplane.errors import NotFound
from memoplane.testing import processes
from memoplane.trust import Lookup, SigningKey, TrustPolicy
from memoplane.trust import attestation as at
from memoplane.trust.policy import UNSIGNED

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

ADD = 'def main(a, b):\n    return {"sum": a + b}\n'
SPAN = "def main(start, n):\n    return list(range(start * 10**6, start * 10**6 + n))\n"   # a blob value (chunks)
# ~200 KB of JSON: above the result manifest's inline limit, so the value's chunks are read. Values of different
# keys share no chunk: a flip left in place damages one key's data only (a chunk shared with a key recomputed
# before anyone read the damaged one would be deduplicated against, with packs as with chunk objects).
SPAN_N = 30_000
SEED = 11
ATTEMPTS = 1008
SAMPLE = 30
DAMAGED = "damaged"   # the store's own checks refused it (seal, address, chunk, key): no verdict to give

OLD = SigningKey.generate("old-team-1")     # a revoked epoch whose private key leaked
TEAM = SigningKey.generate("team-ml-1")     # trusted through a ConfigMap
STRANGER = SigningKey.generate("stranger-1")


def job(name: str, source: str, inputs: dict[str, Any], salt: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": source, "entrypoint": "main"},
                                            "inputs": [{"name": k, "value": v} for k, v in inputs.items()],
                                            "cache": {"version": salt}})


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def trusting_cache(stack: Stack, ns: str) -> dict[str, Any]:
    """The namespace's default cache, made before any job: it trusts the agents, a team key
    from a ConfigMap, and names a revoked epoch."""
    stack.kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "team-keys"},
                                                      "data": {"team-ml-1.pub": TEAM.public.pem()}})
    body = {"apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": "default", "namespace": ns},
            "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(ns)},
                     "trust": {"keys": [{"configMapRef": {"name": "team-keys"}},
                                        {"publicKey": {"keyId": OLD.keyid, "key": OLD.public.base64}}],
                               "revoked": [OLD.keyid]}}}
    created = stack.kube.create(p.RESULTCACHES, ns, body)
    assert created is not None
    return created


def real_policy(stack: Stack, ns: str) -> TrustPolicy:
    """The cache's policy as the operator makes it: the object, what it names, the agents' key."""
    rc = stack.kube.get(p.RESULTCACHES, ns, "default")
    assert rc is not None
    objects = {s: stack.kube.get_config_map(ns, s.name) for s in tr.key_sources(rc)}
    policy = tr.effective_policy(rc, objects, processes.cluster_keys(stack.cfg.directory))
    assert isinstance(policy, TrustPolicy), policy
    return policy


def untrusted_events(stack: Stack, ns: str) -> dict[str, str]:
    events = stack.kube.core.list_namespaced_event(ns).items
    return {e.involved_object.name: e.message for e in events if e.reason == p.REASON_UNTRUSTED}


def forged(store: Store, key: str, value: Any, node: str = "node-a", at_time: float = 1.0) -> ResultManifest:
    """A valid result manifest saying `key` returns `value`: what anyone with store access can write."""
    empty = store.put_bytes(b"")
    return ResultManifest(store.put_value(value), BlobRef(empty.digest, 0), BlobRef(empty.digest, 0),
                          Provenance(key, {}, "b3:" + "0" * 64, node, at_time, at_time + 1, 1.0))


def test_the_2_plus_2_equals_5_forgery_is_refused_and_4_recomputed(stack: Stack, ns: str) -> None:
    trusting_cache(stack, ns)
    salt = uuid.uuid4().hex[:8]
    stack.apply(ns, job("add", ADD, {"a": 2, "b": 2}, salt))
    honest = status(stack.wait(ns, "add"))
    assert (honest["phase"], honest["result"]["value"]) == ("Succeeded", {"sum": 4})
    key, store = honest["cacheKey"], stack.store(ns)
    assert store.attestations(key, honest["result"]["digest"]), "the agent attested what it computed"
    for name, signer in (("unsigned", None), ("stranger", STRANGER)):
        # The forgery of issue 11: {"sum": 5}, a valid result manifest, the ref re-pointed at it.
        result = forged(store, key, {"sum": 5}, at_time=time.time())
        manifest = json.loads(base64.b64decode(json.loads(store.attestations(key, honest["result"]["digest"])[0])
                                               ["payload"]))["predicate"]["buildDefinition"]["externalParameters"]
        envelopes = [at.attest(key, manifest["keyManifest"], result.digest, signer, "node-x", 1.0, 2.0)] if signer \
            else []
        store.commit(result, envelopes)
        assert store.read_ref(key) == result.digest
        stack.apply(ns, job(f"again-{name}", ADD, {"a": 2, "b": 2}, salt))
        again = status(stack.wait(ns, f"again-{name}"))
        assert (again["phase"], again["result"]["value"], again["cached"]) == ("Succeeded", {"sum": 4}, False), again
        message = _eventually(lambda job=f"again-{name}": untrusted_events(stack, ns).get(job))
        assert ("unsigned" if signer is None else "unknown-key (stranger-1)") in message, message
        print(f"forgery ({name}) refused: {message}")
    # The recomputed result was attested and the ref re-pointed: the next job is a hit, of 4.
    stack.apply(ns, job("third", ADD, {"a": 2, "b": 2}, salt))
    third = status(stack.wait(ns, "third"))
    assert (third["cached"], third["result"]["value"]) == (True, {"sum": 4})


def _eventually(read: Callable[[], str | None], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while (found := read()) is None:
        assert time.monotonic() < deadline, "no Untrusted event"
        time.sleep(0.25)
    return found


# -- poisoning -----------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    digest: str                      # the honest result
    envelope: bytes                  # its attestation (by the agents' key)
    manifest: dict[str, Any]         # the key's canonical manifest (public: it is in the attestation)
    chunks: list[str]                # the value blob's chunks (empty for an inline value)


class Attack:
    """Applies one attempt to the store, remembering every existing object it changes."""

    def __init__(self, store: Store, target: Target, other: Target, rng: random.Random) -> None:
        self.store, self.target, self.other, self.rng = store, target, other, rng
        self.saved: dict[str, bytes | None] = {}

    def _save(self, name: str) -> None:
        if name not in self.saved:
            try:
                self.saved[name] = self.store.backend.get(name)
            except NotFound:
                self.saved[name] = None

    def _flip(self, name: str) -> None:
        self._save(name)
        data = bytearray(self.saved[name] or b"")
        data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        self.store.backend.put(name, bytes(data))

    def _flip_chunk(self, chunk: str) -> None:
        """Flip a bit inside every stored copy of `chunk` (writers that had not seen each other's
        packs may both have packed it: a read falls back to a good copy, rightly)."""
        self.store.chunks.refresh()
        flipped: dict[str, bytearray] = {}
        for loc in self.store.chunks.index.locations(chunk):
            name = object_name("packs", loc.pack)
            self._save(name)
            data = flipped.setdefault(name, bytearray(self.saved[name] or b""))
            data[loc.offset + self.rng.randrange(loc.length)] ^= 1 << self.rng.randrange(8)
        for name, data in flipped.items():
            self.store.backend.put(name, bytes(data))

    def _forge(self, sign: Callable[[ResultManifest], list[bytes]]) -> None:
        """A result of another value for the key, committed with the attestations `sign` makes."""
        self._save(ref_name(self.target.key))
        result = forged(self.store, self.target.key, {"sum": self.rng.randrange(10**6)}, at_time=self.rng.random())
        self.store.commit(result, sign(result))

    def _statement(self, result: ResultManifest) -> dict[str, Any]:
        return at.statement(self.target.key, self.target.manifest, result.digest, "node-x", 1.0, 2.0)

    def apply(self, kind: str) -> None:
        t = self.target
        self._save(ref_name(t.key))  # a damaged result's ref is quarantined by the reader: put back too
        if kind == "chunk-flip":
            self._flip_chunk(self.rng.choice(t.chunks))
        elif kind == "manifest-flip":
            self._flip(object_name("results", t.digest))
        elif kind == "envelope-flip":
            self._flip(attestation_name(t.key, t.digest, b3(t.envelope)))
        elif kind == "ref-swap":  # the ref names another key's valid, attested result
            self.store.set_ref(t.key, self.other.digest, [b3(self.other.envelope)])
        elif kind == "unsigned":
            self._forge(lambda r: [])
        elif kind == "stranger":
            self._forge(lambda r: [at.sign_statement(self._statement(r), STRANGER)])
        elif kind == "revoked-epoch":
            self._forge(lambda r: [at.sign_statement(self._statement(r), OLD)])
        elif kind == "replay-other-key":  # the agents' real attestation of another cache key
            self._forge(lambda r: [self.other.envelope])
        elif kind == "replay-other-result":  # the agents' real attestation of the honest result
            self._forge(lambda r: [t.envelope])
        elif kind == "bad-signature":  # the agents' key id, a signature the attacker cannot make
            self._forge(lambda r: [_resigned(at.sign_statement(self._statement(r), STRANGER),
                                             json.loads(t.envelope)["signatures"][0]["keyid"], self.rng)])
        else:
            raise AssertionError(kind)

    def undo(self) -> None:
        for name, data in self.saved.items():
            if data is None:
                self.store.backend.delete(name)
            else:
                self.store.backend.put(name, data)
        # A pack put back whole: the record of its copy a reader quarantined goes too (as a repair would).
        restored = [name.rsplit("/", 1)[-1] for name in self.saved if name.startswith("packs/")]
        for info in list(self.store.backend.list("quarantine/packs%")):
            if any(pack in info.name for pack in restored):
                self.store.backend.delete(info.name)


KINDS = ("chunk-flip", "manifest-flip", "envelope-flip", "ref-swap", "unsigned", "stranger", "revoked-epoch",
         "replay-other-key", "replay-other-result", "bad-signature")


def _resigned(envelope: bytes, keyid: str, rng: random.Random) -> bytes:
    body = json.loads(envelope)
    body["signatures"] = [{"keyid": keyid, "sig": base64.b64encode(rng.randbytes(64)).decode()}]
    return json.dumps(body).encode()


def reason(lookup: Lookup) -> str:
    if lookup.verdict is None:
        return DAMAGED
    refusals = lookup.verdict.refusals
    return refusals[0].reason if refusals else lookup.verdict.reason.split(":")[0]


def targets(stack: Stack, ns: str, salt: str, count: int) -> list[Target]:
    """`count` honest results computed through ComputeJobs (every 5th one a blob value)."""
    names = []
    for i in range(count):
        source, inputs = (SPAN, {"start": i, "n": SPAN_N}) if i % 5 == 0 else (ADD, {"a": i, "b": 100 + i})
        stack.apply(ns, job(f"honest-{i}", source, inputs, salt))
        names.append(f"honest-{i}")
    store, found = stack.store(ns), []
    for name, obj in stack.wait_all(ns, names, timeout=600).items():
        s = status(obj)
        assert s["phase"] == "Succeeded" and not s["cached"], (name, s)
        (envelope,) = store.attestations(s["cacheKey"], s["result"]["digest"])
        payload = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
        manifest = payload["predicate"]["buildDefinition"]["externalParameters"]["keyManifest"]
        blob = store.get_result(s["result"]["digest"]).value.blob
        chunks = [c for c, _ in store.blob_manifest(blob.digest).chunks] if blob is not None else []
        found.append(Target(s["cacheKey"], s["result"]["digest"], envelope, manifest, chunks))
    return found


def test_poisoning_is_never_served(stack: Stack, ns: str) -> None:
    trusting_cache(stack, ns)
    salt = uuid.uuid4().hex[:8]
    honest = targets(stack, ns, salt, SAMPLE)
    policy = real_policy(stack, ns)
    backend = stack.store(ns).backend
    rng = random.Random(SEED)
    detected: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    served = 0
    for attempt in range(ATTEMPTS):
        kind = KINDS[attempt % len(KINDS)]
        pool = [t for t in honest if t.chunks] if kind == "chunk-flip" else honest
        target = rng.choice(pool)
        other = rng.choice([t for t in honest if t is not target])
        store = Store(backend)  # cold, as a restarted operator: nothing verified is remembered
        attack = Attack(store, target, other, rng)
        try:
            attack.apply(kind)
            lookup = verified_hit(store, target.key, policy)
            if lookup.hit is not None:
                served += 1
            detected[reason(lookup)] += 1
            by_kind[kind][reason(lookup)] += 1
        finally:
            attack.undo()
            store.close()
        if attempt % 100 == 0:  # the store is whole again: the honest result is served (the test can fail)
            with Store(backend) as fresh:
                assert verified_hit(fresh, target.key, policy).hit is not None, (attempt, kind)
    print(f"\npoisoning: attempts {ATTEMPTS}, served {served}, detected {sum(detected.values())}")
    print("detected by reason: " + json.dumps(dict(sorted(detected.items()))))
    print("by kind: " + json.dumps({k: dict(v) for k, v in by_kind.items()}))
    assert served == 0
    assert sum(detected.values()) == ATTEMPTS
    expected = {"envelope-flip": UNSIGNED, "unsigned": UNSIGNED, "stranger": at.UNKNOWN_KEY,
                "revoked-epoch": at.REVOKED_KEY, "replay-other-key": at.OTHER_KEY,
                "replay-other-result": at.OTHER_RESULT, "bad-signature": at.BAD_SIGNATURE,
                "chunk-flip": DAMAGED, "manifest-flip": DAMAGED, "ref-swap": DAMAGED}
    for kind, reasons in by_kind.items():
        assert set(reasons) == {expected[kind]}, (kind, reasons)

    # A sample end to end: one attempt of each kind per key, left in place; the same jobs
    # again recompute the honest value, and none is served from the cache.
    for i, target in enumerate(honest):
        Attack(stack.store(ns), target, honest[(i + 1) % len(honest)], random.Random(SEED + i)).apply(
            KINDS[i % len(KINDS)])
    names = []
    for i in range(SAMPLE):
        source, inputs = (SPAN, {"start": i, "n": SPAN_N}) if i % 5 == 0 else (ADD, {"a": i, "b": 100 + i})
        stack.apply(ns, job(f"again-{i}", source, inputs, salt))
        names.append(f"again-{i}")
    done = stack.wait_all(ns, names, timeout=600)
    recomputed = 0
    for i, name in enumerate(names):
        s = status(done[name])
        want = list(range(i * 10**6, i * 10**6 + SPAN_N)) if i % 5 == 0 else {"sum": 2 * i + 100}
        assert s["phase"] == "Succeeded" and not s["cached"], (name, KINDS[i % len(KINDS)], s)
        value = s["result"].get("value")
        if value is None:
            value = stack.store(ns).load_value(stack.store(ns).get_result(s["result"]["digest"]).value)
        assert value == want, (name, KINDS[i % len(KINDS)])
        recomputed += 1
    events = untrusted_events(stack, ns)
    print(f"end to end: {SAMPLE} poisoned keys, {recomputed} recomputed, 0 served, "
          f"{sum(1 for n in names if n in events)} Untrusted events")
    refused_kinds = {k for k, r in expected.items() if r != DAMAGED}
    assert all(f"again-{i}" in events for i in range(SAMPLE) if KINDS[i % len(KINDS)] in refused_kinds)


def signers(store: Store, key: str, digest: str) -> set[str]:
    return {json.loads(e)["signatures"][0]["keyid"] for e in store.attestations(key, digest)}


def test_two_signatures_are_two_nodes(stack: Stack, ns: str) -> None:
    """Each agent signs with its own key: a cache asking for two signers serves a result only
    once two nodes attest it (verify.replicas: 2 has both compute it), never one node twice."""
    stack.ensure()
    prefix = f"{p.default_store_prefix(ns)}two/"
    created = stack.kube.create(p.RESULTCACHES, ns, {
        "apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": "two", "namespace": ns},
        "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": prefix}, "trust": {"minSignatures": 2}}})
    assert created is not None
    salt = uuid.uuid4().hex[:8]

    def add(name: str, replicas: int = 1) -> dict[str, Any]:
        manifest = job(name, ADD, {"a": 3, "b": 4}, salt)
        manifest["spec"]["cache"]["resultCache"] = "two"
        if replicas > 1:
            manifest["spec"]["verify"] = {"replicas": replicas}
        stack.apply(ns, manifest)
        return status(stack.wait(ns, name, timeout=180))

    store = stack.stores.get(p.DEFAULT_BUCKET, prefix)
    one = add("one")
    assert (one["phase"], one["result"]["value"], one["cached"]) == ("Succeeded", {"sum": 7}, False), one
    key = one["cacheKey"]
    assert signers(store, key, one["result"]["digest"]) == {f"{one['node']}-1"}
    # One node's attestation is not two signers: a miss, recomputed.
    again = add("again")
    assert (again["result"]["value"], again["cached"]) == ({"sum": 7}, False), again
    message = _eventually(lambda: untrusted_events(stack, ns).get("again"))
    assert "too-few-signers: 1 trusted signer(s)" in message, message
    # Two nodes compute it: the agreed result carries both nodes' keys and is a hit from now on.
    both = add("both", replicas=2)
    assert both["phase"] == "Succeeded", both
    assert {r["node"] for r in both["verify"]["replicas"]} == {"node-a", "node-b"}
    assert signers(store, key, both["result"]["digest"]) == {"node-a-1", "node-b-1"}
    hit = add("hit")
    assert (hit["cached"], hit["result"]["value"], hit["result"]["digest"]) == (True, {"sum": 7},
                                                                                 both["result"]["digest"]), hit
    # The operator remembers both agents' keys (a node that leaves stays trusted), as announced.
    kept = stack.kube.get_config_map(stack.cfg.lease_namespace, p.AGENT_KEYS_CONFIG_MAP)
    assert kept is not None
    for node in ("node-a", "node-b"):
        assert kept["data"][f"{node}-1.pub"] == processes.agent_key(stack.cfg.directory, node).pem()
    print(f"\ntwo signers: one node's result refused ({message}); replicas on node-a and node-b: a hit")
