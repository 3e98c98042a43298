"""Settings of the stores, the operator and the node agents, in one place.

Each field is documented once, here, with the one environment variable that sets it; the
processes' flags are made from the same fields (`--lease-namespace` for `lease_namespace`)
and override the environment. The chart's values map onto these variables one to one
(charts/memoplane/templates: operator.yaml, agent.yaml, _helpers.tpl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")

LOCAL_CACHE_BYTES = 2 << 30   # a node-local chunk cache's bound, unless MEMOPLANE_LOCAL_CACHE_BYTES says otherwise
MISSING_GRACE_SECONDS = 60.0  # how long a job waits for a missing upstream, ConfigMap or object before failing
# spec.map.overChunks: the target chunk size of one leaf task (FastCDC's average; min half, max 4x), cut at rows.
# Big enough that a task's start-up is small beside its work; small enough that a 1% block edit reruns <= 3% of
# the leaves of a 64 MiB table (bench/incremental_chunks.py).
CHUNK_TASK_BYTES = 256 << 10
CHUNK_TASK_BYTES_ENV = "MEMOPLANE_CHUNK_TASK_BYTES"


def setting(env: str | None, default: Any, doc: str, *, secret: bool = False) -> Any:
    """A settings field: its environment variable (None: a flag only), its default, what it means."""
    return field(default=default, repr=not secret, metadata={"env": env, "doc": doc})


def _parse(kind: str, text: str, name: str) -> Any:
    """An environment variable's text as the field's type (annotations are strings here)."""
    if kind == "bool":
        return text.strip().lower() not in ("0", "false", "no", "off")
    if kind in ("int", "float"):
        convert = int if kind == "int" else float
        try:
            return convert(text)
        except ValueError:
            raise InputError(f"{name}={text!r} is not a number", f"set {name} to a {convert.__name__}") from None
    return text


def from_env(cls: type[T], env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """The settings from the environment (and `overrides`, e.g. flags), defaults elsewhere."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if f.name in overrides and overrides[f.name] is not None:
            values[f.name] = overrides[f.name]
        elif name and env.get(name) not in (None, ""):
            values[f.name] = _parse(str(f.type), env[name], name)
    return cls(**values)


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], names: Sequence[str]) -> None:
    """Flags for the fields `names` of `cls` (default None: the environment, then the field's default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        kind = {"int": int, "float": float}.get(str(f.type), str)
        env = f" (env {f.metadata['env']})" if f.metadata.get("env") else ""
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{f.metadata['doc']}; default {f.default!r}{env}")


def flag_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def describe(cls: type[Any]) -> str:
    """One line per environment variable: for a --help epilog."""
    return "\n".join(f"  {f.metadata['env']:<30} {f.metadata['doc']} (default {f.default!r})"
                     for f in dataclasses.fields(cls) if f.metadata.get("env"))


# -- the object store -------------------------------------------------------------------------

CREDENTIALS_ENV = "MEMOPLANE_S3_CREDENTIALS_DIR"
LOCAL_CACHE_ENV = "MEMOPLANE_LOCAL_CACHE"               # also read by memoplane.cas.open_store
LOCAL_CACHE_BYTES_ENV = "MEMOPLANE_LOCAL_CACHE_BYTES"
# The embedded store's cold tier (memoplane.cas.open_store): a location as for MEMOPLANE_STORE, and how long
# content goes unread before `memoplane gc` moves it there. A cluster's comes from ResultCache spec.tiers.
COLD_STORE_ENV = "MEMOPLANE_COLD_STORE"
COLD_AFTER_ENV = "MEMOPLANE_COLD_AFTER_SECONDS"
COLD_AFTER_SECONDS = 30 * 86400.0
CREDENTIAL_FILES = ("accessKey", "secretKey")   # the keys of the chart's store Secret
KEY_ENVS = ("MEMOPLANE_S3_ACCESS_KEY", "MEMOPLANE_S3_SECRET_KEY")


@dataclass(frozen=True)
class StoreSettings:
    endpoint: str | None = setting("MEMOPLANE_S3_ENDPOINT", None, "the S3/MinIO endpoint, http://host:port or https://host")
    access_key: str | None = setting(KEY_ENVS[0], None, "the store's access key (not with the "
                                     "credentials directory)", secret=True)
    secret_key: str | None = setting(KEY_ENVS[1], None, "the store's secret key (not with the "
                                     "credentials directory)", secret=True)
    root: str | None = setting("MEMOPLANE_STORE_ROOT", None, "a directory standing in for the object store: "
                               "a bucket is a directory under it")
    local_cache: str | None = setting(LOCAL_CACHE_ENV, None, "a node-local chunk cache directory in "
                                      "front of the store (agents)")
    local_cache_bytes: int = setting(LOCAL_CACHE_BYTES_ENV, LOCAL_CACHE_BYTES,
                                     "the node-local chunk cache's bound in bytes")
    workers: int | None = setting(None, 4, "threads a store uploads and reads ahead with")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, local_cache: str | None = None) -> StoreSettings:
        """The store settings; the keys come from MEMOPLANE_S3_CREDENTIALS_DIR when it is set (see
        read_credentials). Raises InputError (one line) for a credentials directory that is missing,
        incomplete or readable by others, or that is set while the keys are in the environment too."""
        env = os.environ if env is None else env
        settings = from_env(cls, env, local_cache=local_cache)
        if env.get(CREDENTIALS_ENV):
            if settings.access_key or settings.secret_key:
                raise InputError(f"{CREDENTIALS_ENV} is set and so are {' / '.join(KEY_ENVS)}",
                                 "unset the key variables: the keys belong in the credentials files only")
            access_key, secret_key = read_credentials(Path(env[CREDENTIALS_ENV]))
            settings = dataclasses.replace(settings, access_key=access_key, secret_key=secret_key)
        return settings

    def describe(self) -> str:
        return f"directory {self.root}" if self.root else f"S3 {self.endpoint}"


def read_credentials(directory: Path) -> tuple[str, str]:
    """The store keys from `directory`: a file `accessKey` and a file `secretKey`, each holding
    the key (a trailing newline is ignored), readable by their owner only (mode 0400 or 0600).
    That is the layout of a Kubernetes Secret with those keys mounted as a volume (its files
    are links into a ..data directory: modes are those of the targets)."""
    access_key, secret_key = (read_private_file(directory / name, CREDENTIALS_ENV, f"the store's {name}",
                                                f"or unset {CREDENTIALS_ENV}") for name in CREDENTIAL_FILES)
    return access_key, secret_key


def open_to_others(info: os.stat_result) -> bool:
    """Whether a secret's file is readable or writable by others than its owner. Group-readable is
    fine when the group is this process's own (not root's): the pod's fsGroup, which is how a
    non-root container reads a Secret volume."""
    own_group = info.st_gid == os.getegid() != 0
    return bool(info.st_mode & 0o037 or (info.st_mode & 0o040 and not own_group))


def read_private_file(path: Path, env: str, what: str, alternative: str = "") -> str:
    """A secret's text from `path` (a trailing newline is ignored): it must exist, be readable
    by its owner only (or also by this process's own non-root group) and not be empty;
    InputError naming `env` and the fix otherwise."""
    try:
        stat = path.stat()
        text = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise InputError(f"{env}: cannot read {path} ({exc.strerror})",
                         f"put {what} there (mode 0400)" + (f", {alternative}" if alternative else "")) from None
    mode = stat.st_mode
    if open_to_others(stat):
        raise InputError(f"{env}: {path} is readable or writable by group or others "
                         f"(mode {mode & 0o777:04o})", f"chmod 0400 {path} (a Secret volume: defaultMode 0400)")
    if not text.strip():
        raise InputError(f"{env}: {path} is empty", f"put {what} in it")
    return text


# -- where a namespace's results live by default -----------------------------------------------

HOME_ENV = "MEMOPLANE_HOME"
DEFAULT_HOME = "s3://memoplane"
HOME_DOC = ("where namespaces' homes are: s3://bucket[/prefix]; namespace N's default ResultCache and GMemSeed "
            "overlays live under <prefix>/N/ in that bucket (two clusters sharing a bucket: one prefix each)")


def home_location(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(bucket, prefix without slashes) of MEMOPLANE_HOME (default s3://memoplane); InputError (one
    line) for anything else than s3://bucket[/prefix]. Read once per process (memoplane.cluster.protocol)."""
    env = os.environ if env is None else env
    url = env.get(HOME_ENV) or DEFAULT_HOME
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket or any(part in (".", "..") for part in prefix.split("/")):
        raise InputError(f"{HOME_ENV}={url!r} is not s3://bucket[/prefix]",
                         f"set {HOME_ENV} like s3://memoplane or s3://shared/cluster-a (the chart's objectStore)")
    return bucket, prefix.strip("/")


# -- signing ----------------------------------------------------------------------------------

SIGNING_KEY_FILE_ENV = "MEMOPLANE_SIGNING_KEY_FILE"
SIGNING_KEYID_ENV = "MEMOPLANE_SIGNING_KEYID"
NODE_KEY_DIR_ENV = "MEMOPLANE_NODE_KEY_DIR"


@dataclass(frozen=True)
class SigningSettings:
    """The operator's Ed25519 key (the chart generates it at install and keeps it on upgrade,
    named `<release>-agents-1`: before each agent had a key of its own, the agents signed with
    it too). The operator attests the results it computes (map lists) and audit checkpoints
    with it, and trusts it, with every agent's own key, where a ResultCache says
    `trust.clusterAgents: true` (the default). Agents sign with their node key (AgentSettings.key_dir)."""

    key_file: str | None = setting(SIGNING_KEY_FILE_ENV, None, "the operator's Ed25519 private key, PKCS#8 PEM in "
                                   "a file readable by its owner only (mode 0400)")
    keyid: str | None = setting(SIGNING_KEYID_ENV, None, "that key's id: a name and an epoch, e.g. "
                                "memoplane-agents-1")

    def read(self) -> tuple[str, bytes]:
        """(key id, private key PEM); InputError (one line) when unset or unreadable."""
        if not self.key_file or not self.keyid:
            raise InputError(f"{SIGNING_KEY_FILE_ENV} and {SIGNING_KEYID_ENV} must both be set",
                             "mount the chart's signing key Secret and set both (the chart does)")
        pem = read_private_file(Path(self.key_file), SIGNING_KEY_FILE_ENV, "the operator's private key")
        return self.keyid, pem.encode() + b"\n"


# -- embedded mode: the keys this user signs with and the keys they trust (memoplane.trust.local) --------

KEYS_DIR_ENV = "MEMOPLANE_KEYS_DIR"
API_KEYS_ENV = "MEMOPLANE_SERVE_API_KEYS"
API_KEYS_FILE = "apikeys.json"   # in the keys directory unless MEMOPLANE_SERVE_API_KEYS names another


def keys_dir(env: Mapping[str, str] | None = None) -> Path:
    """$MEMOPLANE_KEYS_DIR, else $XDG_CONFIG_HOME/memoplane/keys (~/.config/memoplane/keys): the
    embedded keyring and trust file. Configuration, not cache: deleting it loses the signing key."""
    env = os.environ if env is None else env
    if env.get(KEYS_DIR_ENV):
        return Path(env[KEYS_DIR_ENV]).expanduser()
    return Path(env.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "memoplane" / "keys"


# -- the local daemon: where `memoplane serve` listens for this user's `memoplane run` ----------

DAEMON_ENV = "MEMOPLANE_DAEMON"
DAEMON_MODES = ("auto", "always", "never")   # auto: the daemon when one runs, else in this process
DAEMON_HELP = ("whether `memoplane run` hands its job to a running `memoplane serve` of this store: auto "
               "(default: when one runs), always (fail if none), never (run in this process); "
               f"default ${DAEMON_ENV} or auto")


def daemon_dir(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_RUNTIME_DIR/memoplane, else ~/.cache/memoplane/run: the daemon's sockets, in a directory
    only its user may enter (memoplane.server.daemon checks its owner and mode)."""
    env = os.environ if env is None else env
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "memoplane"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "memoplane" / "run"


# -- history: where the index of a store's run records lives (memoplane.history.index) ------------

HISTORY_INDEX_FILE = "history-index.sqlite"


def history_index_path(store_root: Path | None, store_description: str, env: Mapping[str, str] | None = None) -> Path:
    """Next to a local store (its directory); for an object store, under the user's cache
    directory ($XDG_CACHE_HOME/memoplane/history, ~/.cache/...) by the store's description.
    A cache: deleting it costs one rebuild from the store's records."""
    if store_root is not None:
        return store_root / HISTORY_INDEX_FILE
    import hashlib

    env = os.environ if env is None else env
    name = hashlib.sha256(store_description.encode()).hexdigest()[:24]
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "memoplane" / "history" / f"{name}.sqlite"


# -- the operator and the agents --------------------------------------------------------------

WATCH_DOC = 'namespace patterns, space separated (empty: every namespace), e.g. "ml research" or "*,!kube-*"'


# The secret the agent API and the node agents share: an agent starts a sandbox in its warm pool only for a
# caller that proves it holds it (memoplane.server.placement). A file, as the chart mounts its Secret.
SESSION_SECRET_FILE_ENV = "MEMOPLANE_SESSION_SECRET_FILE"
SESSION_SECRET_DOC = ("the secret the agent API and the agents share (a file, mode 0400; the chart's "
                      "api-sessions Secret): the agents' session endpoint serves only its holders; unset: "
                      "no such endpoint (agents) / sandboxes run in this process (the API)")
OPENLINEAGE_URL_ENV = "MEMOPLANE_OPENLINEAGE_URL"   # read by memoplane.history.openlineage (embedded runs too)
OPENLINEAGE_DOC = ("an OpenLineage HTTP endpoint (events go to <url>/api/v1/lineage): every run's START and "
                   "COMPLETE/FAIL; empty: none are sent")
OBJECT_INPUTS_ENV = "MEMOPLANE_OBJECT_INPUTS"
OBJECT_INPUTS_FIX = ('set it to a JSON list of {"namespaces": ["ml"] or "*", "bucket": "data", "prefix": "tables/"} '
                     '(the chart\'s objectInputs)')


@dataclass(frozen=True)
class ObjectGrant:
    """One entry of the cluster's fromObject allowlist: `namespaces` (None: every namespace) may
    read the objects of `bucket` whose keys start with `prefix` ("" or ending in "/")."""

    namespaces: tuple[str, ...] | None
    bucket: str
    prefix: str


def parse_object_grants(text: str) -> tuple[ObjectGrant, ...]:
    """MEMOPLANE_OBJECT_INPUTS (JSON) as grants; empty: none (no object is readable). InputError
    (one line, naming the variable and the entry) for anything else than the documented shape."""
    if not text.strip():
        return ()
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{OBJECT_INPUTS_ENV} is not JSON ({exc})", OBJECT_INPUTS_FIX) from None
    if not isinstance(raw, list):
        raise InputError(f"{OBJECT_INPUTS_ENV} is not a list", OBJECT_INPUTS_FIX)
    return tuple(_object_grant(entry, f"{OBJECT_INPUTS_ENV}[{i}]") for i, entry in enumerate(raw))


def _object_grant(entry: Any, where: str) -> ObjectGrant:
    if not isinstance(entry, dict) or set(entry) != {"namespaces", "bucket", "prefix"}:
        raise InputError(f"{where} must have exactly the keys namespaces, bucket and prefix", OBJECT_INPUTS_FIX)
    namespaces, bucket, prefix = entry["namespaces"], entry["bucket"], entry["prefix"]
    if not isinstance(bucket, str) or not bucket:
        raise InputError(f"{where}.bucket must be a bucket name", OBJECT_INPUTS_FIX)
    if not isinstance(prefix, str) or (prefix and not prefix.endswith("/")) or prefix.startswith("/"):
        raise InputError(f"{where}.prefix {prefix!r} must be \"\" (the whole bucket) or a key prefix ending in "
                         "\"/\" (a directory)", f'write e.g. "tables/" in {where}.prefix')
    if namespaces == "*":
        return ObjectGrant(None, bucket, prefix)
    if not isinstance(namespaces, list) or not namespaces or \
            not all(isinstance(n, str) and n and n != "*" for n in namespaces):
        raise InputError(f"{where}.namespaces must be \"*\" (every namespace) or a list of namespace names",
                         OBJECT_INPUTS_FIX)
    return ObjectGrant(tuple(namespaces), bucket, prefix)


@dataclass(frozen=True)
class OperatorSettings:
    watch_namespaces: str = setting("MEMOPLANE_WATCH_NAMESPACES", "", "the " + WATCH_DOC)
    lease_namespace: str = setting("MEMOPLANE_NAMESPACE", "memoplane-system", "where the agents' Leases live")
    metrics_port: int = setting("MEMOPLANE_METRICS_PORT", 9090, "Prometheus /metrics (0 disables)")
    health_port: int = setting("MEMOPLANE_HEALTH_PORT", 8081, "kopf's liveness endpoint /healthz (0 disables)")
    resync_seconds: float = setting("MEMOPLANE_RESYNC_SECONDS", 2.0, "how often unfinished jobs are revisited")
    stats_seconds: float = setting("MEMOPLANE_STATS_SECONDS", 30.0, "how often ResultCache stats are refreshed")
    seed_resync_seconds: float = setting("MEMOPLANE_SEED_RESYNC_SECONDS", 10.0,
                                         "how often every GMemSeed's inbox is checked")
    backoff_base: float = setting("MEMOPLANE_BACKOFF_BASE", 1.0, "seconds before a failed job's first retry "
                                  "(doubling per attempt)")
    log_level: str = setting("MEMOPLANE_LOG_LEVEL", "INFO", "the log level")
    full_resync_seconds: float = setting(None, 30.0, "how often every job is listed (the job index's safety net)")
    resolvers: int = setting(None, 4, "threads resolving jobs and serving hits (0: on the worker)")
    missing_grace_seconds: float = setting(None, MISSING_GRACE_SECONDS, "how long a missing input is waited for")
    home: str = setting(HOME_ENV, DEFAULT_HOME, HOME_DOC)
    object_inputs: str = setting(OBJECT_INPUTS_ENV, "", "the fromObject allowlist, JSON: who may read which "
                                 "bucket/prefix as inputs (empty: no object is readable)")

    def object_grants(self) -> tuple[ObjectGrant, ...]:
        """The parsed allowlist; InputError (one line) when it is malformed."""
        return parse_object_grants(self.object_inputs)
    retention_seconds: float = setting("MEMOPLANE_RETENTION_SECONDS", 30.0, "how often the retention worker counts "
                                       "each ResultCache's usage, applies its retention and updates its stats")
    retention_grace_seconds: float = setting("MEMOPLANE_RETENTION_GRACE_SECONDS", 600.0, "nothing written or used "
                                             "within this many seconds is evicted")
    reindex_seconds: float = setting("MEMOPLANE_REINDEX_SECONDS", 3600.0, "how often each ResultCache's usage index "
                                     "is checked against its store's refs (what others wrote), in bounded batches")
    gc_seconds: float = setting("MEMOPLANE_GC_SECONDS", 3600.0, "how often a store with retention is swept of "
                                "objects no ref reaches (also after each pass that evicted)")
    demote_seconds: float = setting("MEMOPLANE_DEMOTE_SECONDS", 3600.0, "how often a ResultCache with a cold tier "
                                    "(spec.tiers) has its content not read for tiers[0].after moved there")
    gc_grace_seconds: float = setting("MEMOPLANE_GC_GRACE_SECONDS", 3600.0, "unreferenced objects younger than this "
                                      "are kept by the sweep (in-flight writes)")
    usage_flush_seconds: float = setting(None, 2.0, "how often the hits and writes seen are appended to the usage log")
    compact_seconds: float = setting(None, 300.0, "how often a changed usage index is written as the snapshot "
                                     "(at once after evictions)")
    evictions_per_pass: int = setting(None, 1000, "refs a ResultCache evicts at most per retention pass")
    demotions_per_pass: int = setting(None, 2000, "objects a ResultCache moves to its cold tier at most per pass "
                                      "(more left: the next pass goes on)")
    index_reads_per_pass: int = setting(None, 2000, "refs a ResultCache without a usage index reads per pass")
    openlineage_url: str = setting(OPENLINEAGE_URL_ENV, "", OPENLINEAGE_DOC)
    map_batch_size: int = setting("MEMOPLANE_MAP_BATCH_SIZE", 64, "missed elements of a spec.map job one child "
                                  "ComputeJob (a batch run by one agent) holds, at most 1024")
    map_lookup_threads: int = setting(None, 16, "threads looking a spec.map job's element keys up in the cache")
    chunk_task_bytes: int = setting(CHUNK_TASK_BYTES_ENV, CHUNK_TASK_BYTES, "the target size of a spec.map.overChunks "
                                    "chunk (one leaf task), bytes")


@dataclass(frozen=True)
class AgentSettings:
    node: str | None = setting("NODE_NAME", None, "the node this agent serves (required)")
    lease_namespace: str = setting("MEMOPLANE_NAMESPACE", "memoplane-system", "where the agents' Leases live")
    watch_namespaces: str = setting("MEMOPLANE_WATCH_NAMESPACES", "", "the " + WATCH_DOC + " whose jobs it runs")
    capacity: int = setting("MEMOPLANE_CAPACITY", 2, "jobs run at once")
    profiles: str = setting("MEMOPLANE_PROFILES", "python", "runtime profiles served, comma separated")
    http_host: str = setting("MEMOPLANE_HTTP_HOST", "0.0.0.0", "address of /healthz /readyz /metrics")
    http_port: int = setting("MEMOPLANE_HTTP_PORT", 8080, "port of /healthz /readyz /metrics (0: any free port)")
    backoff_base: float = setting("MEMOPLANE_BACKOFF_BASE", 1.0, "seconds before a failed job's first retry "
                                  "(doubling per attempt)")
    require_isolation: bool = setting("MEMOPLANE_REQUIRE_ISOLATION", True, "refuse to start without full "
                                      "sandbox isolation")
    log_level: str = setting("MEMOPLANE_LOG_LEVEL", "INFO", "the log level")
    key_dir: str | None = setting(NODE_KEY_DIR_ENV, None, "the directory (kept on the node, made 0700) of the "
                                  "agent's own signing key, <node>-<epoch>.key: made on first start (required)")
    openlineage_url: str = setting(OPENLINEAGE_URL_ENV, "", OPENLINEAGE_DOC)
    session_secret_file: str = setting(SESSION_SECRET_FILE_ENV, "", SESSION_SECRET_DOC)
    session_host: str = setting("MEMOPLANE_SESSION_HOST", "0.0.0.0", "address of the session endpoint (sandboxes "
                                "the agent API starts in this node's warm pool)")
    session_port: int = setting("MEMOPLANE_SESSION_PORT", 8091, "port of the session endpoint (0: any free port)")
    session_address: str = setting("POD_IP", "", "the address the API reaches the session endpoint at, announced "
                                   "in the node's Lease (the chart: the pod's IP); empty: session_host")
    session_warm: int = setting("MEMOPLANE_SESSION_WARM", 2, "warm sandbox children kept for API sessions, "
                                "started with the agent (0: none kept warm; the pool starts with the first sandbox)")


# -- the agent API (memoplane serve) ---------------------------------------------------------


@dataclass(frozen=True)
class TierLimits:
    """What one API key, or one team as a whole, may do. A rate is per minute; its bucket holds a
    burst of up to `*_burst` at once and refills continuously."""

    creations_per_minute: float
    creation_burst: int
    concurrent_sandboxes: int
    executions_per_minute: float
    execution_burst: int
    concurrent_executions: int   # commands, code cells and /v1/run calls running at once


@dataclass(frozen=True)
class Tier:
    key: TierLimits
    team: TierLimits


TIER_LIMITS = tuple(f.name for f in dataclasses.fields(TierLimits))
DEFAULT_TIER = "standard"   # a team's tier until `memoplane apikey create --tier` says otherwise
DEFAULT_TIERS = {
    "standard": Tier(key=TierLimits(60, 10, 10, 600, 50, 20), team=TierLimits(120, 20, 20, 1200, 100, 40)),
    "large": Tier(key=TierLimits(600, 50, 50, 6000, 200, 100), team=TierLimits(1200, 100, 100, 12000, 400, 200)),
}


@dataclass(frozen=True)
class ServeSettings:
    host: str = setting("MEMOPLANE_SERVE_HOST", "127.0.0.1", "the address `memoplane serve` listens on "
                        "(beyond loopback only with API keys: `memoplane apikey create`)")
    port: int = setting("MEMOPLANE_SERVE_PORT", 3000, "the port it listens on (0: any free port, printed)")
    warm: int = setting("MEMOPLANE_SERVE_WARM", 2, "warm sandbox children kept per runtime profile")
    warm_sessions: int = setting("MEMOPLANE_SERVE_WARM_SESSIONS", 2, "sandboxes kept started per runtime profile "
                                 "once it was used, their agent dialled back, so that a create only hands one "
                                 "out (0: every create starts its own)")
    default_timeout: int = setting(None, 300, "a sandbox's lifetime in seconds when create gives none (E2B's default)")
    max_timeout: int = setting("MEMOPLANE_SERVE_MAX_TIMEOUT", 3600, "the longest lifetime, seconds, a sandbox may "
                               "be given (create or set_timeout)")
    max_sandboxes: int = setting("MEMOPLANE_SERVE_MAX_SANDBOXES", 32, "sandboxes alive at once")
    require_isolation: bool = setting("MEMOPLANE_REQUIRE_ISOLATION", True, "refuse to start without full "
                                      "sandbox isolation")
    log_level: str = setting("MEMOPLANE_LOG_LEVEL", "INFO", "the log level")
    api_keys: str = setting(API_KEYS_ENV, "", "the API keys file (hashes only; default apikeys.json in the "
                            "keys directory): with a key in it every request needs one")
    clock_window: int = setting("MEMOPLANE_SERVE_CLOCK_WINDOW", 300, "seconds a signed request's timestamp may "
                                "differ from the server's clock (nonces are remembered for twice that)")
    tiers: str = setting("MEMOPLANE_SERVE_TIERS", "", "rate tiers as JSON {tier: {key|team: {limit: n}}} "
                         "(limits: " + ", ".join(TIER_LIMITS) + "); unset: the built-in tiers")
    namespace: str = setting("MEMOPLANE_SERVE_NAMESPACE", "", "on Kubernetes: the namespace of the node agents' "
                             "Leases, where sandboxes run in the agents' warm pools and are shown as Sandbox "
                             "objects (needs the session secret); empty: sandboxes run in this process")
    session_secret_file: str = setting(SESSION_SECRET_FILE_ENV, "", SESSION_SECRET_DOC)

    def __post_init__(self) -> None:
        if self.warm_sessions < 0:
            raise InputError(f"MEMOPLANE_SERVE_WARM_SESSIONS (--warm-sessions) is {self.warm_sessions}",
                             "give 0 or more warm sandboxes per runtime profile")


SERVE_FLAGS = ("host", "port", "warm", "warm_sessions", "max_timeout", "max_sandboxes")  # `memoplane serve`'s flags


def api_keys_path(settings: ServeSettings) -> Path:
    return Path(settings.api_keys).expanduser() if settings.api_keys else keys_dir() / API_KEYS_FILE


def serve_tiers(settings: ServeSettings) -> dict[str, Tier]:
    """The tiers of MEMOPLANE_SERVE_TIERS (every limit given), else DEFAULT_TIERS."""
    if not settings.tiers:
        return dict(DEFAULT_TIERS)
    fix = 'set MEMOPLANE_SERVE_TIERS to e.g. {"standard": {"key": {...}, "team": {...}}} with ' + \
        ", ".join(TIER_LIMITS)
    try:
        body = json.loads(settings.tiers)
    except ValueError:
        raise InputError("MEMOPLANE_SERVE_TIERS is not JSON", fix) from None
    if not isinstance(body, dict) or not body:
        raise InputError("MEMOPLANE_SERVE_TIERS is not an object of tier name -> limits", fix)
    return {str(name): Tier(*(_tier_limits(tier, scope, name, fix) for scope in ("key", "team")))
            for name, tier in body.items()}


def _tier_limits(tier: Any, scope: str, name: str, fix: str) -> TierLimits:
    limits = tier.get(scope) if isinstance(tier, dict) else None
    where = f"MEMOPLANE_SERVE_TIERS: {name}.{scope}"
    if not isinstance(limits, dict) or set(limits) != set(TIER_LIMITS):
        raise InputError(f"{where} does not give exactly the limits {', '.join(TIER_LIMITS)}", fix)
    for limit, value in limits.items():
        if type(value) not in (int, float) or value < 0:
            raise InputError(f"{where}.{limit} = {value!r} is not a number >= 0", fix)
    return TierLimits(**limits)
