"""A ResultCache's effective trust policy (pure): whose attestations make a stored result a hit.

From the cache's `spec.trust`, the Secrets and ConfigMaps it names (read by the caller) and
the cluster's keys (memoplane.cluster.agentkeys: the operator's and each agent's own). Key material that is missing or malformed makes the cache
unusable, with a message: its jobs wait, and nothing is served on a guess.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..api.resultcache import TrustSpec
from ..api.specs import SpecError, parse
from ..errors import InputError
from ..settings import SIGNING_KEY_FILE_ENV, SigningSettings
from ..trust import PublicKey, SigningKey, TrustPolicy
from .agentkeys import ClusterKeys
from .views import section

SECRET, CONFIG_MAP = "Secret", "ConfigMap"
KEY_SUFFIX = ".pub"   # a referenced object's entries `<keyid>.pub` hold PEM public keys


@dataclass(frozen=True)
class KeySource:
    kind: str   # SECRET or CONFIG_MAP, in the cache's namespace
    name: str

    def __str__(self) -> str:
        return f"{self.kind} '{self.name}'"


@dataclass(frozen=True)
class Unusable:
    """The cache's trusted keys cannot be determined: jobs using it wait (never served)."""

    message: str


def trust_spec(cache: Mapping[str, Any]) -> TrustSpec | Unusable:
    try:
        return parse(TrustSpec, section(section(cache, "spec"), "trust") or {}, root="spec.trust")
    except SpecError as exc:
        return Unusable(str(exc))


def key_sources(cache: Mapping[str, Any]) -> list[KeySource]:
    """The Secrets and ConfigMaps whose keys the cache trusts: what the caller reads."""
    spec = trust_spec(cache)
    if isinstance(spec, Unusable):
        return []
    sources = []
    for entry in spec.keys or []:
        if entry.secret_ref is not None:
            sources.append(KeySource(SECRET, entry.secret_ref.name))
        elif entry.config_map_ref is not None:
            sources.append(KeySource(CONFIG_MAP, entry.config_map_ref.name))
    return sources


def object_keys(source: KeySource, obj: Mapping[str, Any] | None) -> list[PublicKey] | Unusable:
    """The public keys in a referenced Secret (data base64-encoded) or ConfigMap (data as text)."""
    if obj is None:
        return Unusable(f"spec.trust.keys: {source} does not exist in the cache's namespace: create it "
                        f"with entries <keyid>{KEY_SUFFIX} holding PEM public keys")
    entries = {name: value for name, value in (obj.get("data") or {}).items() if name.endswith(KEY_SUFFIX)}
    if not entries:
        return Unusable(f"spec.trust.keys: {source} has no <keyid>{KEY_SUFFIX} entry: add one per trusted key")
    keys = []
    for name, value in sorted(entries.items()):
        try:
            text = base64.b64decode(value, validate=True) if source.kind == SECRET else str(value).encode()
            keys.append(PublicKey.parse(name.removesuffix(KEY_SUFFIX), text, field=f"{source} entry {name}"))
        except (binascii.Error, ValueError):
            return Unusable(f"spec.trust.keys: {source} entry {name} is not base64 data: store the PEM as it is")
        except InputError as exc:
            return Unusable(f"spec.trust.keys: {exc}")
    return keys


def effective_policy(cache: Mapping[str, Any], objects: Mapping[KeySource, Mapping[str, Any] | None],
                     cluster: ClusterKeys) -> TrustPolicy | Unusable:
    """The cache's policy: its inline keys, the keys of the objects it names (`objects`, as
    read), and the cluster's keys (the operator's and every agent's) unless `clusterAgents: false`."""
    spec = trust_spec(cache)
    if isinstance(spec, Unusable):
        return spec
    keys: list[PublicKey] = []
    for index, entry in enumerate(spec.keys or []):
        if entry.public_key is not None:
            try:
                keys.append(PublicKey.parse(entry.public_key.key_id, entry.public_key.key,
                                            field=f"spec.trust.keys[{index}].publicKey"))
            except InputError as exc:
                return Unusable(str(exc))
    for source in key_sources(cache):
        found = object_keys(source, objects.get(source))
        if isinstance(found, Unusable):
            return found
        keys += found
    if spec.cluster_agents:
        if not cluster.all:
            return Unusable("spec.trust.clusterAgents: the operator has no signing key (MEMOPLANE_SIGNING_KEY_FILE) "
                            "and no agent has published one: install with the chart, or set clusterAgents: false")
        keys += cluster.all
    for a, b in zip(sorted(keys, key=lambda k: k.keyid), sorted(keys, key=lambda k: k.keyid)[1:], strict=False):
        if a.keyid == b.keyid and a.raw != b.raw:
            return Unusable(f"spec.trust.keys: key id {a.keyid} names two different keys: give each key its own id")
    revoked = frozenset(spec.revoked or ())
    operator = cluster.operator if spec.cluster_agents and spec.min_signatures > 1 else None
    signers = possible_signers(keys, revoked, operator)
    if len(signers) < spec.min_signatures:
        return Unusable(f"spec.trust.minSignatures: {spec.min_signatures} signers needed, {len(signers)} key(s) "
                        f"can attest one result ({', '.join(signers) or 'none'}): trust more keys, run agents "
                        "on more nodes, or lower minSignatures")
    return TrustPolicy.of(keys, revoked, spec.min_signatures)


def possible_signers(keys: list[PublicKey], revoked: frozenset[str], operator: PublicKey | None) -> list[str]:
    """The distinct, unrevoked key ids that can be signers of one result. The operator's key (given when
    minSignatures > 1) is not: it is the only signer of what it computes (map lists), and signs no job's."""
    skip = revoked | ({operator.keyid} if operator else set())
    return sorted({k.keyid for k in keys} - skip)


def load_signer(settings: SigningSettings) -> SigningKey:
    """The key this process signs with (InputError, one line, when it is unset or unreadable)."""
    keyid, pem = settings.read()
    return SigningKey.parse(keyid, pem, where=SIGNING_KEY_FILE_ENV)
