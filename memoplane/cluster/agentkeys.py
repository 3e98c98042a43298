"""The cluster agents' keys (pure): each agent publishes its own public key in its Lease, the
operator remembers every key it has seen (a node that is gone keeps its results trusted) and
trusts them, with its own key, where a ResultCache says `trust.clusterAgents: true`.

A key id seen once keeps its key: a Lease announcing another key under a remembered id is
refused (a node wiped and rejoining under its old id, or someone writing Leases), and so is a
Lease announcing a key named after another node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..trust import PublicKey, split_keyid
from ..trust.nodekey import node_key_name
from . import protocol as p
from .views import meta_of

KEY_SUFFIX = ".pub"   # as a ConfigMap of trusted keys (cluster.trust): `<keyid>.pub` holding PEM


@dataclass(frozen=True)
class ClusterKeys:
    """Whom `trust.clusterAgents` trusts: the operator's key (its map results) and the agents'."""

    operator: PublicKey | None
    agents: tuple[PublicKey, ...] = ()

    @property
    def all(self) -> list[PublicKey]:
        return ([self.operator] if self.operator else []) + list(self.agents)


def key_annotation(key: PublicKey) -> str:
    """The Lease annotation an agent publishes its key with: `<keyid>:<base64 raw key>`."""
    return f"{key.keyid}:{key.base64}"


def announced(lease: Mapping[str, Any]) -> PublicKey | InputError | None:
    """The key an agent's Lease announces (None: not an agent Lease, or no key announced; an
    InputError saying what is wrong with a malformed one or one named after another node)."""
    meta = meta_of(lease)
    if not meta.name.startswith(p.LEASE_PREFIX):
        return None
    text = meta.annotations.get(p.SIGNING_KEY_ANNOTATION)
    if not text:
        return None
    node = meta.name.removeprefix(p.LEASE_PREFIX)
    where = f"Lease {meta.name} annotation {p.SIGNING_KEY_ANNOTATION}"
    keyid, _, raw = str(text).partition(":")
    try:
        key = PublicKey.parse(keyid, raw, field=where)
    except InputError as exc:
        return exc
    if split_keyid(key.keyid)[0] != node_key_name(node):
        return InputError(f"{where} names key {key.keyid}, not a key of node {node}",
                          f"the agent of {node} signs as {node_key_name(node)}-<epoch>")
    return key


@dataclass(frozen=True)
class Merged:
    keys: dict[str, PublicKey]                                        # every key known now, by id
    added: list[PublicKey] = field(default_factory=list)              # new since `known`
    conflicts: list[PublicKey] = field(default_factory=list)          # announced under a known id, refused


def merge(known: Mapping[str, PublicKey], announced_keys: Iterable[PublicKey]) -> Merged:
    """`known` and the keys announced now; a known id keeps its key."""
    keys, added, conflicts = dict(known), [], []
    for key in announced_keys:
        present = keys.get(key.keyid)
        if present is None:
            keys[key.keyid] = key
            added.append(key)
        elif present.raw != key.raw and key not in conflicts:
            conflicts.append(key)
    return Merged(keys, added, conflicts)


def remembered(config_map: Mapping[str, Any] | None) -> tuple[dict[str, PublicKey], list[str]]:
    """The keys kept in the operator's ConfigMap, and a line for each entry that is not a key."""
    keys, problems = {}, []
    for name, text in sorted(((config_map or {}).get("data") or {}).items()):
        if not name.endswith(KEY_SUFFIX):
            continue
        try:
            key = PublicKey.parse(name.removesuffix(KEY_SUFFIX), str(text), field=f"{p.AGENT_KEYS_CONFIG_MAP} {name}")
        except InputError as exc:
            problems.append(str(exc))
            continue
        keys[key.keyid] = key
    return keys, problems


def config_map_data(keys: Iterable[PublicKey]) -> dict[str, str]:
    return {f"{key.keyid}{KEY_SUFFIX}": key.pem() for key in keys}


def latest_epoch(keys: Iterable[str], node: str) -> int:
    """The highest epoch of `node`'s keys among the key ids `keys` (0: none)."""
    name = node_key_name(node)
    return max((split_keyid(k)[1] for k in keys if split_keyid(k)[0] == name), default=0)
