"""Attestations and trust policies on a real (filesystem) store: who vouches for a result,
and what a reader serves. The 2+2=5 forgery of the issue is the first test."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer._key import SSlibKey  # the package re-exports it without __all__

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store
from memoplane.cas.digests import attestation_name
from memoplane.errors import InputError
from memoplane.keys import KeyParts
from memoplane.trust import SigningKey, TrustPolicy, judge, next_keyid, split_keyid, trusted_hit
from memoplane.trust import attestation as at
from memoplane.trust import policy as po
from memoplane.trust.keys import PublicKey

CODE = "b3:" + "c0" * 32
RUNTIME = "b3:" + "7e" * 32


def parts(a: int, b: int) -> KeyParts:
    inputs = {"a": f"json:b3:{a:064x}", "b": f"json:b3:{b:064x}"}
    return KeyParts(code=CODE, entrypoint="main", runtime=RUNTIME, inputs=inputs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    yield s
    s.close()


def result_of(store: Store, key: str, value: object) -> ResultManifest:
    empty = store.put_bytes(b"")
    return ResultManifest(store.put_value(value), empty, empty, Provenance(key, {}, RUNTIME, "node-a", 1.0, 2.0, 1.0))


def compute(store: Store, p: KeyParts, value: object, signer: SigningKey | None) -> str:
    """What an honest node does: store the result, attest it, then point the ref at it."""
    result = result_of(store, p.key, value)
    envelopes = [at.attest(p.key, p.components(), result.digest, signer, "node-a", 1.0, 2.0)] if signer else []
    return store.commit(result, envelopes)


def test_a_forged_result_is_refused_and_the_honest_one_served(store: Store) -> None:
    agent = SigningKey.generate("node-a-1")
    policy = TrustPolicy.of([agent.public])
    p = parts(2, 2)
    honest = compute(store, p, {"sum": 4}, agent)
    assert (found := trusted_hit(store, p.key, policy)).hit is not None and found.hit.digest == honest
    # Someone who can write the store (and has no key) replaces what the key returns.
    forged = compute(store, p, {"sum": 5}, None)
    assert store.read_ref(p.key) == forged
    lookup = trusted_hit(store, p.key, policy)
    assert lookup.hit is None and lookup.refused
    assert lookup.verdict is not None and lookup.verdict.reason.startswith("unsigned")


def test_each_kind_of_bad_attestation_is_refused_with_its_reason(store: Store) -> None:
    agent, stranger = SigningKey.generate("node-a-1"), SigningKey.generate("node-x-1")
    old = SigningKey.generate("node-b-1")
    policy = TrustPolicy.of([agent.public, old.public], revoked=["node-b-1"])
    p, q = parts(2, 2), parts(3, 3)
    digest = result_of(store, p.key, {"sum": 4}).digest
    other = result_of(store, p.key, {"sum": 5}).digest
    good = at.attest(p.key, p.components(), digest, agent, "node-a", 1.0, 2.0)
    cases = {
        at.UNKNOWN_KEY: at.attest(p.key, p.components(), digest, stranger, "node-x", 1.0, 2.0),
        at.REVOKED_KEY: at.attest(p.key, p.components(), digest, old, "node-b", 1.0, 2.0),
        at.OTHER_KEY: at.attest(q.key, q.components(), digest, agent, "node-a", 1.0, 2.0),
        at.OTHER_RESULT: at.attest(p.key, p.components(), other, agent, "node-a", 1.0, 2.0),
        at.KEY_MISMATCH: at.sign_statement(
            {**(s := at.statement(p.key, q.components(), digest, "node-a", 1.0, 2.0))}, agent),
        at.MALFORMED: b'{"payload": "not base64!", "payloadType": "x", "signatures": []}',
    }
    envelope = json.loads(good)
    envelope["signatures"][0]["sig"] = base64.b64encode(b"\0" * 64).decode()
    cases[at.BAD_SIGNATURE] = json.dumps(envelope).encode()
    # A signature by the trusted key over a statement naming a stranger's key id: the named key is used.
    replay = json.loads(good)
    replay["signatures"][0]["keyid"] = "node-x-1"
    assert judge(policy, p.key, digest, [json.dumps(replay).encode()]).refusals[0].reason == at.UNKNOWN_KEY
    for reason, data in cases.items():
        verdict = judge(policy, p.key, digest, [data])
        assert not verdict.trusted and [r.reason for r in verdict.refusals] == [reason], reason
    assert s["subject"][0]["digest"]["blake3"] == digest[3:]
    assert judge(policy, p.key, digest, [good, *cases.values()]).signers == ("node-a-1",)


def test_min_signatures_counts_distinct_trusted_signers(store: Store) -> None:
    a, b = SigningKey.generate("node-a-1"), SigningKey.generate("node-b-1")
    policy = TrustPolicy.of([a.public, b.public], min_signatures=2)
    p = parts(1, 2)
    digest = compute(store, p, 3, a)
    store.commit(result_of(store, p.key, 3), [at.attest(p.key, p.components(), digest, a, "node-a", 5.0, 6.0)])
    lookup = trusted_hit(store, p.key, policy)  # two envelopes, one signer
    assert lookup.hit is None and lookup.verdict is not None and lookup.verdict.signers == ("node-a-1",)
    assert "too-few-signers" in lookup.verdict.reason
    # A second node computes the same result: it adds its attestation, replacing none.
    store.commit(result_of(store, p.key, 3), [at.attest(p.key, p.components(), digest, b, "node-b", 7.0, 8.0)])
    lookup = trusted_hit(store, p.key, policy)
    assert lookup.hit is not None and lookup.verdict is not None and lookup.verdict.signers == ("node-a-1", "node-b-1")
    assert len(store.attestations(p.key, digest)) == 3


def test_an_attestation_the_ref_does_not_list_is_still_found(store: Store) -> None:
    """A writer that lost a race drops an attestation from the ref's list; the reader lists them all."""
    a = SigningKey.generate("node-a-1")
    p = parts(4, 4)
    digest = compute(store, p, 8, None)
    store.put_attestation(p.key, digest, at.attest(p.key, p.components(), digest, a, "node-a", 1.0, 2.0))
    assert store.read_ref_entry(p.key) is not None and store.read_ref_entry(p.key).attestations == ()  # type: ignore[union-attr]
    assert trusted_hit(store, p.key, TrustPolicy.of([a.public])).hit is not None


def test_a_damaged_attestation_is_never_read(store: Store, tmp_path: Path) -> None:
    a = SigningKey.generate("node-a-1")
    p = parts(5, 5)
    digest = compute(store, p, 10, a)
    (listed,) = store.read_ref_entry(p.key).attestations  # type: ignore[union-attr]
    path = tmp_path / "store" / attestation_name(p.key, digest, listed)
    fresh = Store(FilesystemBackend(tmp_path / "store", durability="none"))  # nothing cached in memory
    path.write_bytes(path.read_bytes().replace(b'"sig":"', b'"sig":"A'))
    assert fresh.attestations(p.key, digest) == []
    assert trusted_hit(fresh, p.key, TrustPolicy.of([a.public])).hit is None
    fresh.close()


def test_gc_keeps_the_attestations_of_live_results_only(store: Store) -> None:
    a = SigningKey.generate("node-a-1")
    p = parts(6, 6)
    old = compute(store, p, 1, a)
    new = compute(store, p, 2, a)  # re-pointed: the old result and its attestation are garbage
    store.gc(grace_seconds=0)
    assert store.attestations(p.key, new) and not store.attestations(p.key, old)
    assert trusted_hit(store, p.key, TrustPolicy.of([a.public])).hit is not None


def test_exported_envelopes_verify_with_securesystemslib(store: Store) -> None:
    a = SigningKey.generate("node-a-1")
    p = parts(2, 2)
    digest = compute(store, p, {"sum": 4}, a)
    (data,) = store.attestations(p.key, digest)
    envelope = Envelope.from_dict(json.loads(data))
    key = SSlibKey(a.keyid, "ed25519", "ed25519", {"public": a.public.raw.hex()})
    assert set(envelope.verify([key], 1)) == {a.keyid}
    body = json.loads(envelope.pae()[envelope.pae().index(b"{"):])
    assert body["predicateType"] == "https://slsa.dev/provenance/v1"
    assert body["predicate"]["buildDefinition"]["externalParameters"]["cacheKey"] == p.key
    payload = envelope.payload.replace(b"/builder/node-a", b"/builder/node-z")
    assert payload != envelope.payload
    forged = Envelope(payload, envelope.payload_type, envelope.signatures)
    with pytest.raises(VerificationError):
        forged.verify([key], 1)


def test_keys_carry_an_epoch_and_parse_back() -> None:
    key = SigningKey.generate("team-ml-1")
    assert split_keyid(key.keyid) == ("team-ml", 1) and next_keyid(key.keyid) == "team-ml-2"
    assert SigningKey.parse(key.keyid, key.pem()).public == key.public
    assert PublicKey.parse(key.keyid, key.public.pem()) == key.public
    assert PublicKey.parse(key.keyid, key.public.base64) == key.public
    for bad in ("Node-1", "node", "node-0", "-node-1", "node-a-b"):
        with pytest.raises(InputError, match="name keys as"):
            SigningKey.generate(bad)
    with pytest.raises(InputError, match="neither PEM nor 32 bytes"):
        PublicKey.parse("node-a-1", "aGVsbG8=")
    with pytest.raises(ValueError):
        TrustPolicy.of([key.public], min_signatures=0)
    assert po.UNSIGNED in judge(TrustPolicy.of([key.public]), parts(1, 1).key, "b3:" + "00" * 32, []).reason
