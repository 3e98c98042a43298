"""Every benchmark prints its JSON object as its last line (DESIGN §9): whoever reads its
output takes the last line. So main() ends with emit(), and nothing runs after main()."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _is_call_to(node: ast.stmt, name: str) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == name)


def test_there_are_benchmarks() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_emit_is_the_last_thing_a_benchmark_does(script: Path) -> None:
    tree = ast.parse(script.read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{script.name}: no main()"
    assert _is_call_to(mains[0].body[-1], "emit"), f"{script.name}: main() does not end with emit(...)"
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(guards) == 1, f"{script.name}: no `if __name__ == \"__main__\":`"
    assert _is_call_to(guards[0].body[-1], "main"), (
        f"{script.name}: the __main__ block runs something after main(), after the JSON line")
