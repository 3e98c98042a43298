"""The runner's reading of entrypoint signatures agrees with inspect's."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from memoplane.sandbox.runner import _inspect_signature, _signature


def _all(x: int, y: int = 1, *args: int, z: int, w: int = 2, **kw: int) -> None: ...
def _posonly(p: int, /, q: int, r: int = 3) -> None: ...
def _none() -> None: ...
def _kwonly(*, k: int) -> None: ...
def _varargs(x: int, *rest: int) -> None: ...


class _CallableObject:
    def __call__(self, u: int, v: int = 1) -> None: ...


@functools.wraps(_all)
def _wrapped(*a: Any, **k: Any) -> None: ...


@pytest.mark.parametrize("fn", [_all, _posonly, _none, _kwonly, _varargs, _CallableObject(),
                                functools.partial(_all, 1), _wrapped, lambda a, b=2: a])
def test_fast_signature_matches_inspect(fn: Callable[..., Any]) -> None:
    assert _signature(fn) == _inspect_signature(fn)


def test_signature_parts() -> None:
    assert _signature(_all) == (["x", "y", "args", "z", "w", "kw"], ["x", "y", "z", "w"],
                                ["x", "z"], True)
    assert _signature(_posonly) == (["p", "q", "r"], ["q", "r"], ["q"], False)


def test_set_environ_replaces_both_views() -> None:
    import os
    import subprocess

    from memoplane.sandbox.runner import _set_environ

    saved = dict(os.environ)
    try:
        _set_environ({"PATH": "/usr/bin:/bin", "ONLY": "this"})
        assert dict(os.environ) == {"PATH": "/usr/bin:/bin", "ONLY": "this"}
        shown = dict(line.split("=", 1) for line in subprocess.run(
            ["env"], capture_output=True, text=True, check=True).stdout.splitlines())
        assert shown["ONLY"] == "this"  # C's environ too, which a child process inherits
        assert not {k for k in saved if k not in ("PATH", "ONLY")} & set(shown)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_reseed_writes_the_same_state_numpy_would(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import numpy as np
    import numpy.random  # reseed only touches generators already imported

    from memoplane.sandbox import runner

    saved = np.random.get_state()
    try:
        # The zygote's way: numpy's API (no cached gauss left), and where the state lives.
        # Nothing in the zygote draws from the global generator after this.
        runner.reseed()
        assert runner._NP_MT, "numpy's MT19937 layout is not the one reseed() writes"
        key = bytes(range(256)) * 9 + bytes(range(192))  # 2496 bytes, not from the kernel
        monkeypatch.setattr(runner.os, "urandom", lambda n: key[:n])
        runner.reseed()  # a child's way: straight into the C state
        monkeypatch.setattr(runner.os, "urandom", os.urandom)
        ref = np.random.RandomState()
        ref.set_state(("MT19937", np.frombuffer(key, np.uint32), 624, 0, 0.0))
        got = np.random.get_state()
        assert bytes(np.asarray(got[1], np.uint32)) == key and got[2] == 624
        assert np.random.random(5).tolist() == ref.random(5).tolist()
        assert np.random.standard_normal(3).tolist() == ref.standard_normal(3).tolist()
    finally:
        np.random.set_state(saved)
