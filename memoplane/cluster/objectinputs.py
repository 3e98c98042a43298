"""May a namespace read an object as a `fromObject` input? The cluster's allowlist says which
buckets/prefixes each namespace may read (memoplane.settings.ObjectGrant, the chart's
objectInputs); nothing else is readable. The operator reads with its own credentials, which
reach every namespace's results: memoplane's own result buckets are never readable as raw
objects, listed or not (a result is an input through fromJob, which the trust policy judges).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from ..errors import InputError
from ..settings import OBJECT_INPUTS_ENV, ObjectGrant, OperatorSettings
from . import protocol as p

ALLOWLIST_FIX = "ask the cluster admin to add it to the chart's objectInputs"


def checked_grants(settings: OperatorSettings) -> tuple[ObjectGrant, ...]:
    """The allowlist, refused at start (InputError, one line) when malformed or when it lists the
    default result bucket: that bucket holds every namespace's results and refs."""
    grants = settings.object_grants()
    for i, grant in enumerate(grants):
        if grant.bucket == p.DEFAULT_BUCKET:
            raise InputError(f"{OBJECT_INPUTS_ENV}[{i}] lists bucket '{grant.bucket}', memoplane's own result "
                             "bucket (never readable as raw objects)",
                             "remove that entry from the chart's objectInputs: put input objects in another bucket")
    return grants


def plain_key(key: str) -> bool:
    """A key without empty, '.' or '..' segments: the same object in S3 and in a directory store
    (where '..' would climb out of the bucket)."""
    return all(part not in ("", ".", "..") for part in key.split("/"))


def grants_read(grant: ObjectGrant, namespace: str, bucket: str, key: str) -> bool:
    return (grant.namespaces is None or namespace in grant.namespaces) and grant.bucket == bucket \
        and key.startswith(grant.prefix)


def refusal(grants: Iterable[ObjectGrant], namespace: str, bucket: str, key: str,
            result_buckets: Collection[str]) -> str | None:
    """Why `namespace` may not read s3://bucket/key (None: it may). `result_buckets`: the
    buckets memoplane keeps results in (the default one and every ResultCache's)."""
    if bucket in result_buckets:
        return (f"bucket '{bucket}' holds memoplane's results, which are never readable as raw objects: "
                "take a result as input with fromJob, or put the object in another bucket")
    if not plain_key(key):
        return f"key '{key}' has an empty, '.' or '..' segment: name the object by its plain key"
    if not any(grants_read(grant, namespace, bucket, key) for grant in grants):
        return f"bucket '{bucket}' key '{key}' is not in namespace {namespace}'s object allowlist: {ALLOWLIST_FIX}"
    return None
