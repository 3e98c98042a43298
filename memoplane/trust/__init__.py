"""Who vouches for a result, and whom a reader believes (DESIGN §11).

Whoever can write the store is not trusted; keys are. A computed result is attested by the
key of whoever computed it (attestation: an in-toto statement in a DSSE envelope, Ed25519),
and a reader serves a ref only if its trust policy accepts enough of those attestations
(policy.judge). `trusted_hit` is the one way a reader looks a key up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..cas import Hit, Store
from .keys import PublicKey, SigningKey, check_keyid, next_keyid, split_keyid
from .policy import Refusal, TrustPolicy, Verdict, judge

__all__ = ["Lookup", "PublicKey", "Refusal", "SigningKey", "TrustPolicy", "Untrusted", "Verdict", "Vouched",
           "check_keyid", "judge", "judge_stored", "next_keyid", "split_keyid", "trusted_hit", "untrusted_refs"]


@dataclass(frozen=True)
class Lookup:
    hit: Hit | None          # served only when the policy trusts it
    verdict: Verdict | None  # None: no ref (or a broken one) — nothing to judge

    @property
    def refused(self) -> bool:
        """A stored result was found and not trusted."""
        return self.verdict is not None and not self.verdict.trusted


class Vouched:
    """The trusting verdicts one policy gave, by (key, result), so a repeated hit skips the signature
    checks. Sound because attestations are immutable and a policy never changes: what it trusted
    once it trusts again (a revocation is a new policy, with a new Vouched). Bounded, thread-safe."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._kept: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, result: str) -> Verdict | None:
        with self._lock:
            return self._kept.get((key, result))

    def put(self, key: str, result: str, verdict: Verdict) -> None:
        with self._lock:
            self._kept[(key, result)] = verdict
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


def trusted_hit(store: Store, key: str, policy: TrustPolicy, *, deep: bool = False,
                vouched: Vouched | None = None) -> Lookup:
    """A hit that `policy` trusts, or a miss with the verdict that refused it.

    The attestations the ref lists are judged first (cached by address: a repeated hit costs
    no extra read); if they are not enough, every stored attestation of the result is.
    `vouched`: this policy's earlier trusting verdicts (one Vouched per policy, never shared)."""
    hit = store.get_ref(key, deep=deep)
    if hit is None:
        return Lookup(None, None)
    verdict = vouched.get(key, hit.digest) if vouched is not None else None
    if verdict is None:
        verdict = judge_stored(store, policy, key, hit.digest, hit.attestations)
        if verdict.trusted and vouched is not None:
            vouched.put(key, hit.digest, verdict)
    return Lookup(hit if verdict.trusted else None, verdict)


def judge_stored(store: Store, policy: TrustPolicy, key: str, result: str, listed: tuple[str, ...]) -> Verdict:
    """The policy's verdict on (key, result): the attestations the ref lists first, every stored one if
    those are not enough (a writer that lost a race may have dropped one from the list)."""
    verdict = judge(policy, key, result, store.attestations(key, result, listed))
    if not verdict.trusted:
        verdict = judge(policy, key, result, store.attestations(key, result))
    return verdict


@dataclass(frozen=True)
class Untrusted:
    key: str
    result: str
    verdict: Verdict


def untrusted_refs(store: Store, policy: TrustPolicy) -> tuple[int, list[Untrusted]]:
    """(refs judged, those `policy` does not trust): what `memoplane verify` reports. A ref that
    cannot be read is left to the store's own verify (it reports damage)."""
    judged, untrusted = 0, []
    for key in store.cache_keys():
        entry = store.read_ref_entry(key)
        if entry is None:
            continue
        judged += 1
        verdict = judge_stored(store, policy, key, entry.result, entry.attestations)
        if not verdict.trusted:
            untrusted.append(Untrusted(key, entry.result, verdict))
    return judged, untrusted
