"""`memoplane run SCRIPT --over-chunks NAME --combine FUNC`: every leaf and combine node runs in the
real sandbox; an edit reruns the chunks it touches and a path of combines, the rest are hits."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import pytest
from test_cli import memoplane

from memoplane.cas import open_store
from memoplane.chunkmap import record_chunks
from memoplane.commands.chunks import task_bytes
from memoplane.errors import InputError
from memoplane.inputs import parse_bytes
from memoplane.settings import CHUNK_TASK_BYTES, CHUNK_TASK_BYTES_ENV

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sum_column.py"  # the README's example
SCRIPT = EXAMPLE.read_text()
CHUNK = "4Ki"


def table(rows: int) -> list[str]:
    rnd = random.Random(3)
    return [f"{i},{rnd.randrange(1000)},{'y' * rnd.randrange(30)}\n" for i in range(rows)]


def expected(lines: list[str]) -> dict[str, int]:
    values = [int(line.split(",")[1]) for line in lines]
    return {"sum": sum(values), "count": len(values)}


def run_chunks(tmp_path: Path, lines: list[str]) -> dict[str, Any]:
    script, data = tmp_path / "sum.py", tmp_path / "table.csv"
    script.write_text(SCRIPT)
    data.write_text("id,value,label\n" + "".join(lines))
    proc = memoplane(tmp_path / "store", "run", "--json", str(script), "--over-chunks", "rows", "--combine",
                     "combine", "--input", f"rows=@{data}", "--input", "column=1", "--chunk-bytes", CHUNK)
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_a_cold_run_equals_the_unsplit_sum_and_an_edit_reruns_a_leaf_and_a_path(tmp_path: Path) -> None:
    lines = table(20000)
    cold = run_chunks(tmp_path, lines)
    assert cold["result"] == expected(lines)
    stats = cold["chunks"]
    assert stats["leaf_runs"] == stats["leaves"] == stats["chunks"] >= 16
    assert stats["combine_runs"] == stats["combines"] >= 2
    with open_store(tmp_path / "store") as store:  # one run record per node
        assert len(list(store.run_record_ids())) == stats["leaves"] + stats["combines"]

    # A leaf is an ordinary job: the plain run of its chunk as a file is a hit.
    data = (tmp_path / "table.csv").read_bytes()
    offset, length = record_chunks(data, parse_bytes(CHUNK, "chunk"))[1]
    (tmp_path / "chunk.csv").write_bytes(data[offset:offset + length])
    plain = json.loads(memoplane(tmp_path / "store", "run", "--json", str(tmp_path / "sum.py"), "--input",
                                 f"rows=@{tmp_path / 'chunk.csv'}", "--input", "column=1").stdout)
    assert plain["cached"] is True

    again = run_chunks(tmp_path, lines)["chunks"]
    assert (again["leaf_runs"], again["combine_runs"], again["root"]) == (0, 0, stats["root"])

    lines[10000] = "10000,999999,edited\n"
    edited = run_chunks(tmp_path, lines)
    assert edited["result"] == expected(lines)
    assert 1 <= edited["chunks"]["leaf_runs"] <= 2
    assert 1 <= edited["chunks"]["combine_runs"] <= 2 * edited["chunks"]["depth"] < stats["combines"] / 2


def test_an_append_reruns_only_the_tail(tmp_path: Path) -> None:
    lines = table(20000)
    cold = run_chunks(tmp_path, lines)["chunks"]
    appended = run_chunks(tmp_path, lines + table(50))
    assert appended["result"] == expected(lines + table(50))
    assert appended["chunks"]["leaf_runs"] <= 2
    assert appended["chunks"]["combine_runs"] <= 2 * appended["chunks"]["depth"] < cold["combines"] / 2


def test_flags_that_do_not_fit_are_refused_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "sum.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store"
    no_combine = memoplane(store, "run", str(script), "--over-chunks", "rows", "--input", "rows=[1]", check=False)
    assert no_combine.returncode == 2 and "--over-chunks needs --combine" in no_combine.stderr
    not_a_file = memoplane(store, "run", str(script), "--over-chunks", "rows", "--combine", "combine",
                           "--input", "rows=[1]", "--input", "column=1", check=False)
    assert not_a_file.returncode == 2 and "--input rows=@FILE" in not_a_file.stderr
    assert len(not_a_file.stderr.strip().splitlines()) == 1


def test_the_chunk_size_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHUNK_TASK_BYTES_ENV, raising=False)
    assert task_bytes(argparse.Namespace(chunk_bytes=None)) == CHUNK_TASK_BYTES
    monkeypatch.setenv(CHUNK_TASK_BYTES_ENV, "1Mi")
    assert task_bytes(argparse.Namespace(chunk_bytes=None)) == 1 << 20
    assert task_bytes(argparse.Namespace(chunk_bytes="64Ki")) == 64 << 10
    with pytest.raises(InputError, match="--chunk-bytes"):
        task_bytes(argparse.Namespace(chunk_bytes="lots"))
