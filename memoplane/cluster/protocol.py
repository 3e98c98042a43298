"""The contract between operator and agents (DESIGN §6), in one place.

Assignment: the operator labels a ComputeJob `memoplane.io/node=<node>` and sets
`status.phase: Scheduled` with `status.jobDigest`, the digest of the resolved job
manifest (memoplane.jobs.job_to_dict, stored as a blob in the ResultCache's store).
Agents watch with the label selector, like a kubelet, and claim a job by patching
`status.phase: Running` with a resourceVersion precondition.

Liveness: each agent holds a coordination.k8s.io Lease named `memoplane-node-<node>`
in the agents' namespace, renewed every RENEW_SECONDS, annotated with what it can take.
"""

from __future__ import annotations

from ..api.common import API_VERSION, GROUP, VERSION  # noqa: F401  (one definition, in the API models)
COMPUTEJOBS = "computejobs"
RESULTCACHES = "resultcaches"
GMEMSEEDS = "gmemseeds"

# Labels (values at most 63 characters).
NODE_LABEL = f"{GROUP}/node"            # the node a job is assigned to
KEY_LABEL = f"{GROUP}/key"              # first KEY_LABEL_CHARS hex chars of the cache key
KEY_LABEL_CHARS = 40                    # 160 bits: collisions only cost a wait, never a wrong result

# Lease of an agent.
LEASE_PREFIX = "memoplane-node-"
RENEW_SECONDS = 2.0
LEASE_DURATION_SECONDS = 10             # a node whose lease is older than this is gone
CAPACITY_ANNOTATION = f"{GROUP}/capacity"     # int: jobs it runs at once
RUNNING_ANNOTATION = f"{GROUP}/running"       # int: jobs running now
PROFILES_ANNOTATION = f"{GROUP}/profiles"     # comma-separated runtime profiles
RUNTIME_ANNOTATION_PREFIX = f"{GROUP}/runtime-"  # + profile: that profile's runtime identity digest

# Phases (a summary for humans; conditions are the API).
PENDING, WAITING, SCHEDULED, RUNNING, SUCCEEDED, FAILED = (
    "Pending", "Waiting", "Scheduled", "Running", "Succeeded", "Failed")
TERMINAL = frozenset({SUCCEEDED, FAILED})


def lease_name(node: str) -> str:
    return LEASE_PREFIX + node


def key_label(cache_key: str) -> str:
    return cache_key.removeprefix("b3:")[:KEY_LABEL_CHARS]
