"""The sandbox's contract: values, inputs, failures, env, outputs, commands, pool."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memoplane.errors import IsolationUnavailable
from memoplane.sandbox import (
    REQUIRED,
    CommandTask,
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxPool,
    SandboxRequest,
    probe_isolation,
    run_once,
)


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    os.environ["MEMOPLANE_TEST_SECRET"] = "hunter2"  # must not reach any job
    try:
        with SandboxPool(size=2) as p:
            yield p
    finally:
        os.environ.pop("MEMOPLANE_TEST_SECRET", None)


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    i, o = tmp_path / "in", tmp_path / "out"
    i.mkdir(exist_ok=True)
    o.mkdir(exist_ok=True)
    return i, o


def py(pool: SandboxPool, tmp_path: Path, source: str, inputs: dict[str, Any] | None = None,
       **kw: Any) -> SandboxOutcome:
    i, o = _dirs(tmp_path)
    limits = kw.pop("limits", Limits(timeout_s=20))
    task = PythonTask(source, inputs=inputs or {}, filename="job.py", **kw)
    return pool.run(SandboxRequest(task, i, o, limits=limits))


def test_json_return_and_stdout(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main(rows, scale):\n    print('rows', rows)\n"
             "    return {'total': sum(rows) * scale}\n", {"rows": [1, 2, 3], "scale": 10})
    assert out.ok, out.failure
    assert (out.value, out.value_kind) == ({"total": 60}, "json")
    assert out.stdout == b"rows [1, 2, 3]\n"


def test_bytes_and_none_returns(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main():\n    return b'\\x00\\xff'\n")
    assert (out.value, out.value_kind) == (b"\x00\xff", "bytes")
    out = py(pool, tmp_path, "def main():\n    pass\n")
    assert out.ok and out.value_kind == "none"


def test_array_return_is_saved_as_file(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "import numpy as np\ndef main(n):\n    return np.arange(n) * 2\n",
             {"n": 5})
    assert out.ok and out.value_kind == "file"
    assert np.load(tmp_path / "out" / "return.npy").tolist() == [0, 2, 4, 6, 8]


def test_big_return_value_travels_through_a_file(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main():\n    return bytes(range(256)) * 20000\n")
    assert out.ok and out.value == bytes(range(256)) * 20000
    assert not any((tmp_path / "out").iterdir())  # the transfer file is removed


def test_file_inputs(pool: SandboxPool, tmp_path: Path) -> None:
    i, _ = _dirs(tmp_path)
    (i / "raw.bin").write_bytes(b"abc")
    np.save(i / "arr.npy", np.array([1.5, 2.5]))
    out = py(pool, tmp_path, "def main(raw, arr):\n    return [raw.decode(), arr.sum().item()]\n",
             file_inputs={"raw": "raw.bin", "arr": "arr.npy"})
    assert out.value == ["abc", 4.0], out.failure


def test_exception_has_user_traceback(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def helper(x):\n    return 1 / x\n\ndef main(x):\n    return helper(x)\n",
             {"x": 0})
    assert not out.ok and out.failure is not None
    assert out.failure.reason == "exception"
    assert "ZeroDivisionError" in out.failure.message and "job.py:2" in out.failure.message
    assert 'File "job.py", line 5, in main' in out.failure.detail
    assert 'File "job.py", line 2, in helper' in out.failure.detail
    assert "return 1 / x" in out.failure.detail
    assert "memoplane" not in out.failure.detail  # our frames are cut


def test_syntax_error(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main(:\n    pass\n")
    assert out.failure is not None and out.failure.reason == "syntax"
    assert "job.py:1" in out.failure.message


def test_unknown_and_missing_inputs(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main(rows, scale=1):\n    return 0\n", {"rows": [], "scael": 2})
    assert out.failure is not None and out.failure.reason == "bad-input"
    assert "'scael'" in out.failure.message and "main(rows, scale)" in out.failure.message
    out = py(pool, tmp_path, "def main(rows):\n    return 0\n", {})
    assert out.failure is not None and out.failure.reason == "bad-input"
    assert "'rows'" in out.failure.message


def test_missing_entrypoint_and_unserializable(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def other():\n    pass\n")
    assert out.failure is not None and out.failure.reason == "no-entrypoint"
    out = py(pool, tmp_path, "def main():\n    return object()\n")
    assert out.failure is not None and out.failure.reason == "unserializable"


def test_timeout(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main():\n    while True:\n        pass\n",
             limits=Limits(timeout_s=1))
    assert out.failure is not None and out.failure.reason == "timeout"


def test_a_job_is_stopped_when_its_stop_fd_turns_readable(pool: SandboxPool, tmp_path: Path) -> None:
    """How a long-lived job (an API session) is ended by its owner before its timeout."""
    i, o = _dirs(tmp_path)
    stop_r, stop_w = os.pipe()
    try:
        threading.Timer(0.5, os.write, (stop_w, b"x")).start()
        task = PythonTask("import time\ndef main():\n    time.sleep(600)\n")
        out = pool.run(SandboxRequest(task, i, o, limits=Limits(timeout_s=600)), stop_fd=stop_r)
    finally:
        os.close(stop_r)
        os.close(stop_w)
    assert out.failure is not None and out.failure.reason == "timeout"
    assert "stopped by its owner" in out.failure.message


def test_env_is_clean_and_has_in_out(pool: SandboxPool, tmp_path: Path) -> None:
    i, o = _dirs(tmp_path)
    src = "import os\ndef main():\n    return dict(os.environ)\n"
    out = pool.run(SandboxRequest(PythonTask(src), i, o, env={"MODE": "fast"}))
    env = out.value
    assert env["MODE"] == "fast"
    assert env["MEMOPLANE_IN"] == "/in" and env["MEMOPLANE_OUT"] == "/out"
    assert "MEMOPLANE_TEST_SECRET" not in env
    assert "hunter2" not in repr(env)


def test_env_is_exactly_the_jobs_in_python_and_c(pool: SandboxPool, tmp_path: Path) -> None:
    # A warm child installs the base environment before it has work; the
    # request only changes what differs. Nothing of the zygote's may remain.
    i, o = _dirs(tmp_path)
    src = ("import ctypes, os, subprocess\ndef main():\n"
           "    libc = ctypes.CDLL(None)\n    libc.getenv.restype = ctypes.c_char_p\n"
           "    c = {k: (libc.getenv(k.encode()) or b'').decode() for k in\n"
           "         ('PATH', 'LANG', 'MODE', 'PYTHONPATH', 'OPENBLAS_NUM_THREADS')}\n"
           "    shown = subprocess.run(['env'], capture_output=True, text=True).stdout\n"
           "    return [dict(os.environ), c, sorted(shown.split())]\n")
    env = {"MODE": "fast", "LANG": "C", "PATH": "/usr/bin:/bin"}
    out = pool.run(SandboxRequest(PythonTask(src), i, o, env=env))
    assert out.ok, out.failure
    py_env, c_env, shown = out.value
    assert set(py_env) == {"PATH", "HOME", "TMPDIR", "LANG", "MEMOPLANE_IN", "MEMOPLANE_OUT", "MODE"}
    assert {k: py_env[k] for k in env} == env
    assert c_env == {**env, "PYTHONPATH": "", "OPENBLAS_NUM_THREADS": ""}
    assert shown == sorted(f"{k}={v}" for k, v in py_env.items())


def test_outputs_dir_and_inputs_read_only(pool: SandboxPool, tmp_path: Path) -> None:
    i, o = _dirs(tmp_path)
    (i / "rows.txt").write_text("1\n2\n")
    src = ("import os\ndef main():\n    data = open(os.environ['MEMOPLANE_IN'] + '/rows.txt').read()\n"
           "    os.makedirs(os.environ['MEMOPLANE_OUT'] + '/sub')\n"
           "    open(os.environ['MEMOPLANE_OUT'] + '/sub/n.txt', 'w').write(str(len(data.split())))\n"
           "    open('scratch.txt', 'w').write('work dir is writable')\n")
    out = pool.run(SandboxRequest(PythonTask(src), i, o))
    assert out.ok, out.failure
    assert (o / "sub" / "n.txt").read_text() == "2"
    assert not (i / "scratch.txt").exists()


def test_output_size_cap(pool: SandboxPool, tmp_path: Path) -> None:
    src = ("import os\ndef main():\n    for k in range(4):\n"
           "        open(os.environ['MEMOPLANE_OUT'] + f'/f{k}', 'wb').write(b'x' * 400_000)\n")
    out = py(pool, tmp_path, src, limits=Limits(max_output_bytes=1_000_000))
    assert out.failure is not None and out.failure.reason == "output-too-large"


def test_symlink_in_outputs_is_refused(pool: SandboxPool, tmp_path: Path) -> None:
    src = "import os\ndef main():\n    os.symlink('/etc/passwd', os.environ['MEMOPLANE_OUT'] + '/p')\n"
    out = py(pool, tmp_path, src)
    assert out.failure is not None and out.failure.reason == "forbidden"


def test_command_jobs(pool: SandboxPool, tmp_path: Path) -> None:
    i, o = _dirs(tmp_path)
    (i / "rows").write_text("a\nb\nc\n")
    cmd = CommandTask(("sh", "-c", "wc -l < $MEMOPLANE_IN/rows > $MEMOPLANE_OUT/count; echo $MODE"))
    out = pool.run(SandboxRequest(cmd, i, o, env={"MODE": "x"}))
    assert out.ok and out.exit_code == 0, out
    assert (o / "count").read_text().strip() == "3" and out.stdout == b"x\n"
    out = pool.run(SandboxRequest(CommandTask(("sh", "-c", "echo oops >&2; exit 3")), i, o))
    assert out.failure is not None and out.failure.reason == "exit" and out.exit_code == 3
    assert "oops" in out.failure.detail
    out = pool.run(SandboxRequest(CommandTask(("no-such-program-xyz",)), i, o))
    assert out.failure is not None and "no-such-program-xyz" in out.failure.message


def test_isolation_is_recorded(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "def main():\n    return 1\n")
    for key in (*REQUIRED, "no_new_privs", "caps_dropped", "fresh_proc", "workdir_tmpfs", "landlock_scope",
                "rlimit_as", "closed_fds", "timeout"):
        assert out.isolation.get(key) is True, key


def test_random_generators_are_reseeded(pool: SandboxPool, tmp_path: Path) -> None:
    src = "import random\nimport numpy as np\ndef main():\n    return [random.random(), np.random.rand()]\n"
    a = py(pool, tmp_path, src).value
    b = py(pool, tmp_path, src).value
    assert a[0] != b[0] and a[1] != b[1]


def test_concurrent_runs(pool: SandboxPool, tmp_path: Path) -> None:
    results: dict[int, Any] = {}

    def one(k: int) -> None:
        d = tmp_path / f"j{k}"
        d.mkdir()
        results[k] = py(pool, d, "def main(k):\n    return k * k\n", {"k": k}).value

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: k * k for k in range(8)}


def test_sys_exit_is_reported(pool: SandboxPool, tmp_path: Path) -> None:
    out = py(pool, tmp_path, "import sys\ndef main():\n    sys.exit(4)\n")
    assert out.failure is not None and out.failure.reason == "exit" and out.exit_code == 4


def test_probe_and_run_once(tmp_path: Path) -> None:
    probe = probe_isolation()
    assert all(probe[k] is True for k in REQUIRED), probe
    i, o = _dirs(tmp_path)
    out = run_once(SandboxRequest(PythonTask("def main():\n    return 'x'\n"), i, o))
    assert out.value == "x"


def test_missing_primitive_refuses_or_is_recorded(tmp_path: Path) -> None:
    with pytest.raises(IsolationUnavailable, match="userns"):
        SandboxPool(size=0, _disable=("userns",))
    with SandboxPool(size=0, require_isolation=False, _disable=("seccomp",)) as p:
        assert p.isolation["seccomp"] == "disabled by configuration"
        out = py(p, tmp_path, "def main():\n    return 1\n")
        assert out.ok and out.isolation["seccomp"] is False and out.isolation["userns"] is True
