"""Who vouches for a result, and whom a reader believes (DESIGN §11).

Whoever can write the store is not trusted; keys are. A computed result is attested by the
key of whoever computed it (attestation: an in-toto statement in a DSSE envelope, Ed25519),
and a reader serves a ref only if its trust policy accepts enough of those attestations
(policy.judge). `trusted_hit` is the one way a reader looks a key up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cas import Hit, Store
from ..cas.digests import digest_of_name
from .keys import PublicKey, SigningKey, check_keyid, next_keyid, split_keyid
from .policy import Refusal, TrustPolicy, Verdict, judge

__all__ = ["Lookup", "PublicKey", "Refusal", "SigningKey", "TrustPolicy", "Untrusted", "Verdict", "check_keyid",
           "judge", "judge_stored", "next_keyid", "split_keyid", "trusted_hit", "untrusted_refs"]


@dataclass(frozen=True)
class Lookup:
    hit: Hit | None          # served only when the policy trusts it
    verdict: Verdict | None  # None: no ref (or a broken one) — nothing to judge

    @property
    def refused(self) -> bool:
        """A stored result was found and not trusted."""
        return self.verdict is not None and not self.verdict.trusted


def trusted_hit(store: Store, key: str, policy: TrustPolicy, *, deep: bool = False) -> Lookup:
    """A hit that `policy` trusts, or a miss with the verdict that refused it.

    The attestations the ref lists are judged first (cached by address: a repeated hit costs
    no extra read); if they are not enough, every stored attestation of the result is."""
    hit = store.get_ref(key, deep=deep)
    if hit is None:
        return Lookup(None, None)
    verdict = judge_stored(store, policy, key, hit.digest, hit.attestations)
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
    for info in store.backend.list("refs/"):
        key = digest_of_name(info.name)
        entry = store.read_ref_entry(key)
        if entry is None:
            continue
        judged += 1
        verdict = judge_stored(store, policy, key, entry.result, entry.attestations)
        if not verdict.trusted:
            untrusted.append(Untrusted(key, entry.result, verdict))
    return judged, untrusted
