"""API keys of `memoplane serve`: each belongs to a team, carries scopes, and is stored only as hashes.

The keys file (settings.api_keys_path: apikeys.json in the keys directory by default, mode 0600):
    {"v": 1, "keys": {keyid: {team, verbs, sandbox, namespaces, secretHash, signingKey, created, revoked}},
     "teams": {team: tier}, "grants": {team: [reader team, ...]}}
`namespaces`: the Kubernetes namespaces the key's /v1/run may make ComputeJobs in (server/cluster_runs.py;
absent in files written before it: none). A grant lets the reader teams' /v1/run be served the granting team's results (server/memo.py);
sandboxes, files and snapshots are never shared.
It lives beside the server, not in the store: whoever can write the store is not trusted, and a
key planted there would let them run code in the server's sandboxes.

A key's token, shown once, is `<keyid>.<secret>`. The file keeps sha256(secret) (what a bearer
token is checked against) and the HMAC key signed requests use, HMAC-SHA256(secret, SIGNING_LABEL):
both one-way, so the file never yields the token. HMAC is symmetric, though: whoever reads the
file can sign requests as any key in it (it is 0600 for that reason).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.common import DNS_LABEL_PATTERN
from ..errors import InputError
from ..settings import API_KEYS_ENV, DEFAULT_TIER, open_to_others
from ..trust.local import NAME_RULE, is_name, write_atomically

# The team of the loopback caller when serve runs without API keys: the machine's own user, whose
# results are the CLI's (server/stores.py). No API key belongs to it.
LOCAL_TEAM = "local"

VERBS = ("run", "exec", "files", "snapshot", "admin")
SIGNING_LABEL = b"memoplane api signing key v1"
_FIELDS = {"team", "verbs", "sandbox", "secretHash", "signingKey", "created", "revoked"}
_OPTIONAL = {"namespaces"}
_NAMESPACE = re.compile(DNS_LABEL_PATTERN)


def split_token(token: str) -> tuple[str, str]:
    keyid, dot, secret = token.strip().partition(".")
    if not dot or not keyid or not secret:
        raise InputError("the API key is not of the form KEYID.SECRET", "use the token `memoplane apikey create` printed")
    return keyid, secret


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def signing_key(secret: str) -> bytes:
    """The HMAC key of signed requests, derived from the secret (client and server alike)."""
    return hmac.new(secret.encode(), SIGNING_LABEL, hashlib.sha256).digest()


@dataclass
class ApiKey:
    keyid: str
    team: str
    verbs: list[str]
    sandbox: str | None
    secret_hash: str
    signing_key: str        # hex
    created: float
    revoked: float | None = None
    namespaces: list[str] = field(default_factory=list)   # where its /v1/run makes ComputeJobs

    def to_json(self) -> dict[str, Any]:
        return {"team": self.team, "verbs": sorted(self.verbs), "sandbox": self.sandbox,
                "namespaces": sorted(self.namespaces), "secretHash": self.secret_hash, "signingKey": self.signing_key, "created": self.created,
                "revoked": self.revoked}

    def public(self) -> dict[str, Any]:
        """What `apikey list` shows: never a hash."""
        return {"keyid": self.keyid, "team": self.team, "verbs": sorted(self.verbs), "sandbox": self.sandbox,
                "namespaces": sorted(self.namespaces), "created": self.created, "revoked": self.revoked}


@dataclass
class KeysFile:
    keys: dict[str, ApiKey] = field(default_factory=dict)
    teams: dict[str, str] = field(default_factory=dict)   # team -> tier
    grants: dict[str, list[str]] = field(default_factory=dict)   # team -> teams that may read its results

    def tier_of(self, team: str) -> str:
        return self.teams.get(team, DEFAULT_TIER)

    def readable_by(self, team: str) -> tuple[str, ...]:
        """The teams whose results `team` may read besides its own (they granted it)."""
        return tuple(sorted(owner for owner, readers in self.grants.items() if team in readers))

    def to_bytes(self) -> bytes:
        body = {"v": 1, "keys": {k: key.to_json() for k, key in sorted(self.keys.items())},
                "teams": dict(sorted(self.teams.items())),
                "grants": {t: sorted(r) for t, r in sorted(self.grants.items()) if r}}
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> KeysFile:
        fix = f"fix {where} or move it away (its keys stop working), or set {API_KEYS_ENV}"
        try:
            body = json.loads(data)
            keys = {keyid: _key(keyid, entry) for keyid, entry in body["keys"].items()}
            teams = {str(team): str(tier) for team, tier in body.get("teams", {}).items()}
            grants = {str(team): [str(r) for r in readers] for team, readers in body.get("grants", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{where} is not an API keys file ({e})", fix) from None
        return cls(keys, teams, grants)


def _key(keyid: str, entry: dict[str, Any]) -> ApiKey:
    if not _FIELDS <= set(entry) <= _FIELDS | _OPTIONAL or not set(entry["verbs"]) <= set(VERBS):
        raise ValueError(f"key {keyid} has other fields or verbs than this version writes")
    return ApiKey(keyid, str(entry["team"]), list(entry["verbs"]), entry["sandbox"], str(entry["secretHash"]),
                  str(entry["signingKey"]), float(entry["created"]), entry["revoked"],
                  [str(n) for n in entry.get("namespaces", [])])


class ApiKeys:
    """The keys file: read for every request (re-parsed only when it changed), changed under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._cached = KeysFile()

    def load(self) -> KeysFile:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return KeysFile()
        version = (info.st_ino, info.st_mtime_ns, info.st_size)
        if version != self._seen:
            if open_to_others(info):   # group-readable by our own group: a Secret volume with fsGroup
                raise InputError(f"the API keys file {self.path} is open to group or others "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o})", f"chmod 600 {self.path}")
            self._cached, self._seen = KeysFile.parse(self.path.read_bytes(), str(self.path)), version
        return self._cached

    def create(self, team: str, verbs: list[str], sandbox: str | None = None, tier: str | None = None,
               now: float | None = None, namespaces: list[str] | None = None) -> tuple[ApiKey, str]:
        """A new key of `team` and its token (shown once; only its hashes are kept)."""
        for namespace in namespaces or []:
            if len(namespace) > 63 or not _NAMESPACE.match(namespace):
                raise InputError(f"--namespace {namespace[:80]!r} is not a Kubernetes namespace name",
                                 "give a DNS label: lowercase letters, digits and '-', at most 63")
        if not is_name(team):
            raise InputError(f"team {team!r} is not valid", f"use {NAME_RULE}")
        if team == LOCAL_TEAM:
            raise InputError(f"team {team!r} is the loopback caller's own (it shares the CLI's store)",
                             "give the key's team another name")
        unknown = sorted(set(verbs) - set(VERBS))
        if unknown or not verbs:
            raise InputError(f"verb {unknown[0]!r} is not a verb" if unknown else "a key needs at least one verb",
                             f"give --verb among {', '.join(VERBS)}")
        keyid, secret = "mk" + secrets.token_hex(8), secrets.token_urlsafe(32)
        key = ApiKey(keyid, team, sorted(set(verbs)), sandbox, secret_hash(secret), signing_key(secret).hex(),
                     time.time() if now is None else now, namespaces=sorted(set(namespaces or [])))
        with self._changing() as keys:
            keys.keys[keyid] = key
            if tier is not None:
                keys.teams[team] = tier
        return key, f"{keyid}.{secret}"

    def revoke(self, keyid: str, now: float | None = None) -> ApiKey:
        with self._changing() as keys:
            key = keys.keys.get(keyid)
            if key is None:
                raise InputError(f"no API key {keyid} in {self.path}", "see `memoplane apikey list`")
            if key.revoked is None:
                key.revoked = time.time() if now is None else now
            return key

    def grant(self, team: str, reader: str) -> bool:
        """Let team `reader` be served `team`'s results; False if it already was."""
        for name, what in ((team, "team"), (reader, "reader team")):
            if not is_name(name) or name == LOCAL_TEAM:
                raise InputError(f"{what} {name[:80]!r} is not a team of API keys", f"use {NAME_RULE}, not "
                                 f"{LOCAL_TEAM!r}")
        if team == reader:
            raise InputError(f"team {team} already reads its own results", "name another reader team")
        with self._changing() as keys:
            readers = keys.grants.setdefault(team, [])
            if reader in readers:
                return False
            readers.append(reader)
            return True

    def ungrant(self, team: str, reader: str) -> bool:
        """Stop serving `team`'s results to `reader` (from its next request); False if it was not."""
        with self._changing() as keys:
            readers = keys.grants.get(team, [])
            if reader not in readers:
                return False
            readers.remove(reader)
            return True

    @contextlib.contextmanager
    def _changing(self) -> Iterator[KeysFile]:
        """The file under its lock, re-read; written back atomically (0600) when the block succeeds."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(self.path.parent / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = KeysFile.parse(self.path.read_bytes(), str(self.path)) if self.path.exists() else KeysFile()
            yield keys
            write_atomically(self.path, keys.to_bytes(), 0o600)
        finally:
            os.close(lock)

