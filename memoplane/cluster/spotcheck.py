"""ResultCache.spec.trust.reexecute: re-executing a fraction of cache hits on another node (pure decisions).

A job served from a cache with `reexecute: {fraction, adaptive}` is answered at once (the
stored result is attested under the cache's policy); for some hits the operator also creates
a spot check: a replica ComputeJob `<job>-check` (memoplane.cluster.replicas: the job's spec,
cache policy Bypass, labelled with the served job's uid) annotated with the served result's
digest and placed away from the nodes that attest it. Its agent stores its result normalised
(`replicas.replica_result`) and attests it; when that equals the served result normalised it
also attests the served result itself: the re-executing node vouches for what was served.
When the check settles the operator judges it (`verdict`): the same normalised digest ->
agreement (the checker's attestation is added to the ref); another one -> a dispute.

Which hits are checked (`should_check`) is deterministic given a seed (the served job's uid
and the key): a test knows. Adaptive replication, as BOINC does it, per (node, runtime) pair
of the nodes that attest the served result:

    p(pair) = 1                                                       while pair.probation > 0
    p(pair) = max(fraction * FLOOR_SHARE, fraction / 2 ** (streak / HALVING))   otherwise

where `streak` counts the pair's agreements in a row. A hit is checked with the largest p of
its pairs (the least proven node decides). A disagreement resets the streak and puts the pair
on probation: its next PROBATION hits are all checked. Not adaptive: p = fraction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from . import protocol as p
from .replicas import INDEX_LABEL, PARENT_LABEL, child_spec, node_of
from .views import job, meta_of, section

CHECK_OF_ANNOTATION = f"{p.GROUP}/spot-check-of"   # the served result's digest the check re-computes
AVOID_ANNOTATION = f"{p.GROUP}/avoid-nodes"        # the nodes that attest it (comma-separated)
JUDGED_ANNOTATION = f"{p.GROUP}/spot-check"        # agreed | disputed | failed: the verdict, once
SUFFIX = "-check"
NAME_MAX = 253

HALVING = 10         # agreements in a row that halve a pair's re-check probability
FLOOR_SHARE = 1 / 16  # the lowest probability, as a share of the fraction
PROBATION = 10       # hits of a pair checked every time after a disagreement

REASON_SPOT_CHECK = "SpotCheck"
REASON_AGREED = "SpotCheckAgreed"
REASON_FAILED = "SpotCheckFailed"

Judged = Literal["agreed", "disputed", "failed"]
AGREED: Judged = "agreed"
DISPUTED: Judged = "disputed"
FAILED: Judged = "failed"


@dataclass(frozen=True)
class Reexecute:
    """A cache's trust.reexecute."""

    fraction: float
    adaptive: bool = True


def reexecute_of(rc: Mapping[str, Any]) -> Reexecute | None:
    found = section(section(section(rc, "spec"), "trust"), "reexecute")
    if not found:
        return None
    return Reexecute(float(found.get("fraction", 0.0)), bool(found.get("adaptive", True)))


# -- the streaks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streak:
    """One (node, runtime) pair's record."""

    streak: int = 0      # agreements in a row
    probation: int = 0   # hits still checked every time after a disagreement
    checks: int = 0
    disputes: int = 0


NO_STREAK = Streak()


def pair(node: str, runtime: str) -> str:
    return f"{node}|{runtime}"


def agreed(s: Streak) -> Streak:
    return replace(s, streak=s.streak + 1, probation=max(0, s.probation - 1), checks=s.checks + 1)


def disputed(s: Streak) -> Streak:
    return replace(s, streak=0, probation=PROBATION, checks=s.checks + 1, disputes=s.disputes + 1)


def encode(streaks: Mapping[str, Streak]) -> bytes:
    return json.dumps({"v": 1, "pairs": {k: asdict(v) for k, v in sorted(streaks.items())}},
                      sort_keys=True).encode()


def decode(data: bytes | None) -> dict[str, Streak]:
    """The streaks `encode` wrote; anything unreadable counts as no streak (checked more, never less)."""
    if not data:
        return {}
    try:
        pairs = json.loads(data).get("pairs", {})
        return {str(k): Streak(**{f: int(v.get(f, 0)) for f in ("streak", "probation", "checks", "disputes")})
                for k, v in pairs.items()}
    except (ValueError, AttributeError, TypeError):
        return {}


# -- which hits are checked --------------------------------------------------------------------


def probability(r: Reexecute, s: Streak) -> float:
    """How likely a hit whose result a pair with record `s` attests is checked (see the module doc)."""
    if not r.adaptive:
        return r.fraction
    if s.probation > 0:
        return 1.0
    return max(r.fraction * FLOOR_SHARE, r.fraction / 2 ** (s.streak / HALVING))


def chance(r: Reexecute, streaks: Mapping[str, Streak], pairs: Iterable[str]) -> float:
    """The largest probability of the pairs (an unattested result: the fraction itself)."""
    return max((probability(r, streaks.get(k, NO_STREAK)) for k in pairs), default=r.fraction)


def draw(seed: str) -> float:
    """A deterministic number in [0, 1) for `seed`."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2.0**64


def should_check(r: Reexecute, streaks: Mapping[str, Streak], pairs: Iterable[str], seed: str) -> bool:
    return draw(seed) < chance(r, streaks, pairs)


def seed_of(served: Mapping[str, Any], key: str) -> str:
    return f"{meta_of(served).uid}:{key}"


# -- the check ---------------------------------------------------------------------------------


def check_name(served: str) -> str:
    return served[: NAME_MAX - len(SUFFIX)].rstrip("-.") + SUFFIX


def element_check_name(parent: str, key: str) -> str:
    """The spot check of a spec.map element served from the cache: one per element key."""
    return check_name(parent[: NAME_MAX - len(SUFFIX) - 11].rstrip("-.") + "-" + key.removeprefix("b3:")[:10])


def check_manifest(served: Mapping[str, Any], digest: str, avoid: Iterable[str], name: str | None = None
                   ) -> dict[str, Any]:
    """The spot check of `served`'s result `digest`: a replica of it, away from the nodes `avoid`
    (`name`: a map element's check, `element_check_name`)."""
    meta = meta_of(served)
    return {
        "apiVersion": p.API_VERSION, "kind": "ComputeJob",
        "metadata": {
            "name": name or check_name(meta.name), "namespace": meta.namespace,
            "labels": {PARENT_LABEL: meta.uid, INDEX_LABEL: "check"},
            "annotations": {CHECK_OF_ANNOTATION: digest, AVOID_ANNOTATION: ",".join(sorted(set(avoid)))},
            "ownerReferences": [{"apiVersion": p.API_VERSION, "kind": "ComputeJob", "name": meta.name,
                                 "uid": meta.uid, "controller": True, "blockOwnerDeletion": False}],
        },
        "spec": child_spec(served),
    }


def is_check(obj: Mapping[str, Any]) -> bool:
    return CHECK_OF_ANNOTATION in meta_of(obj).annotations and PARENT_LABEL in meta_of(obj).labels


def checked_digest(obj: Mapping[str, Any]) -> str | None:
    """The served result a spot check re-computes (None: not a spot check)."""
    return meta_of(obj).annotations.get(CHECK_OF_ANNOTATION) if is_check(obj) else None


def avoided(obj: Mapping[str, Any]) -> frozenset[str]:
    """The nodes a spot check must not run on: those that attest the result it checks."""
    if not is_check(obj):
        return frozenset()
    return frozenset(n for n in meta_of(obj).annotations.get(AVOID_ANNOTATION, "").split(",") if n)


def awaiting_verdict(obj: Mapping[str, Any]) -> bool:
    """A settled spot check the operator has not judged yet."""
    return is_check(obj) and job(obj).settled and JUDGED_ANNOTATION not in meta_of(obj).annotations


def served_name(check: Mapping[str, Any]) -> str | None:
    meta = meta_of(check)
    owners = [o for o in meta.raw.get("ownerReferences") or () if o.get("uid") == meta.labels.get(PARENT_LABEL)]
    return str(owners[0].get("name")) if owners else None


def verdict(check: Mapping[str, Any], expected: str | None) -> Judged:
    """A settled check: `expected` is the served result's digest normalised as a replica stores it
    (None: the served result cannot be read)."""
    view = job(check)
    if view.status.phase != p.SUCCEEDED or expected is None or not view.status.result_digest:
        return FAILED
    return AGREED if view.status.result_digest == expected else DISPUTED


def checker(check: Mapping[str, Any]) -> str:
    return node_of(check) or "?"


def still_served(served: Mapping[str, Any], digest: str) -> bool:
    """`served` still shows the checked result (its spec was not changed and re-served since)."""
    view = job(served)
    return view.settled and view.status.phase == p.SUCCEEDED and view.status.result_digest == digest
