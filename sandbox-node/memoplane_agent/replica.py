"""A replica's result (memoplane.cluster.replicas): stored normalised and attested by this
node, never pointed at by the ref — the parent job compares the replicas and decides."""

from __future__ import annotations

from memoplane.cas import ResultManifest, Store
from memoplane.cluster.replicas import replica_result
from memoplane.jobs import Job
from memoplane.trust import SigningKey
from memoplane.trust.attestation import attest

REASON_NO_KEY = "NoSigningKey"


def store_replica(store: Store, job: Job, computed: ResultManifest, signer: SigningKey, node: str
                  ) -> tuple[ResultManifest, str]:
    """Store `computed` without who and when, and this node's attestation of it (who and when)."""
    result = replica_result(computed)
    digest = store.put_result(result)
    started, ended = computed.provenance.started_at, computed.provenance.ended_at
    store.put_attestation(job.key, digest, attest(job.key, job.key_parts().components(), digest, signer, node,
                                                  started, ended))
    return result, digest
