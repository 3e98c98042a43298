"""Per-agent keys: a node's key file (made once, kept, private), the key a Lease announces, the
keys the operator remembers (a node that is gone stays trusted, a known key id keeps its key),
and the operator's AgentKeys over a fake API server."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKube
from memoplane_operator.agent_keys import AgentKeys

from memoplane.cluster import agentkeys as ak
from memoplane.cluster import protocol as p
from memoplane.errors import InputError
from memoplane.trust import PublicKey, SigningKey
from memoplane.trust.nodekey import node_key, node_key_name

OPERATOR = SigningKey.generate("mp-agents-1").public
A1, A2, B1 = (SigningKey.generate(k).public for k in ("node-a-1", "node-a-2", "node-b-1"))
A1_OTHER = SigningKey.generate("node-a-1").public   # the same id, another key


def lease(node: str, announced: str | None) -> dict[str, Any]:
    annotations = {p.SIGNING_KEY_ANNOTATION: announced} if announced is not None else {}
    return {"metadata": {"name": p.lease_name(node), "annotations": annotations}}


# -- the key id of a node -----------------------------------------------------------------

@pytest.mark.parametrize(("node", "name"), [
    ("node-a", "node-a"),
    ("ip-10-0-0-1.ec2.internal", "ip-10-0-0-1-ec2-internal"),
    ("Worker_7", "worker-7"),
    ("..", "node"),
])
def test_node_names_become_key_names(node: str, name: str) -> None:
    assert node_key_name(node) == name
    assert SigningKey.generate(f"{name}-1").keyid == f"{name}-1"   # the key-id rule accepts it


def test_long_node_names_are_cut_and_stay_distinct() -> None:
    a, b = node_key_name("n" * 80 + ".a"), node_key_name("n" * 80 + ".b")
    assert a != b and len(a) <= 63 and len(b) <= 63
    assert SigningKey.generate(f"{a}-1").keyid == f"{a}-1"


# -- the key file on the node ---------------------------------------------------------------

def test_a_node_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "key"
    first = node_key(directory, "node-a")
    assert first.keyid == "node-a-1"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "node-a-1.key").stat().st_mode) == 0o600
    again = node_key(directory, "node-a", first_epoch=lambda: pytest.fail("asked although the key exists"))
    assert again.keyid == "node-a-1" and again.public == first.public
    assert [p.name for p in directory.iterdir()] == ["node-a-1.key"]   # no temporary file left


def test_a_new_key_takes_the_epoch_given_and_the_latest_file_wins(tmp_path: Path) -> None:
    assert node_key(tmp_path, "node-a", first_epoch=lambda: 3).keyid == "node-a-3"
    newer = SigningKey.generate("node-a-10")
    (tmp_path / "node-a-10.key").write_bytes(newer.pem())
    (tmp_path / "node-a-10.key").chmod(0o600)
    (tmp_path / "node-ab-99.key").write_bytes(SigningKey.generate("node-ab-99").pem())  # another node's
    assert node_key(tmp_path, "node-a").public == newer.public


def test_a_directory_the_kubelet_made_is_made_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    node_key(tmp_path, "node-a")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_a_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    node_key(tmp_path, "node-a")
    (tmp_path / "node-a-1.key").chmod(0o644)
    with pytest.raises(InputError, match=r"MEMOPLANE_NODE_KEY_DIR: .*node-a-1.key is open to group or others.*chmod 600"):
        node_key(tmp_path, "node-a")


# -- what a Lease announces -----------------------------------------------------------------

ANNOUNCED: list[tuple[str, dict[str, Any], PublicKey | str | None]] = [
    ("valid", lease("node-a", ak.key_annotation(A1)), A1),
    ("no-annotation", lease("node-a", None), None),
    ("not-an-agent-lease", {"metadata": {"name": "kube-scheduler", "annotations": {
        p.SIGNING_KEY_ANNOTATION: ak.key_annotation(A1)}}}, None),
    ("sanitized-node-name", lease("ip-10.ec2", ak.key_annotation(SigningKey.generate("ip-10-ec2-4").public)),
     "ip-10-ec2-4"),
    ("another-nodes-key", lease("node-b", ak.key_annotation(A1)), "names key node-a-1, not a key of node node-b"),
    ("no-key-id", lease("node-a", A1.base64), "is not a key id"),
    ("not-a-key", lease("node-a", "node-a-1:abc"), "neither PEM nor 32 bytes"),
]


@pytest.mark.parametrize(("case", "obj", "expected"), ANNOUNCED, ids=[c[0] for c in ANNOUNCED])
def test_the_key_a_lease_announces(case: str, obj: dict[str, Any], expected: PublicKey | str | None) -> None:
    found = ak.announced(obj)
    if isinstance(expected, PublicKey) or expected is None:
        assert found == expected
    elif isinstance(found, PublicKey):
        assert found.keyid == expected
    else:
        assert isinstance(found, InputError) and expected in str(found), found


# -- merging what is known with what is announced ---------------------------------------------

MERGES: list[tuple[str, list[PublicKey], list[PublicKey], set[str], list[str], list[str]]] = [
    # (id, known, announced, known after, added, conflicts)
    ("first-sight", [], [A1, B1], {"node-a-1", "node-b-1"}, ["node-a-1", "node-b-1"], []),
    ("seen-again", [A1, B1], [A1], {"node-a-1", "node-b-1"}, [], []),
    ("a-gone-node-is-kept", [A1, B1], [], {"node-a-1", "node-b-1"}, [], []),
    ("rotated", [A1], [A2], {"node-a-1", "node-a-2"}, ["node-a-2"], []),
    ("a-known-id-keeps-its-key", [A1], [A1_OTHER, A1_OTHER], {"node-a-1"}, [], ["node-a-1"]),
]


@pytest.mark.parametrize(("case", "known", "announced", "after", "added", "conflicts"), MERGES,
                         ids=[c[0] for c in MERGES])
def test_merge(case: str, known: list[PublicKey], announced: list[PublicKey], after: set[str], added: list[str],
               conflicts: list[str]) -> None:
    merged = ak.merge({k.keyid: k for k in known}, announced)
    assert set(merged.keys) == after and [k.keyid for k in merged.added] == added
    assert [k.keyid for k in merged.conflicts] == conflicts
    assert all(merged.keys[k.keyid] == k for k in known)


def test_remembered_keys_round_trip_and_bad_entries_are_named() -> None:
    data = {**ak.config_map_data([A1, B1]), "node-c-1.pub": "not a key", "README": "ignored"}
    keys, problems = ak.remembered({"data": data})
    assert keys == {"node-a-1": A1, "node-b-1": B1}
    assert len(problems) == 1 and "memoplane-agent-keys node-c-1.pub" in problems[0]
    assert ak.remembered(None) == ({}, [])
    assert ak.latest_epoch(["node-a-1", "node-a-2", "node-ab-7", "node-b-3"], "node-a") == 2
    assert ak.latest_epoch([], "node-a") == 0


# -- the operator's AgentKeys --------------------------------------------------------------------

def test_the_operator_remembers_agent_keys_across_restarts_and_refuses_a_second_key_for_an_id() -> None:
    kube = FakeKube()
    keys = AgentKeys(kube, "memoplane-system", OPERATOR)
    assert keys.cluster.all == [OPERATOR]
    assert keys.observe([lease("node-a", ak.key_annotation(A1)), lease("node-b", ak.key_annotation(B1))])
    assert not keys.observe([lease("node-a", ak.key_annotation(A1))])   # nothing new: policies stand
    stored = kube.get_config_map("memoplane-system", p.AGENT_KEYS_CONFIG_MAP)
    assert stored is not None and set(stored["data"]) == {"node-a-1.pub", "node-b-1.pub"}
    # A restarted operator: node-b is gone, its key is still trusted; node-a's id keeps its key.
    again = AgentKeys(kube, "memoplane-system", OPERATOR)
    assert not again.observe([lease("node-a", ak.key_annotation(A1_OTHER))])
    assert again.cluster == ak.ClusterKeys(OPERATOR, (A1, B1))
    # node-a's key directory was lost: its agent takes the epoch after the remembered one.
    assert ak.latest_epoch(ak.remembered(kube.get_config_map("memoplane-system", p.AGENT_KEYS_CONFIG_MAP))[0],
                           "node-a") + 1 == 2
    assert again.observe([lease("node-a", ak.key_annotation(A2))])
    assert [k.keyid for k in again.cluster.agents] == ["node-a-1", "node-a-2", "node-b-1"]
