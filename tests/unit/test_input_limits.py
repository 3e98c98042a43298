"""Env names and JSON nesting are refused where they enter (CLI, job manifest, SDK, the
operator's resolution, the canonical encoder) with one clear line, never a traceback or a
job killed later. The CRD side of spec.env is in test_api_validation.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from memoplane import memoize
from memoplane.api.common import API_VERSION
from memoplane.canonical import MAX_JSON_DEPTH, canonical_json, check_json_depth, json_depth_exceeds
from memoplane.cas import FilesystemBackend, Store, b3
from memoplane.cas.records import SealError, StoredValue, seal, unseal
from memoplane.cluster import protocol as p
from memoplane.cluster.resolve import Failed, Resolved, resolve
from memoplane.errors import InputError, StoreCorrupted
from memoplane.inputs import ENV_NAME_FIX, env_problem, parse_env, parse_input
from memoplane.jobs import CommandCode, Job, JsonInput, PythonCode, job_from_dict, job_to_dict

TOO_DEEP = f"nests lists/objects more than {MAX_JSON_DEPTH} levels deep — flatten it to at most {MAX_JSON_DEPTH} levels"
RUNTIME = "b3:" + "ab" * 32


def nested(depth: int, leaf: Any = 1) -> Any:
    """`depth` lists around `leaf`: nested(2) == [[1]]."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def memoplane(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOPLANE_STORE": str(tmp_path / "store")}
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- env names and values ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["MODE", "_x", "a.b-c_D9", ".hidden", "-dash", "lower"])
def test_valid_env_names(name: str) -> None:
    assert env_problem(name, "any value = with = signs") is None
    assert parse_env([f"{name}=v=w"]) == {name: "v=w"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("=x", "--env '=x' has no NAME= — write --env NAME=VALUE"),
        ("NOVALUE", "--env 'NOVALUE' has no NAME= — write --env NAME=VALUE"),
        ("1ST=x", f"--env '1ST' is not a valid variable name — {ENV_NAME_FIX}"),
        ("A B=x", f"--env 'A B' is not a valid variable name — {ENV_NAME_FIX}"),
        ("A\0B=x", f"--env 'A\\x00B' is not a valid variable name — {ENV_NAME_FIX}"),
        ("A\n=x", f"--env 'A\\n' is not a valid variable name — {ENV_NAME_FIX}"),
        ("MEMOPLANE_OUT=/tmp", f"--env 'MEMOPLANE_OUT' uses the reserved prefix MEMOPLANE_ — {ENV_NAME_FIX}"),
        ("A=a\0b", "--env the value of A contains a NUL character"
                   " — remove the NUL character (a process environment cannot hold it)"),
    ],
)
def test_bad_env_is_refused_by_the_cli_parser(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_env([text])
    assert str(caught.value) == message


def test_bad_env_is_one_line_from_the_command(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("def main():\n    return 1\n")
    line = one_error_line(memoplane(tmp_path, "run", str(script), "--env", "9LIVES=1"))
    assert line == f"memoplane: --env '9LIVES' is not a valid variable name — {ENV_NAME_FIX}"
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("refs/*"))


def _manifest(**changes: Any) -> dict[str, Any]:
    data = job_to_dict(Job(code=CommandCode(("true",)), env={"MODE": "fast"}, runtime=RUNTIME))
    data.update(changes)
    return data


def test_a_good_job_manifest_round_trips() -> None:
    job = job_from_dict(_manifest())
    assert dict(job.env) == {"MODE": "fast"} and job.code == CommandCode(("true",))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"A=B": "x"}, f"job manifest: env 'A=B' is not a valid variable name — {ENV_NAME_FIX}"),
        ({"": "x"}, f"job manifest: env '' is not a valid variable name — {ENV_NAME_FIX}"),
        ({"A\0": "x"}, f"job manifest: env 'A\\x00' is not a valid variable name — {ENV_NAME_FIX}"),
        ({"MEMOPLANE_IN": "/etc"}, f"job manifest: env 'MEMOPLANE_IN' uses the reserved prefix MEMOPLANE_ — "
                                   f"{ENV_NAME_FIX}"),
        ({"A": "x\0y"}, "job manifest: env the value of A contains a NUL character"
                        " — remove the NUL character (a process environment cannot hold it)"),
        ({"A": 5}, "job manifest: env 'A' is not a string (int)"),
        (["A=1"], "job manifest: env is not an object of strings (list)"),
    ],
)
def test_a_job_manifest_with_bad_env_is_refused_naming_the_key(env: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        job_from_dict(_manifest(env=env))
    assert str(caught.value) == message


# -- JSON nesting: the canonical encoder and the depth check --------------------------------


class Level(IntEnum):
    ONE = 1


def test_depth_check_counts_containers_of_every_kind() -> None:
    assert not json_depth_exceeds(nested(MAX_JSON_DEPTH))
    assert json_depth_exceeds(nested(MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds("scalar") and not json_depth_exceeds([])
    mixed: Any = 0
    for i in range(MAX_JSON_DEPTH + 1):
        mixed = [{"k": mixed}] if i % 3 == 0 else (OrderedDict(k=mixed) if i % 3 == 1 else (mixed,))
    assert json_depth_exceeds(mixed)
    wide = [list(range(1000)), {"a": nested(MAX_JSON_DEPTH - 2)}]  # 100 levels: list, dict, 98 lists
    assert not json_depth_exceeds(wide) and json_depth_exceeds(wide, MAX_JSON_DEPTH - 1)
    with pytest.raises(InputError) as caught:
        check_json_depth(nested(MAX_JSON_DEPTH + 1), "--input rows")
    assert str(caught.value) == f"--input rows {TOO_DEEP}"


@pytest.mark.parametrize("first", [1, Level.ONE], ids=["plain", "subclass-path"])
def test_canonical_json_refuses_too_deep_before_recursing(first: Any) -> None:
    assert canonical_json([first, nested(MAX_JSON_DEPTH - 1)]).startswith(b"[1,[[")
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        with pytest.raises(InputError) as caught:
            canonical_json([first, nested(depth - 1)])
        assert str(caught.value) == f"the value {TOO_DEEP}"


# -- JSON nesting: the CLI -------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 600, 100_000])
def test_a_too_deep_input_is_refused_by_the_parser(depth: int) -> None:
    with pytest.raises(InputError) as caught:
        parse_input("rows=" + "[" * depth + "]" * depth)
    assert str(caught.value) == f"--input rows {TOO_DEEP}"
    assert parse_input("rows=" + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)[1] == nested(MAX_JSON_DEPTH - 1, [])


def test_a_too_deep_input_is_one_line_from_the_command(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("def main(rows):\n    return 1\n")
    line = one_error_line(memoplane(tmp_path, "run", str(script), "--input", "rows=" + "[" * 600 + "]" * 600))
    assert line == f"memoplane: --input rows {TOO_DEEP}"


# -- JSON nesting: the job manifest, the operator's resolution --------------------------------


def test_a_job_manifest_with_a_too_deep_input_is_refused() -> None:
    data = job_to_dict(Job(code=PythonCode("def main(x): return x"), inputs={"x": JsonInput(1)}, runtime=RUNTIME))
    data["inputs"]["x"] = {"json": nested(MAX_JSON_DEPTH + 1)}
    with pytest.raises(ValueError) as caught:
        job_from_dict(data)
    assert str(caught.value) == (f"job manifest: input 'x' nests lists/objects more than {MAX_JSON_DEPTH} levels deep;"
                                 " it was not made by memoplane's resolver")


class NoLookups:
    """Resolution of value-only specs reads nothing; the result lookup serves one value."""

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def result_input(self, result_digest: str, store_url: str | None) -> JsonInput:
        return JsonInput(self.result)

    def get_job(self, name: str) -> dict[str, Any] | None:
        return {"metadata": {"generation": 1},
                "status": {"phase": "Succeeded", "observedGeneration": 1, "result": {"digest": "b3:" + "11" * 32}}}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"resolution of this spec must not call {name}")


def _computejob(inputs: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "ComputeJob",
            "metadata": {"name": "deep", "namespace": "ml", "generation": 1,
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"python": {"source": "def main(x):\n    return x\n"}, "inputs": inputs, **spec}}


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_resolution_refuses_a_too_deep_spec_value() -> None:
    got = resolve(_computejob([{"name": "x", "value": nested(MAX_JSON_DEPTH + 1)}]), RUNTIME, NoLookups(), NOW)
    assert got == Failed(p.REASON_INVALID, f"spec.inputs[0].value: the value nests lists/objects more than "
                                           f"{MAX_JSON_DEPTH} levels deep: flatten it to at most {MAX_JSON_DEPTH} levels"
                                           " — fix the fields named above")
    ok = resolve(_computejob([{"name": "x", "value": nested(MAX_JSON_DEPTH)}]), RUNTIME, NoLookups(), NOW)
    assert isinstance(ok, Resolved) and ok.job.key.startswith("b3:")


def test_resolution_refuses_a_too_deep_upstream_result() -> None:
    spec = _computejob([{"name": "x", "fromJob": {"name": "up"}}])
    got = resolve(spec, RUNTIME, NoLookups(nested(MAX_JSON_DEPTH + 1)), NOW)
    assert got == Failed(p.REASON_INVALID, f"input 'x': the result of ComputeJob 'up' nests lists/objects more than "
                                           f"{MAX_JSON_DEPTH} levels deep: flatten it to at most {MAX_JSON_DEPTH} levels")


def test_resolution_refuses_bad_env() -> None:
    got = resolve(_computejob([], env={"A=B": "1"}), RUNTIME, NoLookups(), NOW)
    assert isinstance(got, Failed) and got.reason == p.REASON_INVALID
    assert got.message == f"spec.env: 'A=B' is not a valid variable name: {ENV_NAME_FIX} — fix the fields named above"


# -- JSON nesting: the SDK and stored values --------------------------------------------------


def test_memoize_refuses_a_too_deep_argument(tmp_path: Path) -> None:
    @memoize(store=tmp_path / "store")
    def identity(x: Any) -> int:
        return 1

    assert identity(nested(MAX_JSON_DEPTH)) == 1
    for depth in (MAX_JSON_DEPTH + 1, 5000):
        with pytest.raises(InputError) as caught:
            identity(nested(depth))
        assert str(caught.value) == (f"test_memoize_refuses_a_too_deep_argument.<locals>.identity(x=...) {TOO_DEEP}")


def test_memoize_return_values_too_deep_for_json(tmp_path: Path) -> None:
    @memoize(store=tmp_path / "store")
    def deep(n: int) -> Any:
        return nested(n)

    @memoize(store=tmp_path / "store", allow_pickle=False)
    def deep_json_only(n: int) -> Any:
        return nested(n)

    assert deep(150) == nested(150) and deep(150) == nested(150)  # pickled, then a hit
    with pytest.raises(InputError) as caught:
        deep(100_000)
    assert str(caught.value) == f"the return value of test_memoize_return_values_too_deep_for_json.<locals>.deep {TOO_DEEP}"
    with pytest.raises(InputError) as caught:
        deep_json_only(MAX_JSON_DEPTH + 1)
    assert str(caught.value) == ("the return value of test_memoize_return_values_too_deep_for_json.<locals>."
                                 f"deep_json_only {TOO_DEEP}")


def test_stored_json_that_memoplane_never_writes_is_refused(tmp_path: Path) -> None:
    store = Store(FilesystemBackend(tmp_path / "store", durability="none"))
    deep = store.put_bytes(("[" * 5000 + "]" * 5000).encode())
    with pytest.raises(StoreCorrupted, match="is not JSON memoplane writes"):
        store.load_value(StoredValue("json", blob=deep))
    assert store.load_value(StoredValue("json", blob=store.put_bytes(canonical_json(nested(3))))) == nested(3)
    with pytest.raises(SealError, match="nests too deeply"):
        unseal(b"[" * 100_000 + b"]" * 100_000 + b"\n" + b3(b"[" * 100_000 + b"]" * 100_000).encode())
    with pytest.raises(InputError, match=r"value\.inline nests lists/objects more than"):
        StoredValue.from_dict({"kind": "json", "inline": nested(MAX_JSON_DEPTH + 1), "blob": None})
    assert unseal(seal({"a": 1})) == {"a": 1}
    store.close()



def test_memoize_reports_other_deep_arguments_the_same_way(tmp_path: Path) -> None:
    @dataclass
    class Node:
        child: Any

    @memoize(store=tmp_path / "store")
    def walk(node: Any) -> int:
        return 1

    chain: Any = None
    for _ in range(5000):  # not lists or dicts: only the fingerprint's own recursion sees the depth
        chain = Node(chain)
    with pytest.raises(InputError) as caught:
        walk(chain)
    assert str(caught.value) == (f"test_memoize_reports_other_deep_arguments_the_same_way.<locals>.walk(node=...) "
                                 f"{TOO_DEEP}")
