"""The history queries over a small DAG with two versions of an upstream: history, lineage
(exact versions), stale, explain; and `diff` between two real embedded runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import history_record

from memoplane.cas import open_store
from memoplane.cas.digests import object_name
from memoplane.embedded import run_job
from memoplane.errors import InputError, NotFound
from memoplane.history import InputRecord, RunRecord
from memoplane.history.index import HistoryIndex
from memoplane.history.queries import diff, explain, history, json_changes, lineage, stale, start_runs
from memoplane.jobs import Job, JsonInput, PythonCode
from memoplane.keys import digest_value
from memoplane.sandbox import SandboxPool
from memoplane.trust.local import Keyring

S = 1_000_000_000


def _from(name: str, producer: RunRecord, *, by_run: bool = True) -> InputRecord:
    assert producer.result is not None
    return InputRecord(name, "b3:v-" + producer.result, 10, "fromJob", producer.job.label, producer.result,
                       producer.run_id if by_run else None)


def _components(rows: int) -> dict[str, object]:
    return {"v": 1, "code": "b3:c", "entrypoint": "main", "runtime": "b3:rt", "salt": "",
            "inputs": {"rows": f"json:{digest_value(rows)}"}, "env": {}}


@pytest.fixture
def dag() -> dict[str, RunRecord]:
    """download (rows 1000, then 10) -> normalize -> report; report v1 names its input by digest only."""
    d1 = history_record("ml/download", 1 * S, "b3:d1", (InputRecord("rows", digest_value(1000)),),
                        components=_components(1000))
    n1 = history_record("ml/normalize", 2 * S, "b3:n1", (_from("raw", d1),))
    p1 = history_record("ml/report", 3 * S, "b3:p1", (_from("table", n1, by_run=False),))
    d2 = history_record("ml/download", 4 * S, "b3:d2", (InputRecord("rows", digest_value(10)),),
                        components=_components(10))
    n2 = history_record("ml/normalize", 5 * S, "b3:n2", (_from("raw", d2),))
    p2 = history_record("ml/report", 6 * S, "b3:p2", (_from("table", n2),))
    d3 = history_record("ml/download", 7 * S, "b3:d2", (InputRecord("rows", digest_value(10)),),
                        components=_components(10), cached=True)
    return {"d1": d1, "n1": n1, "p1": p1, "d2": d2, "n2": n2, "p2": p2, "d3": d3}


@pytest.fixture
def index(dag: dict[str, RunRecord]) -> HistoryIndex:
    index = HistoryIndex(":memory:")
    index.add(dag.values())
    return index


def test_history_lists_every_version_newest_first_with_why_it_changed(index: HistoryIndex,
                                                                      dag: dict[str, RunRecord]) -> None:
    log = history(index, "ml/download")
    assert [e.run_id for e in log.entries] == [dag["d3"].run_id, dag["d2"].run_id, dag["d1"].run_id]
    assert log.entries[2].why == ["first recorded run"]
    assert len(log.entries[1].why) == 1 and log.entries[1].why[0].startswith("inputs.rows changed")
    assert log.entries[0].why == [] and log.entries[0].cached
    with pytest.raises(NotFound, match="ml/download"):
        history(index, "ml/dowload")


def test_lineage_down_from_the_first_result_names_the_first_runs_not_the_later_ones(
        index: HistoryIndex, dag: dict[str, RunRecord]) -> None:
    down = lineage(index, start_runs(index, "b3:d1"), "down")
    assert {n.run.run_id: n.depth for n in down.nodes} == {dag["d1"].run_id: 0, dag["n1"].run_id: 1,
                                                          dag["p1"].run_id: 2}
    assert {(e.producer, e.consumer, e.name) for e in down.edges} == {
        (dag["d1"].run_id, dag["n1"].run_id, "raw"), (dag["n1"].run_id, dag["p1"].run_id, "table")}
    assert not down.truncated
    one = lineage(index, start_runs(index, dag["d1"].run_id), "down", depth=1)
    assert [n.run.run_id for n in one.nodes] == [dag["d1"].run_id, dag["n1"].run_id] and one.truncated


def test_lineage_up_from_a_job_starts_at_its_newest_run_and_follows_exact_producers(
        index: HistoryIndex, dag: dict[str, RunRecord]) -> None:
    up = lineage(index, start_runs(index, "ml/report"), "up")
    assert [n.run.run_id for n in up.nodes] == [dag["p2"].run_id, dag["n2"].run_id, dag["d2"].run_id]
    by_digest = lineage(index, start_runs(index, dag["p1"].run_id), "up")
    assert [n.run.run_id for n in by_digest.nodes] == [dag["p1"].run_id, dag["n1"].run_id, dag["d1"].run_id]
    with pytest.raises(NotFound):
        start_runs(index, "b3:nothing")
    with pytest.raises(InputError):
        lineage(index, [], "up", depth=-1)


def test_stale_names_the_newest_runs_an_input_would_change_and_everything_downstream(
        index: HistoryIndex, dag: dict[str, RunRecord]) -> None:
    report = stale(index, "rows", digest_value(5))   # d3 was served d2's result: d2's consumers count
    assert [(r.job, r.run_id) for r in report.runs] == [
        ("ml/download", dag["d3"].run_id), ("ml/normalize", dag["n2"].run_id), ("ml/report", dag["p2"].run_id)]
    report = stale(index, "rows", digest_value(10))
    assert report.runs == []


def test_stale_follows_the_result_of_the_newest_computed_run(dag: dict[str, RunRecord]) -> None:
    index = HistoryIndex(":memory:")
    index.add(r for name, r in dag.items() if name != "d3")
    report = stale(index, "rows", digest_value(5))
    assert [(r.job, r.because) for r in report.runs] == [
        ("ml/download", "input rows differs"), ("ml/normalize", "downstream of ml/download"),
        ("ml/report", "downstream of ml/normalize")]
    assert stale(index, "rows", digest_value(5), job="ml/other").runs == []


def test_explain_compares_the_newest_run_with_the_one_before(index: HistoryIndex,
                                                            dag: dict[str, RunRecord]) -> None:
    served = explain(index, "ml/download")
    assert served.cached and served.changes == [] and served.previous_run == dag["d2"].run_id
    index.forget([dag["d3"].run_id])
    missed = explain(index, "ml/download")
    assert not missed.cached and missed.changes[0].startswith("inputs.rows changed")


def test_json_changes_name_the_paths_that_differ() -> None:
    out: list = []
    json_changes("$", {"n": 1000, "stats": {"mean": 1.5, "tags": ["a", "b"]}, "same": 1},
                 {"n": 10, "stats": {"mean": 1.5, "tags": ["a"]}, "same": 1, "new key": True}, out)
    assert [(c.what, c.before, c.after) for c in out] == [
        ("$.n", 1000, 10), ('$["new key"]', None, True), ("$.stats.tags[1]", "b", None)]


def test_diff_of_two_embedded_runs_shows_code_lines_inputs_and_output_paths_and_files(tmp_path: Path) -> None:
    code = "def main(rows):\n    {write}\n    return {{'n': len(rows), 'kind': 'table'}}\n"
    write = "open('/out/{name}', 'w').write(str(len(rows)))"
    first = Job(PythonCode(code.format(write=write.format(name="a.txt"))), {"rows": JsonInput([1, 2, 3])})
    second = Job(PythonCode(code.format(write=write.format(name="a.txt")).replace("'table'", "'sheet'")),
                 {"rows": JsonInput([1])})
    keyring = Keyring(tmp_path / "keys")
    with open_store(tmp_path / "store") as store, SandboxPool(profile="python", size=0,
                                                              require_isolation=False) as pool:
        runs = [run_job(job, store, lambda: pool, identity="t", trust=keyring.policy(), signer=keyring.signer())
                for job in (first, second)]
        index = HistoryIndex(":memory:")
        index.sync(store)
        result = diff(index, store, runs[0].run_id, runs[1].run_id)
        assert "-    return {'n': len(rows), 'kind': 'table'}" in result.code
        assert "+    return {'n': len(rows), 'kind': 'sheet'}" in result.code
        assert [c.what for c in result.inputs] == ["rows"] and result.inputs[0].before["size"] == 7
        assert [(c.what, c.before, c.after) for c in result.value] == [("$.kind", "table", "sheet"), ("$.n", 3, 1)]
        assert [c.what for c in result.files] == ["a.txt"]
        assert result.env == [] and result.runtime == [] and result.notes == []
        same = diff(index, store, runs[0].run_id, runs[0].run_id)
        assert same.same
        code_blob = index.record(runs[0].run_id).code_blob  # type: ignore[union-attr]
        store.backend.delete(object_name("blobs", code_blob or ""))
        assert any("not kept" in n for n in diff(index, store, runs[0].run_id, runs[1].run_id).notes)
