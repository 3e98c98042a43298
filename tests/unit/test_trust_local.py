"""The embedded keyring (memoplane.trust.local): a key made on first use, kept private on disk, and the
trust file that decides what a reader serves."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from memoplane.errors import InputError
from memoplane.settings import keys_dir
from memoplane.trust import SigningKey
from memoplane.trust.local import Keyring, default_name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_is_made_on_first_use_private_and_trusted(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "keys")
    signer = ring.signer()
    assert signer.keyid == f"{default_name()}-1"
    assert mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "keys" / f"{signer.keyid}.key") == 0o600
    assert mode(tmp_path / "keys" / "trust.json") == 0o600
    policy = ring.policy()
    assert policy.keys == {signer.keyid: signer.public} and policy.min_signatures == 1
    assert Keyring(tmp_path / "keys").signer().public == signer.public  # the same key next time
    assert [p.name for p in (tmp_path / "keys").iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_concurrent_first_uses_make_one_key(tmp_path: Path) -> None:
    keys: list[SigningKey] = []
    threads = [threading.Thread(target=lambda: keys.append(Keyring(tmp_path / "k").signer())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.public for k in keys}) == 1 and len(list((tmp_path / "k").glob("*.key"))) == 1


def test_a_key_open_to_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "keys")
    path = tmp_path / "keys" / f"{ring.signer().keyid}.key"
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match=r"open to group or others \(mode 0644\) — chmod 600"):
        Keyring(tmp_path / "keys").signer()
    os.chmod(path, 0o600)
    os.chmod(tmp_path / "keys", 0o755)
    with pytest.raises(InputError, match="chmod 700"):
        Keyring(tmp_path / "keys").create("other")


def test_rotate_makes_the_next_epoch_and_keeps_the_old_one_trusted(tmp_path: Path) -> None:
    ring = Keyring(tmp_path)
    first = ring.create("alice")
    old, second = ring.rotate()
    assert (old, second.keyid) == ("alice-1", "alice-2") and ring.signer().keyid == "alice-2"
    assert {"alice-1", "alice-2"} <= set(ring.policy().keys) and ring.policy().keys["alice-1"] == first.public
    assert not (tmp_path / "alice-1.key").exists() and (tmp_path / "alice-1.pub").exists()
    with pytest.raises(InputError, match="not the latest epoch of alice"):
        ring.rotate("alice-1")
    with pytest.raises(InputError, match="already exists"):
        ring.create("alice")


def test_revoking_the_signing_key_rotates_it_first(tmp_path: Path) -> None:
    ring = Keyring(tmp_path)
    ring.create("bob")
    rotated = ring.revoke("bob-1")
    assert rotated is not None and rotated.keyid == "bob-2" and ring.signer().keyid == "bob-2"
    assert ring.policy().revoked == frozenset({"bob-1"})
    assert ring.revoke("carol-3") is None  # someone else's epoch may be revoked ahead of time
    states = {k.keyid: k.state for k in ring.keys()}
    assert states["bob-1"] == "trusted, REVOKED" and states["bob-2"] == "signing, trusted"
    assert states["carol-3"] == "REVOKED"


def test_trusting_a_colleague(tmp_path: Path) -> None:
    mine, theirs = Keyring(tmp_path / "me"), Keyring(tmp_path / "them")
    colleague = theirs.create("dana")
    mine.trust("dana-1", theirs.public().pem())
    assert mine.policy().keys["dana-1"] == colleague.public
    mine.trust("dana-1", colleague.public.base64)  # the same key again: nothing changes
    with pytest.raises(InputError, match="already trusted with another public key"):
        mine.trust("dana-1", SigningKey.generate("dana-1").public.pem())
    with pytest.raises(InputError, match="neither PEM nor 32 bytes"):
        mine.trust("dana-2", "not a key")
    mine.distrust("dana-1")
    assert "dana-1" not in mine.policy().keys
    with pytest.raises(InputError, match="is your signing key"):
        mine.distrust(mine.signer().keyid)
    mine.revoke("erin-1")
    with pytest.raises(InputError, match="erin-1 is revoked"):
        mine.trust("erin-1", colleague.public.pem())


def test_a_bad_trust_file_is_one_line_naming_it(tmp_path: Path) -> None:
    ring = Keyring(tmp_path)
    ring.signer()
    (tmp_path / "trust.json").write_text('{"trusted": {}, "sharing": true}')
    with pytest.raises(InputError, match="field 'sharing' is not supported yet"):
        ring.policy()
    (tmp_path / "trust.json").write_text('{"minSignatures": 0}')
    with pytest.raises(InputError, match="minSignatures 0 is not a whole number >= 1"):
        ring.policy()
    (tmp_path / "trust.json").write_text("{")
    with pytest.raises(InputError, match=r"trust\.json is not JSON"):
        ring.policy()


def test_names_and_the_default_directory() -> None:
    assert default_name("Jean Dupont", "Work.Laptop.local") == "jean-dupont-work"
    assert default_name("__", "..") == "local"
    assert len(default_name("u" * 80, "h")) == 63
    assert keys_dir({"MEMOPLANE_KEYS_DIR": "/k"}) == Path("/k")
    assert keys_dir({"XDG_CONFIG_HOME": "/c"}) == Path("/c/memoplane/keys")
    with pytest.raises(InputError, match="key name 'Bad Name' is not valid"):
        Keyring(Path("/nonexistent")).create("Bad Name")


def test_vouched_skips_rechecking_only_what_the_policy_trusted(tmp_path: Path) -> None:
    from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store
    from memoplane.keys import KeyParts
    from memoplane.trust import TrustPolicy, Vouched, trusted_hit
    from memoplane.trust.local import commit_signed

    parts = KeyParts(code="b3:" + "c0" * 32, entrypoint="main", runtime="b3:" + "7e" * 32, inputs={})
    signer = SigningKey.generate("me-1")
    with Store(FilesystemBackend(tmp_path / "store", durability="none")) as store:
        def result(value: object) -> ResultManifest:
            empty = store.put_bytes(b"")
            return ResultManifest(store.put_value(value), empty, empty,
                                  Provenance(parts.key, {}, parts.runtime, "here", 1.0, 2.0, 1.0))

        honest = result(4)
        commit_signed(store, parts.components(), honest, store.put_result(honest), signer)
        vouched, policy = Vouched(size=1), TrustPolicy.of([signer.public])
        assert trusted_hit(store, parts.key, policy, vouched=vouched).hit is not None
        assert vouched.get(parts.key, honest.digest) is not None
        store.commit(result(5))  # re-pointed, unsigned: judged afresh and refused, never remembered
        assert trusted_hit(store, parts.key, policy, vouched=vouched).refused
        assert vouched.get(parts.key, result(5).digest) is None
        store.set_ref(parts.key, honest.digest)
        assert trusted_hit(store, parts.key, policy, vouched=vouched).hit is not None
