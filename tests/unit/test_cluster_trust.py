"""A ResultCache's effective trust policy, table-tested: inline keys, Secrets and ConfigMaps
holding <keyid>.pub entries, the cluster's keys (the operator's and each agent's own),
revocations, and what makes a cache unusable (its jobs wait) rather than served on a guess."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from memoplane.cluster import trust as t
from memoplane.cluster.agentkeys import ClusterKeys
from memoplane.trust import SigningKey, TrustPolicy

OPERATOR = SigningKey.generate("mp-agents-1").public
NODE_A = SigningKey.generate("node-a-1").public
NODE_B = SigningKey.generate("node-b-1").public
AGENTS = ClusterKeys(OPERATOR, (NODE_A, NODE_B))      # the operator and two agents
ONE_AGENT = ClusterKeys(OPERATOR, (NODE_A,))
NONE = ClusterKeys(None)
TEAM_A = SigningKey.generate("team-a-1").public
TEAM_B = SigningKey.generate("team-b-2").public
CI = SigningKey.generate("ci-3").public

SECRET = t.KeySource(t.SECRET, "team-keys")
CONFIG_MAP = t.KeySource(t.CONFIG_MAP, "ci-keys")


def cache(trust: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"store": {"bucket": "memoplane"}}
    if trust is not None:
        spec["trust"] = trust
    return {"metadata": {"namespace": "ml", "name": "c"}, "spec": spec}


def secret(**entries: str) -> dict[str, Any]:
    return {"data": {name: base64.b64encode(pem.encode()).decode() for name, pem in entries.items()}}


def config_map(**entries: str) -> dict[str, Any]:
    return {"data": dict(entries)}


TEAM_SECRET = secret(**{"team-a-1.pub": TEAM_A.pem(), "team-b-2.pub": TEAM_B.pem(), "README": "ignored"})
CI_MAP = config_map(**{"ci-3.pub": CI.pem()})
BY_SECRET = {"secretRef": {"name": "team-keys"}}
BY_MAP = {"configMapRef": {"name": "ci-keys"}}

# (id, spec.trust, objects read, agents' key, trusted key ids, revoked, min signatures)
POLICIES: list[tuple[str, dict[str, Any] | None, dict[t.KeySource, Any], Any, set[str], set[str], int]] = [
    ("default-trusts-the-cluster", None, {}, AGENTS, {"mp-agents-1", "node-a-1", "node-b-1"}, set(), 1),
    ("operator-alone", None, {}, ClusterKeys(OPERATOR), {"mp-agents-1"}, set(), 1),
    ("two-nodes-for-two", {"minSignatures": 2}, {}, AGENTS, {"mp-agents-1", "node-a-1", "node-b-1"}, set(), 2),
    ("revoke-one-node", {"revoked": ["node-a-1"]}, {}, AGENTS, {"mp-agents-1", "node-a-1", "node-b-1"},
     {"node-a-1"}, 1),
    ("inline-pem-and-agents", {"keys": [{"publicKey": {"keyId": "team-a-1", "key": TEAM_A.pem()}}]}, {},
     ONE_AGENT, {"team-a-1", "mp-agents-1", "node-a-1"}, set(), 1),
    ("inline-base64-only", {"clusterAgents": False, "keys": [{"publicKey": {"keyId": "ci-3", "key": CI.base64}}]},
     {}, AGENTS, {"ci-3"}, set(), 1),
    ("secret-entries", {"clusterAgents": False, "keys": [BY_SECRET]}, {SECRET: TEAM_SECRET}, NONE,
     {"team-a-1", "team-b-2"}, set(), 1),
    ("secret-map-revoked-two-of", {"keys": [BY_SECRET, BY_MAP], "revoked": ["team-b-2"], "minSignatures": 2},
     {SECRET: TEAM_SECRET, CONFIG_MAP: CI_MAP}, ClusterKeys(OPERATOR),
     {"team-a-1", "team-b-2", "ci-3", "mp-agents-1"}, {"team-b-2"}, 2),
]


@pytest.mark.parametrize(("case", "trust", "objects", "agents", "keyids", "revoked", "minimum"), POLICIES,
                         ids=[c[0] for c in POLICIES])
def test_effective_policy(case: str, trust: dict[str, Any] | None, objects: dict[t.KeySource, Any], agents: Any,
                          keyids: set[str], revoked: set[str], minimum: int) -> None:
    policy = t.effective_policy(cache(trust), objects, agents)
    assert isinstance(policy, TrustPolicy), policy
    assert set(policy.keys) == keyids and policy.revoked == revoked and policy.min_signatures == minimum
    assert all(policy.keys[k].raw == key.raw for key in (OPERATOR, NODE_A, NODE_B, TEAM_A, TEAM_B, CI)
               for k in [key.keyid]
               if k in keyids)


# (id, spec.trust, objects read, agents' key, text of the message)
UNUSABLE: list[tuple[str, dict[str, Any] | None, dict[t.KeySource, Any], Any, str]] = [
    ("secret-missing", {"keys": [BY_SECRET]}, {SECRET: None}, AGENTS, "Secret 'team-keys' does not exist"),
    ("config-map-missing", {"keys": [BY_MAP]}, {}, AGENTS, "ConfigMap 'ci-keys' does not exist"),
    ("no-pub-entry", {"keys": [BY_MAP]}, {CONFIG_MAP: config_map(README="x")}, AGENTS, "has no <keyid>.pub entry"),
    ("not-a-key", {"keys": [BY_MAP]}, {CONFIG_MAP: config_map(**{"ci-3.pub": "hello"})}, AGENTS,
     "ConfigMap 'ci-keys' entry ci-3.pub of ci-3 is neither PEM nor 32 bytes"),
    ("secret-not-base64", {"keys": [BY_SECRET]}, {SECRET: {"data": {"a-1.pub": "%%%"}}}, AGENTS, "is not base64"),
    ("bad-entry-key-id", {"keys": [BY_MAP]}, {CONFIG_MAP: config_map(**{"CI.pub": CI.pem()})}, AGENTS,
     "is not a key id"),
    ("bad-inline-key", {"keys": [{"publicKey": {"keyId": "ci-3", "key": "abc"}}]}, {}, AGENTS,
     "spec.trust.keys[0].publicKey of ci-3"),
    ("no-cluster-key", None, {}, NONE, "the operator has no signing key (MEMOPLANE_SIGNING_KEY_FILE) and no agent"),
    # The operator's key signs no job's result: for two signers, one agent is one, whatever else is trusted.
    ("one-agent-for-two", {"minSignatures": 2}, {}, ONE_AGENT,
     "2 signers needed, 1 key(s) can attest one result (node-a-1)"),
    ("a-revoked-node-is-no-signer", {"minSignatures": 2, "revoked": ["node-b-1"]}, {}, AGENTS,
     "2 signers needed, 1 key(s) can attest one result (node-a-1)"),
    ("operator-alone-for-two", {"minSignatures": 2, "keys": [{"publicKey": {"keyId": "ci-3", "key": CI.base64}}]},
     {}, ClusterKeys(OPERATOR), "2 signers needed, 1 key(s) can attest one result (ci-3)"),
    ("agent-key-id-taken-inline", {"keys": [{"publicKey": {"keyId": "node-a-1", "key": CI.base64}}]}, {}, AGENTS,
     "key id node-a-1 names two different keys"),
    ("one-id-two-keys", {"keys": [{"publicKey": {"keyId": "ci-3", "key": TEAM_A.base64}}, BY_MAP]},
     {CONFIG_MAP: CI_MAP}, AGENTS, "key id ci-3 names two different keys"),
    ("invalid-spec", {"minSignatures": 0}, {}, AGENTS, "spec.trust.minSignatures"),
]


@pytest.mark.parametrize(("case", "trust", "objects", "agents", "text"), UNUSABLE, ids=[c[0] for c in UNUSABLE])
def test_unusable_trust_says_why(case: str, trust: dict[str, Any] | None, objects: dict[t.KeySource, Any],
                                 agents: Any, text: str) -> None:
    found = t.effective_policy(cache(trust), objects, agents)
    assert isinstance(found, t.Unusable) and text in found.message, found


def test_key_sources_are_the_referenced_objects_in_order() -> None:
    spec = {"keys": [BY_MAP, {"publicKey": {"keyId": "ci-3", "key": CI.base64}}, BY_SECRET]}
    assert t.key_sources(cache(spec)) == [CONFIG_MAP, SECRET]
    assert t.key_sources(cache(None)) == []
