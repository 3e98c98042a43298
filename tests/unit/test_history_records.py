"""Run records: the model's round trip and refusals, and embedded runs appending one record each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memoplane.cas import open_store
from memoplane.embedded import run_job
from memoplane.history import InputRecord, JobIdentity, RunRecord, new_run_id
from memoplane.jobs import Job, JsonInput, PythonCode
from memoplane.sandbox import SandboxPool
from memoplane.trust.local import Keyring


def _record() -> RunRecord:
    return RunRecord(new_run_id(), JobIdentity("ns", "a", "uid-1", 2), "b3:k", "b3:r",
                     (InputRecord("rows", "b3:i", 3, "fromJob", "ns/up", "b3:up", new_run_id()),),
                     "b3:c", "b3:rt", {"MODE": "fast"}, "node-a", "node-a-1", 1.0, 2.5, False, 1.5)


def test_a_record_round_trips_through_its_json() -> None:
    record = _record()
    assert RunRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("edit", [
    lambda raw: raw.update(v=99),
    lambda raw: raw.update(runId="../../refs/x"),
    lambda raw: raw.update(env={"A": 1}),
    lambda raw: raw.update(cached="yes"),
    lambda raw: raw["inputs"][0].update(size="3"),
    lambda raw: raw.pop("job"),
])
def test_a_malformed_record_is_refused_with_value_error(edit: object) -> None:
    raw = json.loads(_record().to_json())
    edit(raw)  # type: ignore[operator]
    with pytest.raises(ValueError):
        RunRecord.from_dict(raw)


def test_every_embedded_run_appends_one_record_computed_then_served(tmp_path: Path) -> None:
    job = Job(PythonCode("def main(n):\n    return n * 2\n"), {"n": JsonInput(21)})
    keyring = Keyring(tmp_path / "keys")
    with open_store(str(tmp_path / "store")) as store, SandboxPool(profile="python", size=0,
                                                                    require_isolation=False) as pool:
        first = run_job(job, store, lambda: pool, identity="double", trust=keyring.policy(),
                        signer=keyring.signer())
        second = run_job(job, store, lambda: pool, identity="double", trust=keyring.policy(),
                         signer=keyring.signer())
        ids = list(store.run_record_ids())
        assert ids == sorted([first.run_id, second.run_id])
        computed = RunRecord.from_json(store.run_record(first.run_id) or b"")
        served = RunRecord.from_json(store.run_record(second.run_id) or b"")
    assert (computed.cached, served.cached) == (False, True)
    assert computed.result == served.result == first.result_digest
    assert computed.key == first.cache_key and computed.job == JobIdentity("", "double")
    assert computed.inputs[0].name == "n" and computed.inputs[0].digest == JsonInput(21).digest
    assert computed.signer == keyring.signer().keyid and served.signer == keyring.signer().keyid
    assert computed.code_blob is not None and computed.runtime_blob is not None
