"""spec.inputs[i].as on the cluster: the resolved job carries the delivery (so the agent's sandbox
hands the code a path or an open file, and the key differs); an upstream that returned JSON has
no file to hand over and the job fails saying so."""

from __future__ import annotations

from test_cluster_resolve import RUNTIME, T0, FakeLookups, job, succeeded

from memoplane.cluster.resolve import Failed, Resolved, resolve
from memoplane.jobs import BlobInput, JsonInput
from memoplane.keys import digest_bytes


def test_file_inputs_resolve_with_their_delivery_and_key() -> None:
    def resolved(delivery: str | None) -> Resolved:
        extra = {} if delivery is None else {"as": delivery}
        obj = job(inputs=[{"name": "table", "fromObject": {"bucket": "data", "key": "t.csv"}, **extra}])
        got = resolve(obj, RUNTIME, FakeLookups(objects={("data", "t.csv"): b"a,b\n"}), T0)
        assert isinstance(got, Resolved)
        return got

    assert resolved("path").job.inputs["table"] == BlobInput(digest_bytes(b"a,b\n"), 4, "path")
    assert resolved("file").job.inputs["table"] == BlobInput(digest_bytes(b"a,b\n"), 4, "file")
    assert resolved("bytes").job.key == resolved(None).job.key
    assert len({resolved(d).job.key for d in ("bytes", "path", "file")}) == 3


def test_as_on_an_upstream_json_result_is_not_supported_yet() -> None:
    digest = "b3:" + "33" * 32
    down = job("down", [{"name": "raw", "fromJob": {"name": "up"}, "as": "path"}])
    lookups = FakeLookups(jobs={"up": succeeded(job("up"), digest)}, results={digest: JsonInput({"n": 1})})
    got = resolve(down, RUNTIME, lookups, T0)
    assert isinstance(got, Failed)
    assert "spec.inputs[0].as: path" in got.message and "not supported yet" in got.message
