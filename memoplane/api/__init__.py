"""The memoplane API: pydantic models of the custom resources (group memoplane.io,
version v1alpha1), the CRDs generated from them (`python -m memoplane.api.crd`),
manifest builders and status-condition helpers.

Short names (checked against the built-in ones, e.g. cj=CronJob, rc=ReplicationController):
ComputeJob `cjob`, ResultCache `rcache`, GMemSeed `gseed`, Sandbox `mpsbx`; all are in the category
`memoplane` (`kubectl get memoplane`).
"""

from ..quantity import parse_quantity
from .common import API_VERSION, GROUP, VERSION, Condition
from .computejob import (
    ComputeJob,
    ComputeJobSpec,
    ComputeJobStatus,
    Input,
    format_duration,
    short_key,
)
from .gmemseed import GMemSeed, GMemSeedSpec, GMemSeedStatus
from .resultcache import ResultCache, ResultCacheSpec, ResultCacheStatus
from .specs import (
    SpecError,
    computejob_manifest,
    gmemseed_manifest,
    parse,
    parse_computejob,
    parse_gmemseed,
    parse_resultcache,
    resultcache_manifest,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ComputeJob",
    "ComputeJobSpec",
    "ComputeJobStatus",
    "Condition",
    "GMemSeed",
    "GMemSeedSpec",
    "GMemSeedStatus",
    "Input",
    "ResultCache",
    "ResultCacheSpec",
    "ResultCacheStatus",
    "SpecError",
    "computejob_manifest",
    "format_duration",
    "gmemseed_manifest",
    "parse",
    "parse_computejob",
    "parse_gmemseed",
    "parse_quantity",
    "parse_resultcache",
    "resultcache_manifest",
    "short_key",
]
