"""Spec -> resolved Job: inputs become content, missing things are waited for then failed."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from memoplane.api.specs import parse_computejob
from memoplane.cluster import protocol as p
from memoplane.cluster.resolve import Failed, LookupError_, Resolved, Waiting, find_cycle, limits_of, resolve
from memoplane.jobs import BlobInput, CommandCode, Input, JsonInput, PythonCode
from memoplane.keys import digest_bytes

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RUNTIME = "b3:" + "ab" * 32


def job(name: str = "featurize", inputs: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "python": {"source": "def main(rows, scale):\n    return sum(rows) * scale\n"},
        "inputs": inputs if inputs is not None else [{"name": "rows", "value": [1, 2, 3]},
                                                     {"name": "scale", "value": 10}],
    }
    body.update(spec)
    return {"apiVersion": p.API_VERSION, "kind": "ComputeJob",
            "metadata": {"name": name, "namespace": "ml", "generation": 1, "uid": f"uid-{name}",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": body}


def succeeded(obj: dict[str, Any], digest: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["status"] = {"phase": "Succeeded", "observedGeneration": 1, "result": {"digest": digest}}
    return obj


class FakeLookups:
    def __init__(self, jobs: Mapping[str, dict[str, Any]] = (), config_maps: Mapping[str, dict[str, Any]] = (),
                 results: Mapping[str, Input] = (), objects: Mapping[tuple[str, str], bytes] = (),
                 seeds: Mapping[str, dict[str, Any]] = (), foreign: Mapping[tuple[str, str], dict[str, Any]] = (),
                 readers: frozenset[str] = frozenset(), refused: Mapping[tuple[str, str], str] = (),
                 blobs: Mapping[str, int] = ()) -> None:
        self.jobs = dict(jobs)
        self.foreign = dict(foreign)   # (namespace, name) -> job of another namespace
        self.readers = readers         # the namespaces whose jobs' caches let this one ("ml") read
        self.refused = dict(refused)
        self.seeds = dict(seeds)
        self.config_maps = dict(config_maps)
        self.results = dict(results)
        self.objects = dict(objects)
        self.blobs = dict(blobs)       # digest -> size of the blobs uploaded for the namespace
        self.stored: list[bytes] = []
        self.blob_reads: list[str] = []

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        return self.jobs.get(name)

    def foreign_job(self, namespace: str, name: str) -> tuple[Mapping[str, Any] | None, str]:
        denied = "" if namespace in self.readers else f"ResultCache {namespace}/default does not list ml"
        return self.foreign.get((namespace, name)), denied

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return self.config_maps.get(name)

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        if result_digest not in self.results:
            raise LookupError_("ResultUnavailable", f"result {result_digest} is damaged")
        return self.results[result_digest]

    def object_refusal(self, bucket: str, key: str) -> str | None:
        return self.refused.get((bucket, key))

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        data = self.objects.get((bucket, key))
        return None if data is None else self.put_bytes(data)

    def put_bytes(self, data: bytes) -> BlobInput:
        self.stored.append(data)
        return BlobInput(digest_bytes(data), len(data))

    def stored_blob(self, digest: str) -> BlobInput | None:
        self.blob_reads.append(digest)
        if digest == "b3:" + "dd" * 32:
            raise LookupError_(p.REASON_STORE, "the store is unreachable")
        return BlobInput(digest, self.blobs[digest]) if digest in self.blobs else None

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.seeds.get(name)

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        if store_url == "s3://gone":
            raise LookupError_(p.REASON_STORE, "the store is unreachable")
        return BlobInput(digest, 10)


def test_values_resolve_to_a_job_with_the_agents_runtime() -> None:
    got = resolve(job(), RUNTIME, FakeLookups(), T0)
    assert isinstance(got, Resolved)
    assert got.job.runtime == RUNTIME
    assert got.job.inputs == {"rows": JsonInput([1, 2, 3]), "scale": JsonInput(10)}
    assert isinstance(got.job.code, PythonCode) and got.job.code.entrypoint == "main"
    assert got.input_digests == {"rows": JsonInput([1, 2, 3]).digest, "scale": JsonInput(10).digest}


def test_key_depends_on_content_not_name() -> None:
    a = resolve(job("a"), RUNTIME, FakeLookups(), T0)
    b = resolve(job("b"), RUNTIME, FakeLookups(), T0)
    assert isinstance(a, Resolved) and isinstance(b, Resolved)
    assert a.job.key == b.job.key
    other_runtime = resolve(job("a"), "b3:" + "cd" * 32, FakeLookups(), T0)
    assert isinstance(other_runtime, Resolved) and other_runtime.job.key != a.job.key


def test_salt_env_and_profile() -> None:
    got = resolve(job(env={"MODE": "fast"}, cache={"version": "7"}, runtime={"profile": "minimal"}),
                  RUNTIME, FakeLookups(), T0)
    assert isinstance(got, Resolved)
    assert (got.job.salt, dict(got.job.env), got.job.profile) == ("7", {"MODE": "fast"}, "minimal")


def test_no_agent_for_the_profile_waits() -> None:
    got = resolve(job(), None, FakeLookups(), T0)
    assert got == Waiting(p.REASON_NO_AGENT, "no live agent serves runtime profile 'python'")


def test_command_job() -> None:
    obj = job(command=["sh", "-c", "echo hi"], inputs=[])
    del obj["spec"]["python"]
    got = resolve(obj, RUNTIME, FakeLookups(), T0)
    assert isinstance(got, Resolved) and got.job.code == CommandCode(("sh", "-c", "echo hi"))


def test_from_job_uses_the_upstream_result_value() -> None:
    down = job("down", [{"name": "raw", "fromJob": {"name": "up"}}])
    up_digest = "b3:" + "11" * 32
    lookups = FakeLookups(jobs={"up": succeeded(job("up"), up_digest)}, results={up_digest: JsonInput(60)})
    got = resolve(down, RUNTIME, lookups, T0)
    assert isinstance(got, Resolved) and got.job.inputs == {"raw": JsonInput(60)}


def test_from_job_waits_while_upstream_runs_and_for_a_stale_status() -> None:
    down = job("down", [{"name": "raw", "fromJob": {"name": "up"}}])
    running = job("up")
    running["status"] = {"phase": "Running", "observedGeneration": 1}
    got = resolve(down, RUNTIME, FakeLookups(jobs={"up": running}), T0)
    assert isinstance(got, Waiting) and got.reason == p.REASON_UPSTREAM and "Running" in got.message
    stale = succeeded(job("up"), "b3:" + "11" * 32)
    stale["metadata"]["generation"] = 2  # spec changed, result is for generation 1
    got = resolve(down, RUNTIME, FakeLookups(jobs={"up": stale}), T0)
    assert isinstance(got, Waiting) and got.reason == p.REASON_UPSTREAM


def test_from_job_fails_when_upstream_failed() -> None:
    down = job("down", [{"name": "raw", "fromJob": {"name": "up"}}])
    up = job("up")
    up["status"] = {"phase": "Failed", "observedGeneration": 1,
                    "failure": {"reason": "exception", "message": "ZeroDivisionError: division by zero"}}
    got = resolve(down, RUNTIME, FakeLookups(jobs={"up": up}), T0)
    assert isinstance(got, Failed) and got.reason == p.REASON_UPSTREAM_FAILED
    assert "ComputeJob 'up' failed (exception): ZeroDivisionError" in got.message


def test_missing_upstream_waits_during_grace_then_fails() -> None:
    down = job("down", [{"name": "raw", "fromJob": {"name": "nope"}}])
    early = resolve(down, RUNTIME, FakeLookups(), T0 + timedelta(seconds=5), grace=60)
    assert isinstance(early, Waiting) and early.reason == p.REASON_NOT_FOUND
    late = resolve(down, RUNTIME, FakeLookups(), T0 + timedelta(seconds=61), grace=60)
    assert isinstance(late, Failed) and "ComputeJob 'nope' does not exist" in late.message


def test_self_reference_and_cycles_fail() -> None:
    me = job("a", [{"name": "x", "fromJob": {"name": "a"}}])
    assert isinstance(resolve(me, RUNTIME, FakeLookups(jobs={"a": me}), T0), Failed)
    a = job("a", [{"name": "x", "fromJob": {"name": "b"}}])
    b = job("b", [{"name": "x", "fromJob": {"name": "a"}}])
    lookups = FakeLookups(jobs={"a": a, "b": b})
    assert find_cycle(a, lookups) == ["a", "b", "a"]
    got = resolve(a, RUNTIME, lookups, T0)
    assert isinstance(got, Failed) and "a -> b -> a" in got.message


def in_namespace(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}


def test_an_upstream_of_another_namespace_is_used_only_when_its_cache_lets_this_one_read() -> None:
    down = job("down", [{"name": "rows", "value": [1]},
                        {"name": "scale", "fromJob": {"name": "up", "namespace": "team-a"}}])
    up = in_namespace(succeeded(job("up"), "b3:" + "cd" * 32), "team-a")
    results: dict[str, Input] = {"b3:" + "cd" * 32: JsonInput(3)}
    denied = resolve(down, RUNTIME, FakeLookups(foreign={("team-a", "up"): up}, results=results), T0)
    assert denied == Waiting(p.REASON_SHARING_DENIED,
                             "spec.inputs[1].fromJob.namespace: ResultCache team-a/default does not list ml")
    granted = resolve(down, RUNTIME, FakeLookups(foreign={("team-a", "up"): up}, results=results,
                                                 readers=frozenset({"team-a"})), T0)
    assert isinstance(granted, Resolved) and granted.job.inputs["scale"] == JsonInput(3)
    missing = resolve(down, RUNTIME, FakeLookups(readers=frozenset({"team-a"})), T0, grace=0)
    assert isinstance(missing, Failed) and "spec.inputs[1].fromJob: ComputeJob 'team-a/up'" in missing.message


def test_a_cycle_through_another_namespace_fails() -> None:
    a = job("a", [{"name": "x", "fromJob": {"name": "b", "namespace": "team-b"}}])
    b = in_namespace(job("b", [{"name": "x", "fromJob": {"name": "a", "namespace": "ml"}}]), "team-b")
    lookups = FakeLookups(jobs={"a": a}, foreign={("team-b", "b"): b}, readers=frozenset({"team-b"}))
    got = resolve(a, RUNTIME, lookups, T0)
    assert isinstance(got, Failed) and "a -> team-b/b -> a" in got.message


def test_damaged_upstream_result_fails_clearly() -> None:
    down = job("down", [{"name": "raw", "fromJob": {"name": "up"}}])
    lookups = FakeLookups(jobs={"up": succeeded(job("up"), "b3:" + "22" * 32)})
    got = resolve(down, RUNTIME, lookups, T0)
    assert isinstance(got, Failed) and "damaged" in got.message


def test_config_map_and_object_are_hashed_into_the_store() -> None:
    obj = job(inputs=[{"name": "settings", "fromConfigMap": {"name": "cfg", "key": "s.json"}},
                      {"name": "table", "fromObject": {"bucket": "data", "key": "t.csv"}}])
    lookups = FakeLookups(config_maps={"cfg": {"data": {"s.json": '{"a": 1}'}}},
                          objects={("data", "t.csv"): b"a,b\n1,2\n"})
    got = resolve(obj, RUNTIME, lookups, T0)
    assert isinstance(got, Resolved)
    assert got.job.inputs["settings"] == BlobInput(digest_bytes(b'{"a": 1}'), 8)
    assert got.job.inputs["table"] == BlobInput(digest_bytes(b"a,b\n1,2\n"), 8)


def test_missing_config_map_key_and_object() -> None:
    obj = job(inputs=[{"name": "settings", "fromConfigMap": {"name": "cfg", "key": "s.json"}}])
    got = resolve(obj, RUNTIME, FakeLookups(config_maps={"cfg": {"data": {}}}), T0 + timedelta(hours=1))
    assert isinstance(got, Failed) and "key 's.json' of ConfigMap 'cfg'" in got.message
    obj = job(inputs=[{"name": "t", "fromObject": {"bucket": "data", "key": "t.csv"}}])
    got = resolve(obj, RUNTIME, FakeLookups(), T0 + timedelta(hours=1))
    assert isinstance(got, Failed) and "s3://data/t.csv" in got.message


def test_a_refused_object_fails_the_job_naming_the_input_and_is_never_read() -> None:
    obj = job(inputs=[{"name": "a", "value": 1}, {"name": "t", "fromObject": {"bucket": "data", "key": "t.csv"}}])
    lookups = FakeLookups(objects={("data", "t.csv"): b"x"}, refused={("data", "t.csv"): "not in the allowlist"})
    got = resolve(obj, RUNTIME, lookups, T0)
    assert isinstance(got, Failed) and got.reason == p.REASON_OBJECT_NOT_ALLOWED
    assert got.message == "spec.inputs[1].fromObject: not in the allowlist" and lookups.stored == []


def test_unsupported_and_invalid() -> None:
    seed = job(inputs=[{"name": "n", "fromSeed": {"name": "field", "count": 10}}])
    got = resolve(seed, RUNTIME, FakeLookups(), T0 + timedelta(hours=1))
    assert isinstance(got, Failed) and got.reason == p.REASON_NOT_FOUND and "GMemSeed 'field'" in got.message
    mapped = job(map={"over": "rows"})
    assert isinstance(resolve(mapped, RUNTIME, FakeLookups(), T0), Failed)
    bad = job()
    bad["spec"]["command"] = ["true"]
    got = resolve(bad, RUNTIME, FakeLookups(), T0)
    assert isinstance(got, Failed) and got.reason == p.REASON_INVALID and "both set" in got.message


def test_limits_from_resources() -> None:
    obj = parse_computejob(job(resources={"timeoutSeconds": 5, "memory": "256Mi", "maxOutputBytes": "1Mi"}))
    limits = limits_of(obj)
    assert (limits.timeout_s, limits.memory_bytes, limits.max_output_bytes) == (5.0, 256 << 20, 1 << 20)


def test_objects_are_not_read_while_another_input_is_awaited() -> None:
    obj = job(inputs=[{"name": "t", "fromObject": {"bucket": "data", "key": "t.csv"}},
                      {"name": "raw", "fromJob": {"name": "up"}}])
    running = job("up")
    running["status"] = {"phase": "Running", "observedGeneration": 1}
    lookups = FakeLookups(jobs={"up": running}, objects={("data", "t.csv"): b"x"})
    got = resolve(obj, RUNTIME, lookups, T0)
    assert isinstance(got, Waiting) and lookups.stored == []
    lookups.jobs["up"] = succeeded(job("up"), "b3:" + "11" * 32)
    lookups.results["b3:" + "11" * 32] = JsonInput(1)
    got = resolve(obj, RUNTIME, lookups, T0)
    assert isinstance(got, Resolved) and list(got.job.inputs) == ["t", "raw"] and lookups.stored == [b"x"]


def test_a_failed_input_wins_over_a_wait() -> None:
    obj = job(inputs=[{"name": "raw", "fromJob": {"name": "up"}},
                      {"name": "n", "fromSeed": {"name": "s", "offset": 2**63, "count": 2**63 + 1}}])
    got = resolve(obj, RUNTIME, FakeLookups(jobs={"up": job("up")}), T0)
    assert isinstance(got, Failed) and got.reason == p.REASON_INVALID and "2^64" in got.message


def test_an_uploaded_blob_is_the_input_with_its_digest_in_the_key() -> None:
    digest = "b3:" + "cc" * 32
    obj = job(inputs=[{"name": "table", "fromBlob": {"digest": digest}, "as": "mmap"}])
    got = resolve(obj, RUNTIME, FakeLookups(blobs={digest: 300}), T0)
    assert isinstance(got, Resolved)
    assert got.job.inputs["table"] == BlobInput(digest, 300, "mmap")
    assert got.job.key_parts().inputs == {"table": "blob-mmap:" + digest}


def test_a_missing_blob_waits_during_grace_then_fails_naming_the_upload() -> None:
    digest = "b3:" + "cc" * 32
    obj = job(inputs=[{"name": "table", "fromBlob": {"digest": digest}}])
    early = resolve(obj, RUNTIME, FakeLookups(), T0)
    assert isinstance(early, Waiting) and early.reason == p.REASON_NOT_FOUND
    late = resolve(obj, RUNTIME, FakeLookups(), T0 + timedelta(hours=1))
    assert isinstance(late, Failed) and late.reason == p.REASON_NOT_FOUND
    assert f"blob {digest}" in late.message and "memoplane submit --input table=@FILE" in late.message
    unreachable = job(inputs=[{"name": "table", "fromBlob": {"digest": "b3:" + "dd" * 32}}])
    got = resolve(unreachable, RUNTIME, FakeLookups(), T0)
    assert isinstance(got, Waiting) and got.reason == p.REASON_STORE and "unreachable" in got.message


def test_blobs_are_not_read_while_another_input_is_awaited() -> None:
    digest = "b3:" + "cc" * 32
    obj = job(inputs=[{"name": "t", "fromBlob": {"digest": digest}}, {"name": "raw", "fromJob": {"name": "up"}}])
    running = job("up")
    running["status"] = {"phase": "Running", "observedGeneration": 1}
    lookups = FakeLookups(jobs={"up": running}, blobs={digest: 3})
    assert isinstance(resolve(obj, RUNTIME, lookups, T0), Waiting) and lookups.blob_reads == []
