"""A shared pool for the hostile suite; every test checks the NEXT job still works."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memoplane.sandbox import (
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxPool,
    SandboxRequest,
)


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(size=2) as p:
        yield p


@pytest.fixture()
def canary() -> Iterator[subprocess.Popen[bytes]]:
    """A host process owned by the same uid: a job must not be able to touch it."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    assert proc.poll() is None, "a hostile job reached a host process"
    proc.kill()  # our own child, by its handle
    proc.wait()


class Runner:
    def __init__(self, pool: SandboxPool, tmp_path: Path) -> None:
        self.pool, self.tmp = pool, tmp_path
        self.count = 0

    def dirs(self) -> tuple[Path, Path]:
        self.count += 1
        i, o = self.tmp / f"in{self.count}", self.tmp / f"out{self.count}"
        i.mkdir()
        o.mkdir()
        return i, o

    def py(self, source: str, inputs: dict[str, Any] | None = None, **limits: Any) -> SandboxOutcome:
        i, o = self.dirs()
        lim = Limits(**{"timeout_s": 10.0, **limits})
        return self.pool.run(SandboxRequest(PythonTask(source, inputs=inputs or {},
                                                       filename="hostile.py"), i, o, limits=lim))

    def next_job_ok(self) -> None:
        out = self.py("import os\ndef main():\n    return sum(range(10)), os.getpid()\n")
        assert out.ok and out.value == [45, 1], out


@pytest.fixture()
def sandbox(pool: SandboxPool, tmp_path: Path) -> Iterator[Runner]:
    r = Runner(pool, tmp_path)
    yield r
    r.next_job_ok()
