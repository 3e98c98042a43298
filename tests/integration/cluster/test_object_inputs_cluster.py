"""fromObject reads only the cluster's allowlist (the stack's: every namespace may read
s3://mpt-inputs/open/...), with the operator's credentials: an allowed object is an input,
anything else fails the job with the input's field and whom to ask, and memoplane's own
result bucket (another namespace's refs) is never readable. Real API server, MinIO, operator
and agents.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
from conftest import INPUTS_BUCKET, OPEN_PREFIX

from memoplane.api.specs import computejob_manifest
from memoplane.cluster import protocol as p

pytestmark = pytest.mark.integration
Stack = Any  # conftest.Stack (fixture `stack`)

ECHO = "def main(t):\n    return t.decode()\n"


def object_job(name: str, bucket: str, key: str) -> dict[str, Any]:
    return computejob_manifest(name, None, {"python": {"source": ECHO, "entrypoint": "main"},
                                            "inputs": [{"name": "t", "fromObject": {"bucket": bucket, "key": key}}],
                                            "cache": {"version": uuid.uuid4().hex}})


def put_object(stack: Stack, key: str, data: bytes) -> None:
    client = stack.stores.client()
    if not client.bucket_exists(INPUTS_BUCKET):
        client.make_bucket(INPUTS_BUCKET)
    client.put_object(INPUTS_BUCKET, key, io.BytesIO(data), len(data))


def failure(obj: dict[str, Any]) -> tuple[str, str]:
    status = obj.get("status") or {}
    assert status.get("phase") == p.FAILED, status
    failed = status.get("failure") or {}
    return str(failed.get("reason") or status.get("reason")), str(failed.get("message") or status.get("message"))


def test_an_allowed_object_is_read_and_others_are_refused_naming_the_input(stack: Stack, ns: str) -> None:
    put_object(stack, OPEN_PREFIX + "t.txt", b"open data")
    put_object(stack, "closed/t.txt", b"closed data")
    stack.apply(ns, object_job("allowed", INPUTS_BUCKET, OPEN_PREFIX + "t.txt"),
                object_job("outside", INPUTS_BUCKET, "closed/t.txt"))
    done = stack.wait_all(ns, ["allowed", "outside"])
    assert (done["allowed"].get("status") or {}).get("result", {}).get("value") == "open data"
    reason, message = failure(done["outside"])
    assert reason == p.REASON_OBJECT_NOT_ALLOWED
    assert message == (f"spec.inputs[0].fromObject: bucket '{INPUTS_BUCKET}' key 'closed/t.txt' is not in namespace "
                       f"{ns}'s object allowlist: ask the cluster admin to add it to the chart's objectInputs")
    assert "closed data" not in str(done["outside"])


def test_another_namespaces_ref_in_memoplanes_bucket_is_refused(stack: Stack, ns: str) -> None:
    victim = ns + "-a"
    stack.kube.ensure_namespace(victim)
    try:
        stack.apply(victim, computejob_manifest("secret", None, {
            "python": {"source": "def main():\n    return 'confidential'\n", "entrypoint": "main"},
            "cache": {"version": uuid.uuid4().hex}}))
        assert (stack.wait(victim, "secret").get("status") or {}).get("phase") == p.SUCCEEDED
        keys = [o.object_name for o in stack.stores.client().list_objects(
            p.DEFAULT_BUCKET, prefix=p.default_store_prefix(victim), recursive=True)]
        ref = next(k for k in keys if "/refs/" in k)
        stack.apply(ns, object_job("steal", p.DEFAULT_BUCKET, ref))
        reason, message = failure(stack.wait(ns, "steal"))
        assert reason == p.REASON_OBJECT_NOT_ALLOWED
        assert message.startswith(f"spec.inputs[0].fromObject: bucket '{p.DEFAULT_BUCKET}' holds memoplane's results, "
                                  "which are never readable as raw objects")
    finally:
        stack.kube.core.delete_namespace(victim)
