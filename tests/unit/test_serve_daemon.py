"""`memoplane run` through a running `memoplane serve` (the local daemon, memoplane.commands.daemon).

Two stores with one keyring: a real serve process for store A; the same CLI runs go through it
(--daemon always) on A and in-process (--daemon never) on B, and print the same thing."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memoplane.commands.daemon import private_dir_problem

_START_DEADLINE = 60.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("daemon")
    (home / "run").mkdir(mode=0o700)
    env = {**os.environ, "MEMOPLANE_KEYS_DIR": str(home / "keys"), "XDG_RUNTIME_DIR": str(home / "run"),
           "MEMOPLANE_SERVE_WARM": "1", "MEMOPLANE_STORE": str(home / "served")}
    env.pop("MEMOPLANE_DAEMON", None)
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline(), (home / "serve.log").read_text()
        sockets = home / "run" / "memoplane"
        deadline = time.monotonic() + _START_DEADLINE
        while not list(sockets.glob("serve-*.sock")):
            assert time.monotonic() < deadline, (home / "serve.log").read_text()
            time.sleep(0.05)
        yield {"home": home, "env": env, "proc": proc, "socket": next(sockets.glob("serve-*.sock"))}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        log.close()


def memoplane(env: dict[str, str], store: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memoplane.cli", *args], env={**env, **extra, "MEMOPLANE_STORE":
                          str(store)}, capture_output=True, text=True, timeout=300)


def normalized(text: str) -> str:
    """Without what differs between any two runs: times and the result's digest (its provenance has them)."""
    text = re.sub(r"in [0-9.]+ ms", "in T ms", text)
    text = re.sub(r"saved [0-9.]+ s", "saved T s", text)
    return re.sub(r"result b3:[0-9a-f]+", "result D", text)


def normalized_json(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert isinstance(value, dict)
    for field in ("duration_ms", "compute_seconds", "compute_seconds_saved", "result_digest"):
        value.pop(field, None)
    return value


def test_runs_print_the_same_through_the_daemon_and_in_process(daemon: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import sys\ndef main(n, blob):\n    print('out', n)\n    print('err', file=sys.stderr)\n"
                      "    if n < 0:\n        raise ValueError('negative')\n    return {'n': n * 2, 'len': len(blob)}\n")
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 1000)
    runs = [  # a miss, its hit, a changed input, a failure, --json of each kind, a command
        [str(script), "-i", "n=3", "-i", f"blob=@{data}"],
        [str(script), "-i", "n=3", "-i", f"blob=@{data}"],
        [str(script), "-i", "n=4", "-i", f"blob=@{data}", "--json"],
        [str(script), "-i", "n=-1", "-i", f"blob=@{data}"],
        [str(script), "-i", "n=-1", "-i", f"blob=@{data}", "--json"],
        ["--json", "--", "sh", "-c", "echo c; ls $MEMOPLANE_IN"],
        ["--", "sh", "-c", "echo bad >&2; exit 3"],
        ["--policy", "Refresh", str(script), "-i", "n=3", "-i", f"blob=@{data}"],
    ]
    served, alone = daemon["env"]["MEMOPLANE_STORE"], daemon["home"] / "alone"
    for argv in runs:
        via = memoplane(daemon["env"], Path(served), "run", "--daemon", "always", *argv)
        embedded = memoplane(daemon["env"], alone, "run", "--daemon", "never", *argv)
        assert via.returncode == embedded.returncode, (argv, via.stderr, embedded.stderr)
        assert normalized(via.stderr) == normalized(embedded.stderr), argv
        if "--json" in argv:
            assert normalized_json(via.stdout) == normalized_json(embedded.stdout), argv
        else:
            assert via.stdout == embedded.stdout, argv
    assert [memoplane(daemon["env"], Path(served), "run", "--daemon", d, *runs[0]).returncode
            for d in ("always", "never", "auto")] == [0, 0, 0]


def test_the_daemon_records_its_runs_as_the_local_teams(daemon: dict[str, Any]) -> None:
    store = Path(daemon["env"]["MEMOPLANE_STORE"])
    ran = memoplane(daemon["env"], store, "run", "--daemon", "auto", "--", "echo", "audited")
    assert ran.returncode == 0, ran.stderr
    deadline = time.monotonic() + _START_DEADLINE
    while True:   # the serve's writer thread appends the record after the answer
        shown = memoplane(daemon["env"], store, "audit", "show", "--team", "local", "--json")
        if "unix:/v1/run" in shown.stdout:
            break
        assert time.monotonic() < deadline, shown.stdout
        time.sleep(0.05)


def test_without_a_daemon_auto_runs_in_process_and_always_says_why(daemon: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"   # a store no serve serves
    assert memoplane(daemon["env"], other, "run", "--", "echo", "hi").stdout == "hi\n"
    refused = memoplane(daemon["env"], other, "run", "--daemon", "always", "--", "echo", "hi")
    assert refused.returncode == 2 and "no memoplane serve answers for this store" in refused.stderr
    assert refused.stderr.count("\n") == 1
    bad = memoplane(daemon["env"], other, "run", "--", "echo", "hi", MEMOPLANE_DAEMON="sometimes")
    assert bad.returncode == 2 and "MEMOPLANE_DAEMON='sometimes' is not one of auto, always, never" in bad.stderr


def test_a_stale_socket_is_ignored(daemon: dict[str, Any], tmp_path: Path) -> None:
    env = {**daemon["env"], "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run" / "memoplane").mkdir(mode=0o700, parents=True)
    stale = tmp_path / "run" / "memoplane" / daemon["socket"].name   # the served store's name, nobody listening
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))
    ran = memoplane(env, Path(daemon["env"]["MEMOPLANE_STORE"]), "run", "--", "echo", "stale")
    assert (ran.returncode, ran.stdout) == (0, "stale\n"), ran.stderr
    refused = memoplane(env, Path(daemon["env"]["MEMOPLANE_STORE"]), "run", "--daemon", "always", "--", "echo", "x")
    assert refused.returncode == 2 and "Connection refused" in refused.stderr


def test_only_a_private_directory_of_this_user_is_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert private_dir_problem(shared) == f"{shared} is open to other users (mode 755, needs 700)"
    shared.chmod(0o700)
    assert private_dir_problem(shared) is None
    assert private_dir_problem(tmp_path / "none") == f"{tmp_path / 'none'} does not exist"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700


def test_the_socket_and_its_directory_are_closed_to_others_and_removed_at_exit(daemon: dict[str, Any]) -> None:
    path: Path = daemon["socket"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert private_dir_problem(path.parent) is None
    daemon["proc"].terminate()
    daemon["proc"].wait(timeout=60)
    assert not path.exists()


def test_a_daemon_that_isolates_less_than_the_run_asks_refuses_it(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "MEMOPLANE_KEYS_DIR": str(tmp_path / "keys"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "MEMOPLANE_SERVE_WARM": "1", "MEMOPLANE_REQUIRE_ISOLATION": "false"}
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "memoplane.cli", "serve", "--port", "0"],
                            env={**env, "MEMOPLANE_STORE": str(store)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
        deadline = time.monotonic() + _START_DEADLINE
        while not list((tmp_path / "run" / "memoplane").glob("serve-*.sock")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = memoplane(env, store, "run", "--daemon", "always", "--", "echo", "hi")
        assert refused.returncode == 2, refused.stderr
        assert "refused the run: the daemon runs without requiring isolation and this run requires it" in refused.stderr
        fallback = memoplane(env, store, "run", "--", "echo", "hi")   # auto: in-process, isolated
        assert (fallback.returncode, fallback.stdout) == (0, "hi\n"), fallback.stderr
        allowed = memoplane(env, store, "run", "--daemon", "always", "--allow-unisolated", "--", "echo", "ho")
        assert (allowed.returncode, allowed.stdout) == (0, "ho\n"), allowed.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
