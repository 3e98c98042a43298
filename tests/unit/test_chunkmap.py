"""spec.map.overChunks core: record-aligned content-defined chunks, a content-shaped combine tree,
and the memoized evaluation (a leaf per chunk, a combine per node)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from memoplane.chunkmap import build_tree, record_chunks, run_over_chunks
from memoplane.chunkmap.plan import Role, over_blob
from memoplane.errors import InputError
from memoplane.jobs import BlobInput, Job, JsonInput, PythonCode
from memoplane.keys import digest_bytes

TARGET = 2048

SOURCE = '''
def main(rows, scale):
    total = count = 0
    for line in rows.decode().splitlines():
        if line and line[0].isdigit():
            total += int(line.split(",")[1]) * scale
            count += 1
    return {"sum": total, "count": count}


def combine(a, b):
    return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}
'''


def table(rows: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    lines = ["id,value,label"] + [f"{i},{rnd.randrange(1000)},{'x' * rnd.randrange(40)}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def chunk_digests(data: bytes) -> list[str]:
    return [digest_bytes(data[o:o + n]) for o, n in record_chunks(data, TARGET)]


def test_chunks_cover_the_input_and_never_split_a_row() -> None:
    data = table(5000)
    spans = record_chunks(data, TARGET)
    assert len(spans) > 20
    assert b"".join(data[o:o + n] for o, n in spans) == data
    assert all(data[o + n - 1:o + n] == b"\n" for o, n in spans)
    assert all(TARGET // 2 <= n for _, n in spans[:-1])


def test_input_without_newlines_is_one_chunk_and_empty_input_one_empty_chunk() -> None:
    blob = bytes(range(256)).replace(b"\n", b"") * 200
    assert record_chunks(blob, TARGET) == [(0, len(blob))]
    assert record_chunks(b"", TARGET) == [(0, 0)]


def test_an_edit_in_the_middle_changes_only_nearby_chunks() -> None:
    data = table(20000)
    middle = data.index(b"\n10000,") + 1
    end = data.index(b"\n", middle)
    edited = data[:middle] + b"10000,999999,edited" + data[end:]
    before, after = chunk_digests(data), chunk_digests(edited)
    changed = set(after) - set(before)
    assert 1 <= len(changed) <= 2, (len(changed), len(after))
    assert len(after) - len(changed) == len(set(after) & set(before))


def test_an_append_changes_only_the_tail_chunks_and_a_path_of_combine_nodes() -> None:
    data = table(20000)
    appended = data + table(300, seed=7).split(b"\n", 1)[1]
    before, after = chunk_digests(data), chunk_digests(appended)
    assert after[:len(before) - 1] == before[:-1]
    old, new = build_tree(before), build_tree(after)
    old_inner = {n.id for n in old.walk() if n.children}
    new_inner = [n for n in new.walk() if n.children]
    fresh = [n for n in new_inner if n.id not in old_inner]
    assert len(fresh) <= 3 * (new.level + 1), (len(fresh), len(new_inner))
    assert len(fresh) < len(new_inner) / 4


def test_an_insertion_changes_o_log_n_combine_nodes_not_everything_to_its_right() -> None:
    ids = [digest_bytes(str(i).encode()) for i in range(2000)]
    inserted = [*ids[:500], digest_bytes(b"new"), *ids[500:]]
    old, new = build_tree(ids), build_tree(inserted)
    old_inner = {n.id for n in old.walk() if n.children}
    fresh = [n for n in new.walk() if n.children and n.id not in old_inner]
    assert new.level <= 12
    assert len(fresh) <= 3 * (new.level + 1), (len(fresh), new.level)


def test_every_group_has_two_children_and_one_leaf_is_its_own_root() -> None:
    ids = [digest_bytes(str(i).encode()) for i in range(300)]
    root = build_tree(ids)
    assert all(len(n.children) >= 2 for n in root.walk() if n.children)
    assert [n.id for n in root.walk() if not n.children] == ids
    assert build_tree(ids[:1]).id == ids[0]
    with pytest.raises(ValueError):
        build_tree([])


class InProcess:
    """Runs a node's job in this process (the real sandbox runs are in test_cli_chunks), memoized by key."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.results: dict[str, Any] = {}
        self.runs: dict[Role, int] = {"leaf": 0, "combine": 0}

    def put(self, data: bytes) -> BlobInput:
        digest = digest_bytes(data)
        self.blobs[digest] = bytes(data)
        return BlobInput(digest, len(data))

    def run(self, job: Job, role: Role) -> tuple[Any, bool]:
        if job.key in self.results:
            return self.results[job.key], True
        assert isinstance(job.code, PythonCode)
        scope: dict[str, Any] = {}
        exec(compile(job.code.source, job.code.filename, "exec"), scope)  # noqa: S102 - the test's own code
        kwargs = {name: self.blobs[v.digest] if isinstance(v, BlobInput) else v.value  # type: ignore[union-attr]
                  for name, v in job.inputs.items()}
        self.results[job.key] = value = scope[job.code.entrypoint](**kwargs)
        self.runs[role] += 1
        return value, False


def job_over(data: bytes, runner: InProcess) -> Job:
    return Job(code=PythonCode(SOURCE), inputs={"rows": runner.put(data), "scale": JsonInput(2)})


def unsplit(data: bytes) -> dict[str, int]:
    scope: dict[str, Any] = {}
    exec(SOURCE, scope)  # noqa: S102 - the test's own code
    result: dict[str, int] = scope["main"](data, 2)
    return result


def test_the_combined_result_equals_the_unsplit_computation_and_a_rerun_is_all_hits() -> None:
    data, runner = table(8000), InProcess()
    report = run_over_chunks(job_over(data, runner), "rows", "combine", data, runner.put, runner.run, TARGET)
    assert report.value == unsplit(data) and report.value["count"] == 8000
    assert report.leaf_runs == report.leaves == report.chunks > 10
    assert report.combine_runs == report.combines >= report.chunks // 16
    again = run_over_chunks(job_over(data, runner), "rows", "combine", data, runner.put, runner.run, TARGET)
    assert (again.value, again.leaf_runs, again.combine_runs) == (report.value, 0, 0)


def test_an_edited_row_reruns_one_leaf_and_a_path_of_combines() -> None:
    data, runner = table(20000), InProcess()
    cold = run_over_chunks(job_over(data, runner), "rows", "combine", data, runner.put, runner.run, TARGET)
    edited = data.replace(b"\n12345,", b"\n12345,1", 1)
    warm = run_over_chunks(job_over(edited, runner), "rows", "combine", edited, runner.put, runner.run, TARGET)
    assert warm.value == unsplit(edited) != cold.value
    assert 1 <= warm.leaf_runs <= 2
    assert 1 <= warm.combine_runs <= 2 * (warm.depth + 1) < cold.combines / 4


def test_a_command_or_a_json_over_input_is_refused_with_the_fix() -> None:
    runner = InProcess()
    with pytest.raises(InputError, match="combine"):
        run_over_chunks(job_over(b"1,2\n", runner), "rows", "not a name", b"1,2\n", runner.put, runner.run)
    with pytest.raises(InputError, match="'merge' is not defined at the top level"):
        run_over_chunks(job_over(b"1,2\n", runner), "rows", "merge", b"1,2\n", runner.put, runner.run)
    job = Job(code=PythonCode(SOURCE), inputs={"rows": JsonInput([1]), "scale": JsonInput(1)})
    with pytest.raises(InputError, match="--input rows=@FILE"):
        over_blob(job, "rows")



def test_layers_run_in_parallel_give_the_same_result_and_counts() -> None:
    data = table(8000)
    sequential, parallel = InProcess(), InProcess()
    one = run_over_chunks(job_over(data, sequential), "rows", "combine", data, sequential.put, sequential.run,
                          TARGET)
    four = run_over_chunks(job_over(data, parallel), "rows", "combine", data, parallel.put, parallel.run,
                           TARGET, workers=4)
    assert one == four and sequential.runs == parallel.runs
