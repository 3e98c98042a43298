"""Embedded mode's keyring and trust file (DESIGN §11): the key this user signs with, and whom they believe.

The keys directory (settings.keys_dir, mode 0700) holds
    <keyid>.key   a private key this user signs or signed with (PKCS#8 PEM, mode 0600)
    <keyid>.pub   its public key (PEM), to hand to colleagues (`memoplane keys export`)
    trust.json    {"signingKey": keyid, "trusted": {keyid: PEM}, "revoked": [keyid], "minSignatures": n}
A key is made on first use, named after the user and host (`alice-laptop-1`), and trusted.
Every change happens under a lock and is written atomically: a reader sees the old file or the
new one, and a private key is either whole or absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cas import ResultManifest, Store
from ..errors import InputError
from ..settings import KEYS_DIR_ENV, keys_dir
from .attestation import attest
from .keys import KEYID_PATTERN, PublicKey, SigningKey, check_keyid, read_signing_key, split_keyid
from .policy import TrustPolicy, Verdict

TRUST_FILE = "trust.json"
_FIELDS = {"v", "signingKey", "trusted", "revoked", "minSignatures"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
NAME_RULE = "lowercase letters, digits and '-', at most 63, e.g. alice-laptop"


def is_name(text: str) -> bool:
    """Whether `text` follows NAME_RULE (key names, API teams)."""
    return bool(_NAME.match(text))


@dataclass
class TrustFile:
    """What trust.json says; an absent file is an empty one (the first use fills it)."""

    signing_key: str | None = None
    trusted: dict[str, str] = field(default_factory=dict)  # keyid -> public key PEM
    revoked: list[str] = field(default_factory=list)
    min_signatures: int = 1

    def policy(self, where: str) -> TrustPolicy:
        keys = [PublicKey.parse(keyid, pem, f"{where}: trusted") for keyid, pem in self.trusted.items()]
        return TrustPolicy.of(keys, self.revoked, self.min_signatures)

    def to_json(self) -> bytes:
        body = {"v": 1, "signingKey": self.signing_key, "trusted": dict(sorted(self.trusted.items())),
                "revoked": sorted(set(self.revoked)), "minSignatures": self.min_signatures}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> TrustFile:
        fix = f"fix the file, or move it away to start over (a new key is made), or set {KEYS_DIR_ENV}"
        try:
            body = json.loads(data)
        except ValueError:
            raise InputError(f"{where} is not JSON", fix) from None
        if not isinstance(body, dict):
            raise InputError(f"{where} is not a JSON object", fix)
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise InputError(f"{where}: field {unknown[0]!r} is not supported yet", f"remove it; fields: {sorted(_FIELDS)}")
        trusted, revoked = body.get("trusted", {}), body.get("revoked", [])
        signing, minimum = body.get("signingKey"), body.get("minSignatures", 1)
        if not isinstance(trusted, dict) or not all(isinstance(v, str) for v in trusted.values()):
            raise InputError(f"{where}: trusted is not an object of key id -> PEM", fix)
        if not isinstance(revoked, list):
            raise InputError(f"{where}: revoked is not a list of key ids", fix)
        if type(minimum) is not int or minimum < 1:
            raise InputError(f"{where}: minSignatures {minimum!r} is not a whole number >= 1",
                             "set it with `memoplane trust min-signatures N`")
        for keyid in [*trusted, *revoked, *([signing] if signing is not None else [])]:
            check_keyid(keyid, f"{where}: key id")
        return cls(signing, dict(trusted), list(revoked), minimum)


@dataclass(frozen=True)
class KeyInfo:
    keyid: str
    signing: bool      # what this user's new results are signed with
    trusted: bool      # in the trust file (results it signed are hits, unless revoked)
    revoked: bool
    private: bool      # its private key is in the keys directory
    public: PublicKey | None

    @property
    def state(self) -> str:
        words = [w for w, on in (("signing", self.signing), ("trusted", self.trusted),
                                 ("REVOKED", self.revoked)) if on]
        return ", ".join(words) or "not trusted"

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "signing": self.signing, "trusted": self.trusted, "revoked": self.revoked,
                "private": self.private, "publicKey": self.public.pem() if self.public else None}


class Keyring:
    """The keys directory. Methods that change it take its lock and re-read it first."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else keys_dir()
        self.trust_path = self.directory / TRUST_FILE

    # -- reading -------------------------------------------------------------------------

    def load(self) -> TrustFile:
        try:
            data = self.trust_path.read_bytes()
        except FileNotFoundError:
            return TrustFile()
        except OSError as exc:
            raise InputError(f"cannot read {self.trust_path} ({exc.strerror})", f"check it, or set {KEYS_DIR_ENV}") \
                from None
        return TrustFile.parse(data, str(self.trust_path))

    def signer(self) -> SigningKey:
        """The key this user signs with, made on first use."""
        keyid = self._ready().signing_key
        assert keyid is not None
        return self._private(keyid)

    def policy(self) -> TrustPolicy:
        """Whom this user trusts (their own key, from the first use on)."""
        return self._ready().policy(str(self.trust_path))

    def keys(self) -> list[KeyInfo]:
        trust = self._ready()
        privates = {p.name.removesuffix(".key") for p in self.directory.glob("*.key")}
        ids = sorted(set(trust.trusted) | set(trust.revoked) | privates, key=_by_name_and_epoch)
        return [KeyInfo(k, k == trust.signing_key, k in trust.trusted, k in trust.revoked, k in privates,
                        self._public(k, trust)) for k in ids]

    def public(self, keyid: str | None = None) -> PublicKey:
        trust = self._ready()
        keyid = check_keyid(keyid, "KEYID") if keyid else trust.signing_key
        assert keyid is not None
        key = self._public(keyid, trust)
        if key is None:
            raise InputError(f"no public key {keyid} in {self.directory}", "see `memoplane keys list`")
        return key

    # -- changing ------------------------------------------------------------------------

    def create(self, name: str) -> SigningKey:
        """A new key NAME-1, trusted, and the one new results are signed with."""
        if not _NAME.match(name):
            raise InputError(f"key name {name!r} is not valid", f"use {NAME_RULE}")
        with self._changing() as trust:
            taken = [k for k in self._known(trust) if split_keyid(k)[0] == name]
            if taken:
                raise InputError(f"key {max(taken, key=_by_name_and_epoch)} already exists",
                                 f"`memoplane keys rotate {max(taken, key=_by_name_and_epoch)}` makes its next epoch")
            return self._new_signing_key(trust, f"{name}-1")

    def rotate(self, keyid: str | None = None) -> tuple[str, SigningKey]:
        """(the old key id, its next epoch): trusted and signing from now on. The old epoch stays trusted
        (what it signed still counts; `revoke` it if it leaked); its private key is deleted."""
        with self._changing() as trust:
            old = check_keyid(keyid, "KEYID") if keyid else trust.signing_key
            assert old is not None
            if not (self.directory / f"{old}.pub").is_file():
                raise InputError(f"{old} was not made here: only its owner can rotate it",
                                 "see `memoplane keys list` for your keys")
            return old, self._rotated(trust, old)

    def revoke(self, keyid: str) -> SigningKey | None:
        """Put `keyid` on the revoked list: what it signed stops counting. Revoking the signing key
        rotates it first (returned), so new results are signed by a key that counts."""
        check_keyid(keyid, "KEYID")
        with self._changing() as trust:
            rotated = self._rotated(trust, keyid) if keyid == trust.signing_key else None
            if keyid not in trust.revoked:
                trust.revoked.append(keyid)
            return rotated

    def trust(self, keyid: str, text: str) -> PublicKey:
        key = PublicKey.parse(check_keyid(keyid, "KEYID"), text, "the public key")
        with self._changing() as trust:
            if keyid in trust.revoked:
                raise InputError(f"{keyid} is revoked", "trust its next epoch instead (ask for the rotated key)")
            known = trust.trusted.get(keyid)
            if known is not None and PublicKey.parse(keyid, known) != key:
                raise InputError(f"{keyid} is already trusted with another public key",
                                 f"`memoplane trust remove {keyid}` first, if the new one is right")
            trust.trusted[keyid] = key.pem()
        return key

    def distrust(self, keyid: str) -> None:
        check_keyid(keyid, "KEYID")
        with self._changing() as trust:
            if keyid == trust.signing_key:
                raise InputError(f"{keyid} is your signing key: untrusting it would make every run recompute",
                                 f"`memoplane keys rotate` replaces it, `memoplane keys revoke {keyid}` disowns it")
            if trust.trusted.pop(keyid, None) is None:
                raise InputError(f"{keyid} is not trusted", "see `memoplane trust list`")

    def require(self, min_signatures: int) -> None:
        if min_signatures < 1:
            raise InputError(f"min-signatures {min_signatures} is below 1", "give a whole number of 1 or more")
        with self._changing() as trust:
            trust.min_signatures = min_signatures

    # -- the directory -------------------------------------------------------------------

    def _ready(self) -> TrustFile:
        """The trust file, with a signing key (made on first use)."""
        trust = self.load()
        if trust.signing_key is not None:
            return trust
        with self._changing() as trust:
            if trust.signing_key is None:
                self._new_signing_key(trust, f"{default_name()}-{self._next_epoch(trust, default_name())}")
            return trust

    @contextlib.contextmanager
    def _changing(self) -> Iterator[TrustFile]:
        """The trust file under the directory's lock; written back (atomically) if the block succeeds."""
        self._make_directory()
        lock = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            trust = self.load()
            before = trust.to_json()
            yield trust
            if trust.to_json() != before:
                write_atomically(self.trust_path, trust.to_json(), 0o600)
        finally:
            os.close(lock)  # releases the lock

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = self.directory.stat().st_mode
        except OSError as exc:
            raise InputError(f"cannot make the keys directory {self.directory} ({exc.strerror})",
                             f"set {KEYS_DIR_ENV} to a directory you own") from None
        if mode & 0o077:
            raise InputError(f"the keys directory {self.directory} is open to group or others "
                             f"(mode {stat.S_IMODE(mode):04o})", f"chmod 700 {self.directory}")

    def _new_signing_key(self, trust: TrustFile, keyid: str) -> SigningKey:
        key = SigningKey.generate(keyid)
        write_atomically(self.directory / f"{keyid}.key", key.pem(), 0o600, replace=False)
        write_atomically(self.directory / f"{keyid}.pub", key.public.pem().encode(), 0o644, replace=False)
        trust.trusted[keyid] = key.public.pem()
        trust.signing_key = keyid
        return key

    def _rotated(self, trust: TrustFile, old: str) -> SigningKey:
        name, _ = split_keyid(old)
        latest = max((k for k in self._known(trust) if split_keyid(k)[0] == name), key=_by_name_and_epoch)
        if latest != old:
            raise InputError(f"{old} is not the latest epoch of {name} ({latest} is)", f"rotate {latest}")
        key = self._new_signing_key(trust, f"{name}-{self._next_epoch(trust, name)}")
        (self.directory / f"{old}.key").unlink(missing_ok=True)  # nothing signs with it any more
        return key

    def _known(self, trust: TrustFile) -> set[str]:
        files = {p.stem for p in self.directory.glob("*.key")} | {p.stem for p in self.directory.glob("*.pub")}
        return {k for k in files if KEYID_PATTERN.match(k)} | set(trust.trusted) | set(trust.revoked)

    def _next_epoch(self, trust: TrustFile, name: str) -> int:
        epochs = [split_keyid(k)[1] for k in self._known(trust) if split_keyid(k)[0] == name]
        return max(epochs, default=0) + 1

    def _private(self, keyid: str) -> SigningKey:
        return read_signing_key(self.directory / f"{keyid}.key", keyid, "the signing key: ",
                                "`memoplane keys create NAME` makes a new one")

    def _public(self, keyid: str, trust: TrustFile) -> PublicKey | None:
        if keyid in trust.trusted:
            return PublicKey.parse(keyid, trust.trusted[keyid])
        path = self.directory / f"{keyid}.pub"
        return PublicKey.parse(keyid, path.read_bytes(), str(path)) if path.is_file() else None


def default_name(user: str | None = None, host: str | None = None) -> str:
    """`<user>-<host>` as a key name: lowercase, other characters as '-', at most 63."""
    if user is None:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no passwd entry (some containers)
            user = "user"
    host = (host if host is not None else socket.gethostname()).split(".")[0]
    name = re.sub(r"[^a-z0-9]+", "-", f"{user}-{host}".lower()).strip("-")[:63].strip("-")
    return name or "local"


def _by_name_and_epoch(keyid: str) -> tuple[str, int]:
    return split_keyid(keyid)


def write_atomically(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, sync it, then rename it over `path` (or, with
    replace=False, link it there: an existing file is never overwritten)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -- what embedded mode uses ---------------------------------------------------------------


def local_signer() -> SigningKey:
    return Keyring().signer()


def local_policy() -> TrustPolicy:
    return Keyring().policy()


def builder_of(signer: SigningKey) -> str:
    """The builder id an embedded result names: the signing key's name."""
    return "embedded/" + split_keyid(signer.keyid)[0]


def commit_signed(store: Store, key_manifest: Mapping[str, Any], result: ResultManifest, digest: str,
                  signer: SigningKey) -> None:
    """Attest that `signer` computed the stored result `digest`, then point its key at it."""
    p = result.provenance
    envelope = attest(result.key, key_manifest, digest, signer, builder_of(signer), p.started_at, p.ended_at)
    store.set_ref(result.key, digest, [store.put_attestation(result.key, digest, envelope)])


def refused_note(verdict: Verdict) -> str:
    """One line for a user whose stored result was refused, e.g. `... (unsigned): recomputed`."""
    parts = [f"{len(verdict.signers)} trusted signer(s), too few"] if verdict.signers else []
    parts += dict.fromkeys(str(r) for r in verdict.refusals)
    return f"the stored result was not trusted ({', '.join(parts) or 'unsigned'}): recomputed"
