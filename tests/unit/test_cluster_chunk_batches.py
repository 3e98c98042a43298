"""spec.map.overChunks on a cluster, the pure half: a parent's spec as a plain job, and "jobs"
batches whose elements are whole job manifests (leaves and combine nodes), run under the keys
the embedded plan derives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from memoplane.chunkmap.plan import combine_job, leaf_job
from memoplane.cluster import mapping as mp
from memoplane.cluster import resolve
from memoplane.jobs import BlobInput, job_to_dict

RUNTIME = "b3:" + "7" * 64
SOURCE = "def main(rows, k):\n    return len(rows) * k\n\ndef combine(a, b):\n    return a + b\n"


def parent() -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "sum", "uid": "u-9", "generation": 1},
            "spec": {"python": {"source": SOURCE, "entrypoint": "main", "combine": "combine"},
                     "map": {"overChunks": "rows"},
                     "inputs": [{"name": "rows", "value": "placeholder"}, {"name": "k", "value": 3}]}}


def resolved(obj: dict[str, Any]) -> resolve.Resolved:
    got = resolve.resolve(obj, RUNTIME, cast(resolve.Lookups, None), datetime.now(UTC))  # values only
    assert isinstance(got, resolve.Resolved), got
    return got


def test_a_chunk_parent_resolves_as_a_plain_job_without_map_or_combine() -> None:
    par = parent()
    assert mp.is_chunk_map(par) and not mp.is_map(par) and mp.chunks_over(par) == "rows"
    spec = mp.chunk_spec(par, keep_over=True)
    assert "map" not in spec and spec["python"] == {"source": SOURCE, "entrypoint": "main"}
    assert spec["inputs"] == par["spec"]["inputs"]
    assert mp.chunk_spec(par, [1])["inputs"][0] == {"name": "rows", "value": [1]}
    assert resolved({**par, "spec": spec}).job.inputs["k"].digest  # a valid job


def test_a_jobs_batch_runs_each_manifest_under_its_own_key() -> None:
    whole = resolved({**parent(), "spec": mp.chunk_spec(parent(), keep_over=True)}).job
    leaf = leaf_job(whole, "rows", BlobInput("b3:" + "1" * 64, 10))
    node = combine_job(whole, "combine", [30, 12])
    jobs = [leaf, node]
    keys = [j.key for j in jobs]
    made = mp.jobs_batch_manifest(parent(), [job_to_dict(j) for j in jobs], keys)
    assert mp.is_batch(made) and mp.batch_keys(made) == keys
    assert made["metadata"]["annotations"][mp.FORM_ANNOTATION] == mp.JOBS_FORM
    assert "map" not in made["spec"] and "combine" not in made["spec"]["python"]
    batch = resolved(made).job           # what the operator and the agent resolve the child to
    ran = mp.jobs_of_batch(made, batch)
    assert [j.key for j in ran] == keys and ran[1].inputs == node.inputs
    assert len(set(keys)) == 2


def test_a_jobs_batch_with_a_malformed_manifest_is_refused() -> None:
    made = mp.jobs_batch_manifest(parent(), [{"v": 1, "python": {}}], ["b3:" + "2" * 64])
    with pytest.raises(ValueError, match="malformed job manifest"):
        mp.jobs_of_batch(made, resolved(made).job)
