"""Trust in embedded mode, through the command line and @memoize: the 2+2=5 forgery of issue 11
is refused and recomputed, `verify` flags it, and keys rotate, revoke and travel between users.
Jobs run in the real sandbox; the forger uses only the public Store API."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memoplane
from memoplane.cas import FilesystemBackend, Store

ADD = """
def main(a, b):
    return {"sum": a + b}
"""


def memoplane_cli(store: Path, *args: str, keys: Path | None = None, code: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(store)}
    if keys is not None:
        env["MEMOPLANE_KEYS_DIR"] = str(keys)
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != code:
        raise AssertionError(f"exit {proc.returncode}, wanted {code}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_add(store: Path, script: Path, keys: Path | None = None) -> dict:
    out = memoplane_cli(store, "run", "--json", str(script), "-i", "a=2", "-i", "b=2", keys=keys)
    return json.loads(out.stdout)


def forge(store_dir: Path, key: str, value: object) -> str:
    """What anyone who can write the store can do: a valid result manifest saying `value`, the ref
    pointed at it, and the honest attestation copied beside it (a replay)."""
    with Store(FilesystemBackend(store_dir)) as store:
        entry = store.read_ref_entry(key)
        assert entry is not None
        honest = store.get_result(entry.result)
        forged = dataclasses.replace(honest, value=store.put_value(value))
        digest = store.commit(forged)
        for envelope in store.attestations(key, entry.result):
            store.put_attestation(key, digest, envelope)
        assert store.read_ref(key) == digest
        return digest


@pytest.fixture
def add_script(tmp_path: Path) -> Path:
    path = tmp_path / "add.py"
    path.write_text(ADD)
    return path


def test_the_forged_2_plus_2_is_5_is_flagged_and_recomputed(tmp_path: Path, add_script: Path) -> None:
    store = tmp_path / "store"
    honest = run_add(store, add_script)
    assert honest["cached"] is False and honest["result"] == {"sum": 4}
    assert run_add(store, add_script)["cached"] is True
    forged = forge(store, honest["cache_key"], {"sum": 5})

    flagged = memoplane_cli(store, "verify", code=7)
    assert f"UNTRUSTED {honest['cache_key']}" in flagged.stdout and "1 ref(s) not trusted" in flagged.stdout
    report = json.loads(memoplane_cli(store, "verify", "--json", code=7).stdout)
    assert report["ok"] is False and report["damaged"] == []
    (untrusted,) = report["trust"]["untrusted"]
    assert untrusted["result"] == forged and "other-result" in untrusted["reason"]
    memoplane_cli(store, "result", honest["cache_key"], code=7)  # not shown by key either

    rerun = run_add(store, add_script)
    assert rerun["cached"] is False and rerun["result"] == {"sum": 4}
    assert rerun["notes"] == [f"the stored result was not trusted (other-result ({_signer(store, rerun)})): "
                              "recomputed"]
    text = memoplane_cli(store, "run", str(add_script), "-i", "a=2", "-i", "b=2")
    assert "cache hit" in text.stderr and json.loads(text.stdout) == {"sum": 4}
    assert memoplane_cli(store, "verify").stdout.rstrip().endswith("ok")
    shown = json.loads(memoplane_cli(store, "result", "--json", honest["cache_key"]).stdout)
    assert shown["result"] == {"sum": 4} and shown["signers"] == [_signer(store, rerun)]


def _signer(store: Path, report: dict) -> str:
    with Store(FilesystemBackend(store)) as s:
        (envelope,) = s.attestations(report["cache_key"], report["result_digest"])
    return str(json.loads(envelope)["signatures"][0]["keyid"])


def test_an_unsigned_result_from_before_trust_is_recomputed_once(tmp_path: Path, add_script: Path) -> None:
    store = tmp_path / "store"
    first = run_add(store, add_script)
    with Store(FilesystemBackend(store)) as s:  # what a store written before attestations holds
        s.commit(dataclasses.replace(s.get_result(first["result_digest"]), meta={"written": "before trust"}))
    explained = json.loads(memoplane_cli(store, "explain", "--json", str(add_script), "-i", "a=2", "-i", "b=2").stdout)
    assert explained["stored"] is False and explained["untrusted"].startswith("unsigned")
    again = run_add(store, add_script)
    assert again["cached"] is False and again["notes"] == ["the stored result was not trusted (unsigned): recomputed"]
    assert run_add(store, add_script)["cached"] is True


def test_rotate_keeps_old_results_and_revoke_recomputes_them(tmp_path: Path, add_script: Path) -> None:
    store = tmp_path / "store"
    memoplane_cli(store, "keys", "create", "alice")
    run_add(store, add_script)
    rotated = json.loads(memoplane_cli(store, "keys", "rotate", "--json").stdout)
    assert rotated == {"keyid": "alice-2", "rotated": "alice-1", "signing": True}
    assert run_add(store, add_script)["cached"] is True  # what alice-1 signed still counts
    out = memoplane_cli(store, "keys", "revoke", "alice-1").stdout
    assert "revoked alice-1" in out
    again = run_add(store, add_script)
    assert again["cached"] is False
    assert again["notes"] == ["the stored result was not trusted (revoked-key (alice-1)): recomputed"]
    assert run_add(store, add_script)["cached"] is True  # signed by alice-2 now
    listed = {k["keyid"]: k for k in json.loads(memoplane_cli(store, "keys", "list", "--json").stdout)["keys"]}
    assert listed["alice-1"]["revoked"] and not listed["alice-1"]["private"] and listed["alice-2"]["signing"]
    # Revoking the key you sign with moves you to its next epoch first.
    out = memoplane_cli(store, "keys", "revoke", "alice-2").stdout
    assert "new results are signed with alice-3" in out
    assert run_add(store, add_script)["notes"] == [
        "the stored result was not trusted (revoked-key (alice-2)): recomputed"]


def test_a_colleague_is_trusted_with_their_exported_key(tmp_path: Path, add_script: Path) -> None:
    store, alice, bob = tmp_path / "store", tmp_path / "alice", tmp_path / "bob"
    memoplane_cli(store, "keys", "create", "alice", keys=alice)
    memoplane_cli(store, "keys", "create", "bob", keys=bob)
    assert run_add(store, add_script, alice)["cached"] is False
    strange = run_add(store, add_script, bob)  # bob does not know alice's key: he computes his own
    assert strange["cached"] is False and strange["notes"] == [
        "the stored result was not trusted (unknown-key (alice-1)): recomputed"]
    assert run_add(store, add_script, alice)["cached"] is False  # nor alice bob's
    (tmp_path / "alice.pub").write_text(memoplane_cli(store, "keys", "export", keys=alice).stdout)
    memoplane_cli(store, "trust", "add", "alice-1", str(tmp_path / "alice.pub"), keys=bob)
    hit = run_add(store, add_script, bob)
    assert hit["cached"] is True and hit["result"] == {"sum": 4}
    trusted = json.loads(memoplane_cli(store, "trust", "list", "--json", keys=bob).stdout)
    assert trusted["trusted"] == ["alice-1", "bob-1"] and trusted["minSignatures"] == 1
    memoplane_cli(store, "trust", "min-signatures", "2", keys=bob)
    assert run_add(store, add_script, bob)["notes"] == [
        "the stored result was not trusted (1 trusted signer(s), too few): recomputed"]
    memoplane_cli(store, "trust", "remove", "alice-1", keys=bob)
    failed = memoplane_cli(store, "trust", "remove", "alice-1", keys=bob, code=2)
    assert failed.stderr.strip() == "memoplane: alice-1 is not trusted — see `memoplane trust list`"
    bad = memoplane_cli(store, "trust", "add", "Alice", str(tmp_path / "alice.pub"), keys=bob, code=2)
    assert bad.stderr.count("\n") == 1 and "name keys as" in bad.stderr


def test_the_sdk_never_serves_the_forgery(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def make() -> memoplane.Memoized:
        @memoplane.memoize(store=tmp_path / "store", memory_bytes=0)
        def add(a: int, b: int) -> dict[str, int]:
            calls.append(a)
            return {"sum": a + b}
        return add  # type: ignore[return-value]

    add = make()
    assert add(2, 2) == {"sum": 4} and add(2, 2) == {"sum": 4} and len(calls) == 1
    forge(tmp_path / "store", add.key(2, 2), {"sum": 5})
    fresh = make()
    with caplog.at_level(logging.WARNING, logger="memoplane.sdk"):
        assert fresh(2, 2) == {"sum": 4}
    assert len(calls) == 2
    assert "the stored result was not trusted (other-result" in caplog.text and "recomputed" in caplog.text
    assert make()(2, 2) == {"sum": 4} and len(calls) == 2  # the recomputed result is signed: a hit


def test_a_revocation_is_recorded_in_the_store_audit_log(tmp_path: Path, add_script: Path) -> None:
    store = tmp_path / "store"
    memoplane_cli(store, "audit", "start")
    memoplane_cli(store, "keys", "create", "carol")
    run_add(store, add_script)
    memoplane_cli(store, "keys", "revoke", "carol-1")
    records = [json.loads(line) for line in memoplane_cli(store, "audit", "show", "--json").stdout.splitlines()]
    assert [r["keyid"] for r in records if r["kind"] == "revocation"] == ["carol-1"]
    assert [r["kind"] for r in records][-1] == "revocation"
