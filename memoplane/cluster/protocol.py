"""The contract between operator and agents (DESIGN §6), in one place.

Assignment: the operator annotates a ComputeJob with the digest of its resolved job manifest
(JOB_DIGEST_ANNOTATION; memoplane.jobs.job_to_dict, stored as a blob in the ResultCache's
store), labels it `memoplane.io/node=<node>` and sets `status.phase: Scheduled`. Agents
watch with the label selector, like a kubelet, and claim a job by patching
`status.phase: Running` with a resourceVersion precondition.

Liveness: each agent holds a coordination.k8s.io Lease named `memoplane-node-<node>`
in the agents' namespace, renewed every RENEW_SECONDS, annotated with what it can take.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.common import API_VERSION as API_VERSION  # one definition each, in the API models
from ..api.common import GROUP as GROUP
from ..api.common import VERSION as VERSION
from ..api.computejob import COMPUTEJOB, CacheSpec
from ..api.gmemseed import GMEMSEED
from ..api.resultcache import RESULTCACHE
from ..api.sandbox import SANDBOX
from ..errors import InputError
from ..settings import home_location

COMPUTEJOBS = COMPUTEJOB.plural       # the plurals the CRDs are served under (memoplane.api)
RESULTCACHES = RESULTCACHE.plural
SANDBOXES = SANDBOX.plural
GMEMSEEDS = GMEMSEED.plural

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
SIGNING_KEY_ANNOTATION = f"{GROUP}/signing-key"  # <keyid>:<base64 raw Ed25519 key>: the agent's own key
SESSIONS_ANNOTATION = f"{GROUP}/sessions"     # host:port of its session endpoint (memoplane.server.placement)

# The agents' public keys the operator has seen in Leases, kept when a node is gone (its
# results stay hits): a ConfigMap in the agents' namespace, `<keyid>.pub` entries holding PEM,
# written by the operator only.
AGENT_KEYS_CONFIG_MAP = "memoplane-agent-keys"

# Phases (a summary for humans; conditions are the API).
PENDING, WAITING, SCHEDULED, RUNNING, SUCCEEDED, FAILED = (
    "Pending", "Waiting", "Scheduled", "Running", "Succeeded", "Failed")
TERMINAL = frozenset({SUCCEEDED, FAILED})


def lease_name(node: str) -> str:
    return LEASE_PREFIX + node


def key_label(cache_key: str) -> str:
    return cache_key.removeprefix("b3:")[:KEY_LABEL_CHARS]


# -- the assignment (metadata, written by the operator in one patch with the node label) ----
#
# The resolved job for the current generation: the digest of its manifest (a blob in the
# ResultCache's store), the generation it was resolved from and the store's URL
# (s3://bucket/prefix). Metadata rather than status because the status schema is the
# user-facing contract; the agent checks the manifest against status.cacheKey (written by
# controllers only), so an edited annotation can make it run nothing but an honest job.
# A job served from the cache when it is resolved has no assignment (one of an earlier
# generation is removed): status.result.store says where its result is.
JOB_DIGEST_ANNOTATION = f"{GROUP}/job-digest"
JOB_GENERATION_ANNOTATION = f"{GROUP}/job-generation"
STORE_ANNOTATION = f"{GROUP}/store"
# "false" when the cache's spec.quota was reached at resolution: compute, but set no ref.
CACHE_RESULT_ANNOTATION = f"{GROUP}/cache-result"
ASSIGNMENT_ANNOTATIONS = (JOB_DIGEST_ANNOTATION, JOB_GENERATION_ANNOTATION, STORE_ANNOTATION,
                          CACHE_RESULT_ANNOTATION)

# Components named in Events and status.
OPERATOR_COMPONENT = "memoplane-operator"
AGENT_COMPONENT = "memoplane-agent"

# Reasons (CamelCase: kstatus condition reasons and Event reasons).
REASON_RESOLVED = "Resolved"
REASON_CACHE_HIT = "CacheHit"
REASON_COMPUTED = "Computed"
REASON_SCHEDULED = "Scheduled"
REASON_REASSIGNED = "NodeLost"
REASON_RESCHEDULED = "Rescheduled"
REASON_RUNNING = "Running"
REASON_BACKOFF = "BackOff"
REASON_IN_FLIGHT = "SameKeyInFlight"
REASON_UPSTREAM = "WaitingForUpstream"
REASON_UPSTREAM_FAILED = "UpstreamFailed"
REASON_UPSTREAM_CHANGED = "UpstreamChanged"  # a settled job held back: an upstream it used is recomputed
REASON_EARLY_CUTOFF = "EarlyCutoff"   # a held job's upstreams recomputed to the same results: nothing re-ran
REASON_UPSTREAM_GONE = "UpstreamDeleted"  # a held job's upstream deleted: it keeps the result it had
REASON_NOT_FOUND = "InputNotFound"
REASON_NO_AGENT = "NoAgentForProfile"
REASON_NO_NODE = "NoNodeAvailable"
REASON_NO_CACHE = "ResultCacheNotFound"
REASON_INVALID = "InvalidSpec"
REASON_UNSUPPORTED = "Unsupported"
REASON_RUNTIME_MISMATCH = "RuntimeMismatch"
REASON_STORE = "StoreUnavailable"
REASON_OBJECT_NOT_ALLOWED = "ObjectNotAllowed"  # a fromObject input outside the namespace's allowlist
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_UNTRUSTED = "Untrusted"        # a stored result the cache's trust policy refused: recomputed
REASON_TRUST_KEYS = "TrustKeysUnavailable"  # the cache's trusted keys cannot be read: its jobs wait
REASON_AGENT_ERROR = "AgentError"      # the agent itself failed while handling the job (a failed attempt)
REASON_SHARING_DENIED = "SharingDenied"  # the cache's location is another namespace's: not read, or not written
REASON_LOCATION_OWNED = "LocationOwned"  # a ResultCache in another namespace's location with no grant: Stalled
REASON_LOCATION_REFUSED = "LocationRefused"  # a location no namespace may use (e.g. the default bucket's root)
REASON_STORE_CHANGED = "StoreChanged"  # sharing changed where a resolved job may write: Pending, resolved again
REASON_QUOTA_EXCEEDED = "QuotaExceeded"  # a cache at its spec.quota: results computed, not cached
REASON_UNDER_QUOTA = "UnderQuota"
CONDITION_QUOTA_EXCEEDED = "QuotaExceeded"  # a ResultCache's condition: True at its spec.quota
REASON_EVICTED = "Evicted"            # a ResultCache pass of retention evicted entries (their data goes at GC)
REASON_DEMOTED = "Demoted"            # a ResultCache pass moved content not read for tiers[0].after to the tier

DEFAULT_RESULT_CACHE: str = CacheSpec.model_fields["result_cache"].default   # the model's, not typed again
# The bucket of namespaces' homes (their default ResultCaches, GMemSeed overlays) and the
# prefix the homes are under: the process's MEMOPLANE_HOME (memoplane.settings), read once.
# A malformed MEMOPLANE_HOME is reported in one line by each program's start (home_location() again,
# where its errors are caught), not as a traceback from this import.
try:
    DEFAULT_BUCKET, HOME_PREFIX = home_location()
except InputError:
    DEFAULT_BUCKET, HOME_PREFIX = home_location({})


def default_store_prefix(namespace: str) -> str:
    """Namespace `namespace`'s home in DEFAULT_BUCKET."""
    return f"{HOME_PREFIX}/{namespace}/" if HOME_PREFIX else f"{namespace}/"


def home_namespace(bucket: str, prefix: str) -> str | None:
    """The namespace whose home holds the location (`prefix` normalised: "" or "a/b/"); None
    when it is outside the homes (another bucket, or outside HOME_PREFIX: say another cluster's
    part of a bucket both use) or holds them all."""
    root = f"{HOME_PREFIX}/" if HOME_PREFIX else ""
    if bucket != DEFAULT_BUCKET or not prefix.startswith(root):
        return None
    return prefix[len(root):].split("/", 1)[0] or None


def holds_every_home(bucket: str, prefix: str) -> bool:
    """The location (`prefix` normalised) contains every namespace's home."""
    return bucket == DEFAULT_BUCKET and (f"{HOME_PREFIX}/" if HOME_PREFIX else "").startswith(prefix)


def store_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"


def parse_store_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"store URL {url!r} is not s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"store URL {url!r} names no bucket")
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class ColdTier:
    """A ResultCache's spec.tiers[0]: the location content moves to after `after` seconds unread.
    The operator names it to the agent in the job's status.coldTier (text()), not in the
    metadata: whoever may edit a ComputeJob must not choose where an agent reads from and re-warms."""

    bucket: str
    prefix: str   # stripped of slashes, as parse_store_url gives it
    after: float

    @property
    def url(self) -> str:
        return store_url(self.bucket, self.prefix)

    def text(self) -> str:
        return f"{self.after:g} {store_url(self.bucket, self.prefix)}"

    @classmethod
    def parse(cls, text: str) -> ColdTier:
        """The inverse of text(); ValueError for anything else."""
        after, _, url = text.partition(" ")
        try:
            seconds = float(after)
        except ValueError:
            raise ValueError(f"cold tier {text!r} is not '<seconds> s3://bucket/prefix'") from None
        if not seconds > 0:
            raise ValueError(f"cold tier {text!r}: the delay is not positive")
        return cls(*parse_store_url(url), after=seconds)


def runtime_annotation(profile: str) -> str:
    return RUNTIME_ANNOTATION_PREFIX + profile


# -- namespace scoping ----------------------------------------------------------------------
#
# The operator is scoped with kopf's namespace patterns (MEMOPLANE_WATCH_NAMESPACES, e.g.
# "team-*" or "*,!test-*"): several operators (test sessions) can share one API server. The
# agents watch cluster-wide by label and apply the same patterns, so that an agent of one
# session never runs another session's job.


def _glob_matches(glob: str, name: str) -> bool:
    from fnmatch import fnmatchcase
    return fnmatchcase(name, glob)


def pattern_matches(pattern: str, namespace: str) -> bool:
    """kopf's semantics for one pattern: comma-separated globs, `!` negates, the rightmost
    matching glob wins; the first glob is decisive (a leading negation implies `*` first)."""
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    if not globs:
        return False
    first = globs[0]
    if first.startswith("!"):
        result = True
    elif _glob_matches(first, namespace):
        result = True
    else:
        return False
    for glob in globs:
        if glob.startswith("!"):
            if _glob_matches(glob[1:], namespace):
                result = False
        elif _glob_matches(glob, namespace):
            result = True
    return result


def namespace_matches(patterns: list[str] | tuple[str, ...], namespace: str) -> bool:
    """Empty patterns: every namespace (cluster-wide)."""
    return not patterns or any(pattern_matches(p, namespace) for p in patterns)


def parse_patterns(text: str | None) -> list[str]:
    """MEMOPLANE_WATCH_NAMESPACES: patterns separated by spaces or semicolons
    (commas belong to a pattern)."""
    if not text:
        return []
    return [p for p in text.replace(";", " ").split() if p]
