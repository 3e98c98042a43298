"""spec.verify.replicas: verification by re-execution on distinct nodes (pure decisions).

A job with `replicas: k > 1` (the parent) owns k replica ComputeJobs, `<name>-r<i>`: its
spec without `verify` and with cache policy Bypass (a replica neither reads the cache nor
points the ref: it is not believed on its own), labelled with the parent's uid and its
index. Each goes to a node no sibling runs on (`taken_nodes`). Its agent stores the result
normalised by `replica_result` — who ran it and when go into the agent's attestation, not
into the manifest — so honest replicas produce the same result digest and each attests it.

When every replica succeeded: the same digest from all and an attestation from each of
their nodes -> the parent points the ref at it listing every attestation and is Ready;
different digests -> the parent is Disputed (never Ready, nothing cached), and `difference`
says what differs: which output, the first JSON path or byte range, both digests, the nodes.
A later k-replica job is a cache hit only if the stored result is attested by k distinct
nodes under the cache's trust policy (`enough_nodes`): agreement already established counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..canonical import canonical_json
from ..cas import Provenance, ResultManifest
from ..keys import digest_bytes
from ..trust import TrustPolicy, judge, split_keyid
from ..trust.nodekey import node_key_name
from . import protocol as p
from .index import settled
from .schedule import NodeView, live_nodes
from .views import job, meta_of, section

PARENT_LABEL = f"{p.GROUP}/replica-of"          # value: the parent's uid
INDEX_LABEL = f"{p.GROUP}/replica-index"        # value: 0 .. k-1
SPEC_ANNOTATION = f"{p.GROUP}/replica-spec"     # digest of the spec the parent wrote for the replica
COUNT_ANNOTATION = f"{p.GROUP}/replicas"        # k: the replica's siblings are <parent>-r0 .. -r<k-1>
REPLICATED_NODE = "replicas"                    # provenance.node of a normalised result: see the attestations
NAME_MAX = 253

REASON_REPLICATING = "Replicating"
REASON_TOO_FEW_NODES = "TooFewNodesForReplicas"
REASON_REPLICA_FAILED = "ReplicaFailed"
REASON_UNATTESTED = "ReplicaUnattested"
REASON_AGREED = "ReplicasAgreed"
REASON_DISPUTED = "Disputed"
REASON_NAME_TAKEN = "ReplicaNameTaken"

VALUE_CHARS = 80      # a differing value or byte range is shown up to this many characters
BYTES_SHOWN = 24


# -- the parent and its replicas -----------------------------------------------------------


def replicas_of(obj: Mapping[str, Any]) -> int:
    return job(obj).spec.replicas


def is_replicated(obj: Mapping[str, Any]) -> bool:
    return replicas_of(obj) > 1


def is_replica(obj: Mapping[str, Any]) -> bool:
    return PARENT_LABEL in meta_of(obj).labels


def child_name(parent: str, index: int) -> str:
    suffix = f"-r{index}"
    return parent[: NAME_MAX - len(suffix)].rstrip("-.") + suffix


def child_spec(parent: Mapping[str, Any]) -> dict[str, Any]:
    """The parent's spec without `verify`, cache policy Bypass (same key: neither is part of it)."""
    spec = {k: v for k, v in section(parent, "spec").items() if k != "verify"}
    spec["cache"] = {**section(spec, "cache"), "policy": "Bypass"}
    return spec


def child_manifest(parent: Mapping[str, Any], index: int) -> dict[str, Any]:
    meta = meta_of(parent)
    spec = child_spec(parent)
    return {
        "apiVersion": p.API_VERSION, "kind": "ComputeJob",
        "metadata": {
            "name": child_name(meta.name, index), "namespace": meta.namespace,
            "labels": {PARENT_LABEL: meta.uid, INDEX_LABEL: str(index)},
            "annotations": {SPEC_ANNOTATION: digest_bytes(canonical_json(spec)), COUNT_ANNOTATION: str(replicas_of(parent))},
            "ownerReferences": [{"apiVersion": p.API_VERSION, "kind": "ComputeJob", "name": meta.name,
                                 "uid": meta.uid, "controller": True, "blockOwnerDeletion": False}],
        },
        "spec": spec,
    }


def sibling_names(replica: Mapping[str, Any]) -> list[str]:
    """The names of a replica's siblings (read by name: no list of the namespace)."""
    meta = meta_of(replica)
    owners = [o for o in meta.raw.get("ownerReferences") or () if o.get("uid") == meta.labels.get(PARENT_LABEL)]
    try:
        count = int(meta.annotations.get(COUNT_ANNOTATION, "0"))
    except ValueError:
        count = 0
    if not owners:
        return []
    names = [child_name(str(owners[0].get("name")), i) for i in range(count)]
    return [n for n in names if n != meta.name]


def owned_by(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    return meta_of(child).labels.get(PARENT_LABEL) == meta_of(parent).uid


def current(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """The replica holds the spec the parent wants now."""
    return meta_of(child).annotations.get(SPEC_ANNOTATION) == digest_bytes(canonical_json(child_spec(parent)))


# -- placement ------------------------------------------------------------------------------


def capable_nodes(nodes: Iterable[NodeView], profile: str, runtime: str | None) -> list[str]:
    return sorted(n.name for n in live_nodes(nodes) if runtime is not None and n.profiles.get(profile) == runtime)


def nodes_problem(replicas: int, nodes: Iterable[NodeView], profile: str, runtime: str | None) -> str | None:
    """Why `replicas` distinct nodes cannot run the job now (None: they can)."""
    capable = capable_nodes(nodes, profile, runtime)
    if len(capable) >= replicas:
        return None
    have = f"{len(capable)} do" + (f" ({', '.join(capable)})" if capable else "")
    return (f"spec.verify.replicas: {replicas} replicas need {replicas} distinct live nodes serving profile "
            f"'{profile}'; {have}: add nodes or lower replicas")


def node_of(obj: Mapping[str, Any]) -> str | None:
    view = job(obj)
    return view.assigned.node or view.status.node


def taken_nodes(me: Mapping[str, Any], siblings: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The nodes a replica must not run on: those its siblings run or ran on."""
    mine = meta_of(me).uid
    return frozenset(node for s in siblings
                     if meta_of(s).uid != mine and (node := node_of(s)) is not None)


# -- progress and the verdict ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One replica's result as its status says."""

    job: str
    node: str | None
    digest: str | None
    key: str | None

    def to_status(self) -> dict[str, Any]:
        return {"job": self.job, "node": self.node, "digest": self.digest}


@dataclass(frozen=True)
class Missing:
    """Replicas to create (names), or that are not finished yet."""

    create: list[dict[str, Any]]
    update: list[dict[str, Any]]
    waiting_on: list[str]
    done: list[Outcome]


@dataclass(frozen=True)
class ReplicaFailed:
    name: str
    reason: str
    message: str


@dataclass(frozen=True)
class Agreed:
    digest: str
    key: str
    outcomes: list[Outcome]


@dataclass(frozen=True)
class Disagreed:
    outcomes: list[Outcome]

    @property
    def pair(self) -> tuple[Outcome, Outcome]:
        """The first replica and the first one whose digest differs from it."""
        first = self.outcomes[0]
        return first, next(o for o in self.outcomes if o.digest != first.digest)


def outcome_of(child: Mapping[str, Any]) -> Outcome:
    view = job(child)
    return Outcome(view.meta.name, view.status.node, view.status.result_digest, view.status.cache_key)


def step(parent: Mapping[str, Any], children: Mapping[str, Mapping[str, Any]]
         ) -> Missing | ReplicaFailed | Agreed | Disagreed:
    """What the parent does next with its replicas (`children`: listed by label, by name)."""
    wanted = [child_manifest(parent, i) for i in range(replicas_of(parent))]
    create, update, waiting, done = [], [], [], []
    for manifest in wanted:
        name = manifest["metadata"]["name"]
        child = children.get(name)
        if child is None:
            create.append(manifest)
        elif not current(child, parent):
            update.append(manifest)
        elif not settled(child):
            waiting.append(name)
        elif job(child).status.phase != p.SUCCEEDED:
            why, detail = job(child).status.failure_summary()
            return ReplicaFailed(name, why, detail)
        else:
            done.append(outcome_of(child))
    if create or update or waiting:
        return Missing(create, update, waiting, done)
    if len({o.key for o in done}) != 1:
        return ReplicaFailed(done[0].job, "KeysDiffer", "the replicas resolved different cache keys (the runtime "
                                                         "changed during the run): apply the job again")
    if len({o.digest for o in done}) == 1 and done[0].digest and done[0].key:
        return Agreed(done[0].digest, done[0].key, done)
    return Disagreed(done)


# -- attestations ------------------------------------------------------------------------------


def attesting_nodes(policy: TrustPolicy, key: str, digest: str, envelopes: Iterable[bytes]) -> frozenset[str]:
    """The distinct nodes that attest, with their own trusted key (`<node>-<epoch>`), that they
    computed `digest` for `key`: a builder named in an attestation by another key does not count
    (a node cannot stand for another one)."""
    one = dataclasses.replace(policy, min_signatures=1)
    verdicts = (judge(one, key, digest, [data]) for data in envelopes)
    return frozenset(a.builder for v in verdicts if v.trusted for a in v.attested
                     if split_keyid(a.keyid)[0] == node_key_name(a.builder))


def enough_nodes(policy: TrustPolicy, key: str, digest: str, envelopes: Sequence[bytes], replicas: int) -> bool:
    """A stored result counts for a k-replica job: trusted by the policy, and attested by k distinct nodes."""
    return judge(policy, key, digest, envelopes).trusted and \
        len(attesting_nodes(policy, key, digest, envelopes)) >= replicas


def unattested(agreed: Agreed, nodes: frozenset[str]) -> list[str]:
    """Replicas (their nodes) whose own trusted attestation of the agreed result is missing."""
    return [o.node or o.job for o in agreed.outcomes if o.node not in nodes]


def replica_result(result: ResultManifest) -> ResultManifest:
    """A replica's result as its agent stores it: what it produced, without who or when
    (that is in its attestation), so honest replicas of one key store the same digest."""
    prov = result.provenance
    meta = {k: v for k, v in result.meta.items() if k != "isolation"}  # the node's sandbox, not the job's output
    return dataclasses.replace(result, meta=meta, provenance=Provenance(
        prov.cache_key, dict(prov.inputs), prov.runtime, REPLICATED_NODE, 0.0, 0.0, 0.0))


# -- the difference, readable ----------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """What one replica's result holds, loaded: its value (JSON, or bytes for bytes/file kinds),
    its output files (path -> blob digest), stdout and stderr."""

    kind: str
    value: Any
    files: Mapping[str, str]
    stdout: bytes
    stderr: bytes
    meta: Mapping[str, Any]


def _clip(text: str, limit: int = VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    return _clip(canonical_json(value).decode())


_ABSENT = object()


def first_json_difference(a: Any, b: Any, path: str = "$") -> tuple[str, Any, Any] | None:
    """The first JSON path (in key order, then index order) where `a` and `b` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_json_difference(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            found = first_json_difference(a[index] if index < len(a) else _ABSENT,
                                          b[index] if index < len(b) else _ABSENT, f"{path}[{index}]")
            if found:
                return found
        return None
    same = type(a) is type(b) and a == b  # 1 and true and 1.0 are different JSON
    return None if same else (path, a, b)


def _json_side(value: Any) -> str:
    return "(absent)" if value is _ABSENT else _show(value)


def first_byte_difference(a: bytes, b: bytes) -> tuple[int, int, bytes, bytes] | None:
    """(start, end, a[start:end], b[start:end]) of the first differing byte range (at most BYTES_SHOWN long)."""
    if a == b:
        return None
    start = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    end = start
    while end < max(len(a), len(b)) and end - start < BYTES_SHOWN and (end >= min(len(a), len(b))
                                                                       or a[end] != b[end]):
        end += 1
    return start, max(end, start + 1), a[start:end], b[start:end]


def _bytes_line(what: str, a: bytes, b: bytes, names: tuple[str, str]) -> str | None:
    found = first_byte_difference(a, b)
    if found is None:
        return None
    start, end, x, y = found
    return (f"{what} differs at bytes {start}..{end}: {_clip(repr(x))} ({names[0]}) vs {_clip(repr(y))} "
            f"({names[1]}); lengths {len(a)} and {len(b)}")


def _value_line(a: Outputs, b: Outputs, names: tuple[str, str]) -> str | None:
    if a.kind != b.kind:
        return f"value: a {a.kind} value ({names[0]}) vs a {b.kind} value ({names[1]})"
    if a.kind == "json":
        found = first_json_difference(a.value, b.value)
        if found is None:
            return None
        path, x, y = found
        return f"value differs at {path}: {_json_side(x)} ({names[0]}) vs {_json_side(y)} ({names[1]})"
    if isinstance(a.value, bytes) and isinstance(b.value, bytes):
        return _bytes_line("value", a.value, b.value, names)
    return None


def _files_line(a: Outputs, b: Outputs, names: tuple[str, str]) -> str | None:
    differ = sorted(path for path in set(a.files) & set(b.files) if a.files[path] != b.files[path])
    only_a, only_b = sorted(set(a.files) - set(b.files)), sorted(set(b.files) - set(a.files))
    parts = [f"{', '.join(differ[:5])} differ" if differ else "",
             f"only {names[0]} wrote {', '.join(only_a[:5])}" if only_a else "",
             f"only {names[1]} wrote {', '.join(only_b[:5])}" if only_b else ""]
    shown = "; ".join(x for x in parts if x)
    return f"output files: {shown}" if shown else None


def difference(a: Outputs, b: Outputs, names: tuple[str, str]) -> list[str]:
    """What differs between two replicas' results, one line per output, most telling first."""
    lines = [_value_line(a, b, names), _files_line(a, b, names),
             _bytes_line("stdout", a.stdout, b.stdout, names), _bytes_line("stderr", a.stderr, b.stderr, names)]
    found = [line for line in lines if line]
    if not found and a.meta != b.meta:
        found.append(f"the outputs agree; the run differs: {_clip(_meta_difference(a.meta, b.meta), 200)}")
    return found


def _meta_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    found = first_json_difference(dict(a), dict(b), "meta")
    return "meta" if found is None else f"{found[0]}: {_json_side(found[1])} vs {_json_side(found[2])}"


def dispute_message(disagreed: Disagreed, lines: Sequence[str]) -> str:
    """One message for the condition and the Event: the nodes, what differs, both digests."""
    x, y = disagreed.pair
    who = f"{x.node} ({x.job})", f"{y.node} ({y.job})"
    what = "; ".join(lines) if lines else "the results differ"
    return (f"replicas disagree: {who[0]} and {who[1]} returned different results: {what}; "
            f"digests {x.digest} ({x.node}) and {y.digest} ({y.node}); nothing was cached")


def nodes_of(outcomes: Iterable[Outcome]) -> list[str]:
    return [o.node or "?" for o in outcomes]


