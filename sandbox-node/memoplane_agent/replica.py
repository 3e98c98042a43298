"""A replica's result (memoplane.cluster.replicas): stored normalised and attested by this
node, never pointed at by the ref — the parent job compares the replicas and decides.

A spot check (memoplane.cluster.spotcheck) is a replica of a served job: when what this node
computed equals the served result normalised, the node also attests the served result — it
vouches for what was served, and the operator adds that attestation to the ref."""

from __future__ import annotations

from memoplane.cas import ResultManifest, Store
from memoplane.cluster.replicas import replica_result
from memoplane.errors import MemoplaneError
from memoplane.jobs import Job
from memoplane.trust import SigningKey
from memoplane.trust.attestation import attest

REASON_NO_KEY = "NoSigningKey"


def store_replica(store: Store, job: Job, computed: ResultManifest, signer: SigningKey, node: str,
                  checked: str | None = None) -> tuple[ResultManifest, str]:
    """Store `computed` without who and when, and this node's attestation of it (who and when);
    `checked`: the served result a spot check re-computes, attested too when it is the same."""
    result = replica_result(computed)
    digest = store.put_result(result)
    started, ended = computed.provenance.started_at, computed.provenance.ended_at
    for subject in (digest, *([checked] if checked and _same(store, checked, digest) else [])):
        store.put_attestation(job.key, subject, attest(job.key, job.key_parts().components(), subject, signer, node,
                                                       started, ended))
    return result, digest


def _same(store: Store, served: str, normalised: str) -> bool:
    try:
        return replica_result(store.get_result(served)).digest == normalised
    except MemoplaneError:
        return False
