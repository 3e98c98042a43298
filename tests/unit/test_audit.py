"""The audit log on a real (filesystem) store: what writers append, that racing writers never fork
the chain, and that every kind of tampering is detected and named (memoplane.cas.audit,
memoplane.trust.audit, `memoplane audit`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import DelegatingBackend
from securesystemslib.dsse import Envelope
from securesystemslib.signer._key import SSlibKey  # the package re-exports it without __all__

from memoplane.canonical import canonical_json
from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store
from memoplane.cas import audit as au
from memoplane.cas.audit import checkpoint_name, record_name, verify_chain
from memoplane.cli import main
from memoplane.errors import InputError, StoreCorrupted
from memoplane.keys import KeyParts
from memoplane.trust import SigningKey
from memoplane.trust import attestation as at
from memoplane.trust.audit import checkpoint_envelope, sign_head, verify

RUNTIME = "b3:" + "7e" * 32
OPERATOR = SigningKey.generate("operator-1")


def parts(a: int) -> KeyParts:
    return KeyParts(code="b3:" + "c0" * 32, entrypoint="main", runtime=RUNTIME, inputs={"a": f"json:b3:{a:064x}"})


def fs(path: Path) -> FilesystemBackend:
    return FilesystemBackend(path, durability="none")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(fs(tmp_path / "store"), audit=True, audit_by="node-a")
    yield s
    s.close()


def compute(store: Store, a: int, signer: SigningKey) -> str:
    p = parts(a)
    empty = store.put_bytes(b"")
    result = ResultManifest(store.put_value({"a": a}), empty, empty,
                            Provenance(p.key, {}, RUNTIME, "node-a", 1.0, 2.0, 1.0))
    return store.commit(result, [at.attest(p.key, p.components(), result.digest, signer, "node-a", 1.0, 2.0)])


def bodies(store: Store) -> list[dict[str, object]]:
    return [json.loads(data) for _, data in store.audit_log.read()]


def problems(store: Store, keys: bool = True) -> list[str]:
    return [str(p) for p in verify(store.audit_log, {OPERATOR.keyid: OPERATOR.public} if keys else None).problems]


def six_records(store: Store) -> None:
    for i in range(6):
        store.audit(au.REVOCATION, keyid=f"node-{i}-1")


def edit(store: Store, seq: int, **changes: object) -> None:
    body = json.loads(store.backend.get(record_name(seq)))
    store.backend.put(record_name(seq), canonical_json({**body, **changes}))


# -- what writers append --------------------------------------------------------------------


def test_writes_revocations_and_evictions_are_recorded_in_one_chain(store: Store) -> None:
    agent = SigningKey.generate("node-a-1")
    digest = compute(store, 1, agent)
    envelope = store.attestations(parts(1).key, digest)[0]
    store.put_attestation(parts(1).key, digest, envelope)  # already stored: nothing new to record
    store.audit(au.REVOCATION, keyid="node-a-1")
    store.audit(au.DISPUTE, key=parts(1).key, digests=[digest, "b3:" + "1" * 64], nodes=["node-a", "node-b"])
    compute(store, 2, agent)
    store.delete_ref(parts(2).key)
    assert store.evict(max_age=0).evicted == [parts(1).key]
    kinds = [(b["seq"], b["kind"]) for b in bodies(store)]
    assert kinds == [(1, "attestation"), (2, "ref"), (3, "revocation"), (4, "dispute"), (5, "attestation"),
                     (6, "ref"), (7, "ref-deleted"), (8, "eviction")]
    ref = bodies(store)[1]
    assert ref["key"] == parts(1).key and ref["result"] == digest and ref["by"] == "node-a"
    assert ref["attestations"] == [bodies(store)[0]["attestation"]]
    assert bodies(store)[7] == {**bodies(store)[7], "key": parts(1).key, "result": digest}
    assert problems(store, keys=False) == []


def test_damage_a_read_quarantines_is_recorded(store: Store) -> None:
    digest = compute(store, 1, SigningKey.generate("node-a-1"))
    name = f"results/{digest[3:5]}/{digest[3:]}"
    store.backend.put(name, store.backend.get(name).replace(b'"a":1', b'"a":2'))
    assert store.get_ref(parts(1).key) is None
    result, ref = [b for b in bodies(store) if b["kind"] == "quarantine"]  # the damaged result, then its ref
    assert result["object"] == name and str(result["quarantined_as"]).startswith("quarantine/results%")
    assert "does not match its content" in str(result["reason"])
    assert ref["object"] == "refs/" + parts(1).key[3:] and digest in str(ref["reason"])


def test_a_store_without_a_log_writes_none_until_one_is_started(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    backend = fs(tmp_path / "store")
    plain = Store(backend)  # audit=None: only if the store keeps a log
    compute(plain, 1, SigningKey.generate("node-a-1"))
    assert list(backend.list("audit/")) == [] and not plain.audit_log.started()
    Store(backend, audit=True).audit(au.START)
    monkeypatch.setattr(au, "RECHECK_SECONDS", 0.0)  # a writer that found no log looks again later
    compute(plain, 2, SigningKey.generate("node-a-1"))
    assert [b["kind"] for b in bodies(plain)] == ["audit-start", "attestation", "ref"]
    off = Store(backend, audit=False)
    off.delete_ref(parts(2).key)
    assert len(bodies(plain)) == 3


def test_bad_records_are_refused_with_the_fix(store: Store) -> None:
    with pytest.raises(InputError, match="'Ref' is not a kind"):
        store.audit("Ref")
    with pytest.raises(InputError, match="field 'seq' is reserved"):
        store.audit(au.DISPUTE, seq=3)
    with pytest.raises(InputError, match="keep records under"):
        store.audit(au.DISPUTE, diff="x" * au.MAX_RECORD_BYTES)
    assert bodies(store) == []


# -- racing writers -------------------------------------------------------------------------


def test_create_is_atomic_on_the_filesystem(tmp_path: Path) -> None:
    backend = fs(tmp_path / "store")
    won: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if backend.create("audit/records/000000000001", b"writer %d" % i):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and backend.get("audit/records/000000000001") == b"writer %d" % won[0]
    assert not backend.create("audit/records/000000000001", b"again")
    assert [i.name for i in backend.list("audit/")] == ["audit/records/000000000001"]  # no temp file left


def test_concurrent_appends_from_many_stores_never_fork(tmp_path: Path) -> None:
    writers, each = 6, 25
    barrier = threading.Barrier(writers)

    def write(w: int) -> None:
        s = Store(fs(tmp_path / "store"), audit=True, audit_by=f"writer-{w}")  # no shared lock or tail
        barrier.wait()
        for i in range(each):
            s.audit(au.REVOCATION, keyid=f"node-{w}-{i + 1}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = Store(fs(tmp_path / "store")).audit_log
    chain = verify_chain(log)
    assert chain.problems == [] and chain.records == chain.last == writers * each
    written = sorted((json.loads(d)["by"], json.loads(d)["keyid"]) for _, d in log.read())
    assert written == sorted((f"writer-{w}", f"node-{w}-{i + 1}") for w in range(writers) for i in range(each))


def test_a_writer_far_behind_finds_the_tail(tmp_path: Path) -> None:
    early = Store(fs(tmp_path / "store"), audit=True)
    early.audit(au.START)
    late = Store(fs(tmp_path / "store"), audit=True)
    for i in range(40):
        late.audit(au.REVOCATION, keyid=f"node-{i}-1")
    assert early.audit(au.REVOCATION, keyid="node-x-1") is not None  # its tail hint (1) is 40 behind
    assert verify_chain(early.audit_log).problems == [] and verify_chain(early.audit_log).last == 42


# -- tampering: each kind is detected and names the record ----------------------------------


def signed_six(store: Store) -> None:
    six_records(store)
    checkpoint = sign_head(store, OPERATOR, 1.0)
    assert checkpoint is not None and checkpoint.seq == 6
    assert problems(store) == []


def test_an_edited_record_is_detected(store: Store) -> None:
    signed_six(store)
    edit(store, 3, keyid="node-9-1")
    assert problems(store) == ["record 4: does not chain to record 3 (record 3 edited or replaced, or reordered)"]


def test_an_edited_last_record_is_caught_by_the_checkpoint(store: Store) -> None:
    signed_six(store)
    edit(store, 6, keyid="node-9-1")
    assert problems(store) == ["record 6: not what checkpoint 6 (operator-1) signed (edited)"]


def test_a_record_that_is_not_canonical_is_detected(store: Store) -> None:
    signed_six(store)
    store.backend.put(record_name(2), store.backend.get(record_name(2)) + b" ")
    assert problems(store)[0] == "record 2: not a record memoplane writes (edited)"


def test_a_rewritten_history_is_caught_by_the_checkpoint(store: Store) -> None:
    signed_six(store)
    edit(store, 3, keyid="node-9-1")
    for seq in (4, 5, 6):  # re-chained by someone who can write the store, but has no signing key
        edit(store, seq, prev=au.b3(store.backend.get(record_name(seq - 1))))
    assert problems(store, keys=False) == ["record 6: not what checkpoint 6 (operator-1) signed (edited)"]


def test_a_dropped_record_is_detected(store: Store) -> None:
    signed_six(store)
    store.backend.delete(record_name(3))
    assert problems(store) == ["record 3 missing (dropped)"]
    store.backend.delete(record_name(4))
    assert problems(store) == ["records 3-4 missing (dropped)"]


def test_a_truncated_log_is_detected(store: Store) -> None:
    signed_six(store)
    store.backend.delete(record_name(6))
    store.backend.delete(record_name(5))
    assert problems(store) == ["record 6: missing, though checkpoint 6 (operator-1) signed it (the log was cut at 4)"]


def test_reordered_records_are_detected(store: Store) -> None:
    signed_six(store)
    two, three = store.backend.get(record_name(2)), store.backend.get(record_name(3))
    store.backend.put(record_name(2), three)
    store.backend.put(record_name(3), two)
    assert problems(store) == ["record 2: says it is record 3 (reordered)", "record 3: says it is record 2 (reordered)",
                               "record 4: does not chain to record 3 (record 3 edited or replaced, or reordered)"]


def test_a_record_appended_without_the_chain_is_detected(store: Store) -> None:
    signed_six(store)
    forged = {"v": 1, "seq": 7, "time": "2026-01-01T00:00:00.000000Z", "kind": "ref", "by": "node-a",
              "prev": au.GENESIS, "key": parts(1).key}
    store.backend.put(record_name(7), canonical_json(forged))
    store.backend.put("audit/records/junk", b"{}")
    assert problems(store) == ["audit/records/junk: not a record name (planted)",
                               "record 7: does not chain to record 6 (record 6 edited or replaced, or reordered)"]
    assert store.audit(au.REVOCATION, keyid="node-x-1") is not None  # honest writers carry on after it
    assert verify_chain(store.audit_log).last == 8


def test_forged_checkpoints_are_detected(store: Store) -> None:
    signed_six(store)
    stranger = SigningKey.generate("operator-2")
    digest = verify_chain(store.audit_log).digests[4]
    store.audit_log.put_checkpoint(4, stranger.keyid, checkpoint_envelope(4, digest, stranger, 2.0))
    assert problems(store) == ["checkpoint 4: signed by operator-2, not a given key (forged?)"]
    store.backend.delete(checkpoint_name(4, stranger.keyid))
    # A signature of another statement pasted into a checkpoint under the operator's key id.
    envelope = json.loads(checkpoint_envelope(5, digest, stranger, 2.0))
    envelope["signatures"][0]["keyid"] = OPERATOR.keyid
    store.backend.put(checkpoint_name(5, OPERATOR.keyid), canonical_json(envelope))
    assert problems(store) == ["checkpoint 5: its signature does not verify with operator-1 (forged)"]
    store.backend.put(checkpoint_name(5, OPERATOR.keyid), b"not json")
    assert problems(store) == [f"{checkpoint_name(5, OPERATOR.keyid)}: not a signed checkpoint (edited or planted)"]
    store.backend.delete(checkpoint_name(5, OPERATOR.keyid))
    store.backend.put(checkpoint_name(3, OPERATOR.keyid), store.backend.get(checkpoint_name(6, OPERATOR.keyid)))
    assert problems(store) == [f"{checkpoint_name(3, OPERATOR.keyid)}: signs record 6 by operator-1 (moved)"]


def test_a_checkpoint_verifies_with_a_standard_dsse_verifier(store: Store) -> None:
    signed_six(store)
    envelope = Envelope.from_dict(json.loads(store.backend.get(checkpoint_name(6, OPERATOR.keyid))))
    key = SSlibKey(OPERATOR.keyid, "ed25519", "ed25519", {"public": OPERATOR.public.raw.hex()})
    assert set(envelope.verify([key], 1)) == {OPERATOR.keyid}
    assert json.loads(envelope.payload)["digest"] == verify_chain(store.audit_log).digests[6]


class Reads(DelegatingBackend):
    def __init__(self, inner: FilesystemBackend) -> None:
        super().__init__(inner)
        self.got: list[str] = []

    def before(self, op: str, name: str) -> None:
        if op == "get":
            self.got.append(name)


def test_signing_again_reads_only_the_records_since_the_last_checkpoint(tmp_path: Path) -> None:
    backend = Reads(fs(tmp_path / "store"))
    store = Store(backend, audit=True)
    signed_six(store)
    store.audit(au.REVOCATION, keyid="node-7-1")
    store.audit(au.REVOCATION, keyid="node-8-1")
    backend.got.clear()
    checkpoint = sign_head(store, OPERATOR, 2.0)
    assert checkpoint is not None and checkpoint.seq == 8
    assert [n for n in backend.got if n.startswith(au.RECORDS)] == [record_name(s) for s in (6, 7, 8, 9)]  # 9: the end
    assert sign_head(store, OPERATOR, 3.0) == checkpoint  # nothing new: the same checkpoint, none written
    assert len(list(store.audit_log.checkpoints())) == 2 and problems(store) == []
    store.audit(au.REVOCATION, keyid="node-9-1")
    edit(store, 8, keyid="node-0-1")
    with pytest.raises(StoreCorrupted, match="record 8: not what was checked before"):
        sign_head(store, OPERATOR, 4.0)
    edit(store, 8, keyid="node-8-1")  # back as it was signed
    store.backend.put(record_name(10), store.backend.get(record_name(9)))  # planted after the head
    with pytest.raises(StoreCorrupted, match="record 10: does not chain to record 9"):
        sign_head(store, OPERATOR, 5.0)


def test_with_keys_an_unsigned_log_is_a_problem_and_a_broken_one_is_never_signed(store: Store) -> None:
    six_records(store)
    assert problems(store, keys=False) == []
    assert problems(store) == ["no checkpoint signed by a given key: nothing proves where the log ends"]
    store.backend.delete(record_name(2))
    with pytest.raises(StoreCorrupted, match="record 2 missing"):
        sign_head(store, OPERATOR, 1.0)
    assert list(store.audit_log.checkpoints()) == []


# -- the command line ---------------------------------------------------------------------


def test_cli_start_show_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(tmp_path / "store")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "operator-1.pem").write_bytes(OPERATOR.pem())
    (keys / "operator-1.pub").write_text(OPERATOR.public.pem())
    assert main(["audit", "start", "--store", where]) == 0
    assert "started the audit log" in capsys.readouterr().out
    store = Store(fs(tmp_path / "store"))
    compute(store, 1, SigningKey.generate("node-a-1"))  # audit=None: the log is started, so it appends
    assert main(["audit", "sign", "--store", where, "--key", str(keys / "operator-1.pem")]) == 0
    assert "signed record 3" in capsys.readouterr().out
    assert main(["audit", "show", "--store", where]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["audit-start", "attestation", "ref"]
    assert main(["audit", "show", "--store", where, "--since", "3", "--json"]) == 0
    (shown,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown["kind"] == "ref" and shown["digest"] == verify_chain(store.audit_log).digests[3]
    assert main(["audit", "verify", "--store", where, "--key", str(keys / "operator-1.pub")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok"
    edit(store, 1, by="someone-else")
    assert main(["audit", "verify", "--store", where, "--key", str(keys / "operator-1.pub")]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "record 2: does not chain to record 1 (record 1 edited or replaced, or reordered)"
    assert out[-1] == "1 problem(s)"


def test_cli_key_files_are_named_after_their_key_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "operator.pub").write_text(OPERATOR.public.pem())
    assert main(["audit", "verify", "--store", str(tmp_path / "s"), "--key", str(tmp_path / "operator.pub")]) == 2
    assert "name the key file KEYID.pub or KEYID.pem" in capsys.readouterr().err
    assert main(["audit", "sign", "--store", str(tmp_path / "s"), "--key", str(tmp_path / "none-1.pem")]) == 2
    assert "cannot read it" in capsys.readouterr().err
