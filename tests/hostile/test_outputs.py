"""Attacks on the host side of a job: its output collection and control channel.

The host reads a job's outputs only after every process of the job is gone,
through directory fds that refuse links, from a tmpfs the job cannot grow
past its cap. Each attack here was once a working escape (issue 9)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Runner  # type: ignore[import-not-found]

from memoplane.sandbox import CommandTask, Limits, PythonTask, SandboxOutcome, SandboxRequest

pytestmark = pytest.mark.hostile

SECRET = "HOST-SECRET-7f3a9c"
CANARY_ENV = "MEMOPLANE_TEST_CANARY"
CANARY = "agent-credential-5d1e2b"

# The race of finding 1 (see the file's docstring).
RACE = (Path(__file__).parents[1] / "attacks" / "output_race.py").read_text()


def _reason(out: SandboxOutcome) -> str:
    assert out.failure is not None, out
    return str(out.failure.reason)


def _everything(out: SandboxOutcome, out_dir: Path) -> str:
    """All the host got back from a job: value, logs, failure, collected files."""
    parts = [repr(out.value), out.stdout.decode("utf-8", "replace"), out.stderr.decode("utf-8", "replace"),
             repr(out.failure)]
    for p in sorted(out_dir.rglob("*")):
        assert not p.is_symlink(), f"a link reached the host: {p}"
        if p.is_file():
            parts.append(p.read_text("utf-8", "replace"))
    return "\n".join(parts)


@pytest.fixture()
def secret_dir(tmp_path: Path) -> Path:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    (d / "f0").write_text(SECRET)
    (d / "f0").chmod(0o600)
    return d


@pytest.mark.parametrize("hold", ["frame", "thread"])
def test_output_race_never_reads_host_files(sandbox: Runner, secret_dir: Path, hold: str) -> None:
    outcomes: list[str] = []
    for attempt in range(50):
        i, o = sandbox.dirs()
        out = sandbox.pool.run(SandboxRequest(
            PythonTask(RACE, inputs={"target": str(secret_dir), "delay": 0.002 * (attempt % 10), "hold": hold},
                       filename="race.py"), i, o, limits=Limits(timeout_s=20)))
        seen = _everything(out, o)
        assert SECRET not in seen, f"attempt {attempt}: a host file came back: {out}"
        outcomes.append("ok" if out.ok else out.failure.reason)  # type: ignore[union-attr]
    # The swap happened before collection in every run: a link in the outputs fails the job.
    assert set(outcomes) <= {"forbidden", "ok"}, outcomes
    assert "forbidden" in outcomes, outcomes


def test_output_race_through_proc_self_never_reads_agent_memory(
        sandbox: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CANARY_ENV, CANARY)  # the host process's own environment
    for attempt in range(50):
        i, o = sandbox.dirs()
        out = sandbox.pool.run(SandboxRequest(
            PythonTask(RACE, inputs={"target": "/proc/self", "delay": 0.002 * (attempt % 10), "hold": "frame"},
                       filename="race.py"), i, o, limits=Limits(timeout_s=20)))
        assert CANARY not in _everything(out, o), f"attempt {attempt}: the host's environment came back"


def test_outputs_are_read_only_after_every_process_is_gone(sandbox: Runner) -> None:
    # A forged result frame, then more frames and files: the first result is taken,
    # the job is killed there, and nothing written afterwards is collected.
    source = ("import json, os, struct, time\n"
              "def frame(h, p=b''):\n    b = json.dumps(h).encode()\n"
              "    return struct.pack('!II', len(b), len(p)) + b + p\n"
              "def main():\n    out = os.environ['MEMOPLANE_OUT']\n"
              "    open(out + '/before', 'w').write('before')\n"
              "    os.write(1000, frame({'op': 'result', 'ok': True, 'kind': 'json'}, b'1'))\n"
              "    os.write(1000, frame({'op': 'result', 'ok': True, 'kind': 'json'}, b'2'))\n"
              "    time.sleep(0.2)\n    open(out + '/after', 'w').write('after')\n"
              "    time.sleep(5)\n    return 3\n")
    i, o = sandbox.dirs()
    out = sandbox.pool.run(SandboxRequest(PythonTask(source), i, o, limits=Limits(timeout_s=20)))
    assert out.ok and out.value == 1, out
    assert sorted(p.name for p in o.iterdir()) == ["before"]


def test_command_outputs_include_background_writers(sandbox: Runner) -> None:
    i, o = sandbox.dirs()
    script = "(sleep 0.3; echo late > $MEMOPLANE_OUT/late) & echo early > $MEMOPLANE_OUT/early"
    out = sandbox.pool.run(SandboxRequest(CommandTask(("sh", "-c", script)), i, o, limits=Limits(timeout_s=20)))
    assert out.ok, out
    assert (o / "early").read_text() == "early\n" and (o / "late").read_text() == "late\n"


def test_a_lingering_background_process_times_the_command_out(sandbox: Runner) -> None:
    i, o = sandbox.dirs()
    out = sandbox.pool.run(SandboxRequest(CommandTask(("sh", "-c", "sleep 60 & true")), i, o,
                                          limits=Limits(timeout_s=1)))
    assert not out.ok and out.failure.reason == "timeout", out  # type: ignore[union-attr]


def test_output_links_are_refused_and_nothing_is_written_through_them(sandbox: Runner, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    source = ("import os\ndef main(victim):\n    out = os.environ['MEMOPLANE_OUT']\n"
              "    os.symlink(victim, out + '/return.json')\n    os.symlink('/', out + '/root')\n"
              "    open(out + '/plain', 'w').write('x')\n")
    out = sandbox.py(source, {"victim": str(victim)})
    assert _reason(out) == "forbidden" and "symlink" in out.failure.message  # type: ignore[union-attr]
    assert victim.read_text() == "original"


def test_output_cap_holds_while_the_job_writes(sandbox: Runner) -> None:
    # Finding 3: the cap used to be checked after the job, when the disk was full.
    cap = 8 << 20
    source = ("import os\ndef main():\n    written = 0\n    block = b'x' * (1 << 20)\n"
              "    try:\n        with open(os.environ['MEMOPLANE_OUT'] + '/big', 'wb') as f:\n"
              "            for _ in range(256):\n                f.write(block)\n                f.flush()\n"
              "                written += len(block)\n"
              "    except OSError as e:\n        return [written, e.errno]\n    return [written, 0]\n")
    i, o = sandbox.dirs()
    host_sizes: list[int] = []
    done = threading.Event()

    def watch() -> None:  # what lands in the host's out dir while the job runs
        while not done.is_set():
            host_sizes.append(sum(p.stat().st_size for p in o.rglob("*") if p.is_file()))
            done.wait(0.01)

    t = threading.Thread(target=watch)
    t.start()
    try:
        out = sandbox.pool.run(SandboxRequest(PythonTask(source), i, o,
                                              limits=Limits(timeout_s=20, max_output_bytes=cap)))
    finally:
        done.set()
        t.join()
    assert _reason(out) == "output-too-large", out
    assert max(host_sizes) == 0, "outputs reached the host's disk while the job ran"
    assert list(o.iterdir()) == []


def test_written_bytes_stop_at_the_cap(sandbox: Runner) -> None:
    cap = 8 << 20
    source = ("import errno, os\ndef main():\n    written = 0\n    block = b'x' * (1 << 20)\n"
              "    try:\n        with open('/out/big', 'wb') as f:\n"
              "            for _ in range(256):\n                f.write(block)\n                f.flush()\n"
              "                written += len(block)\n"
              "    except OSError as e:\n        os.unlink('/out/big')\n        return [written, e.errno == errno.ENOSPC]\n"
              "    return [written, False]\n")
    out = sandbox.py(source, max_output_bytes=cap)
    assert out.ok, out
    written, enospc = out.value
    assert enospc and written <= cap + (1 << 20), out.value


def test_deep_output_tree_fails_the_job_not_the_host(sandbox: Runner) -> None:
    source = ("import os\ndef main():\n    os.chdir(os.environ['MEMOPLANE_OUT'])\n"
              "    for _ in range(1200):\n        os.mkdir('d')\n        os.chdir('d')\n"
              "    open('leaf', 'w').write('x')\n")
    out = sandbox.py(source)
    assert _reason(out) == "forbidden" and "levels deep" in out.failure.message  # type: ignore[union-attr]


@pytest.mark.parametrize("depth", [500, 990, 5000])
def test_deeply_nested_return_value_fails_the_job(sandbox: Runner, depth: int) -> None:
    source = f"def main():\n    v = 1\n    for _ in range({depth}):\n        v = [v]\n    return v\n"
    out = sandbox.py(source)
    assert _reason(out) == "unserializable" and "deep" in out.failure.message, out  # type: ignore[union-attr]


def test_deep_value_forged_on_the_channel_fails_the_job(sandbox: Runner) -> None:
    source = ("import json, os, struct, time\ndef main():\n    p = b'[' * 900 + b']' * 900\n"
              "    b = json.dumps({'op': 'result', 'ok': True, 'kind': 'json'}).encode()\n"
              "    os.write(1000, struct.pack('!II', len(b), len(p)) + b + p)\n    time.sleep(5)\n")
    out = sandbox.py(source)
    assert _reason(out) == "unserializable", out


def test_non_utf8_output_name_is_refused_clearly(sandbox: Runner) -> None:
    out = sandbox.py("import os\ndef main():\n    open(os.environ['MEMOPLANE_OUT'].encode() + b'/bad\\xff', 'w').close()\n")
    assert _reason(out) == "forbidden" and "UTF-8" in out.failure.message  # type: ignore[union-attr]


def test_output_named_like_the_return_value_is_refused(sandbox: Runner) -> None:
    out = sandbox.py("import os\ndef main():\n    open(os.environ['MEMOPLANE_OUT'] + '/return.json', 'w').write('{}')\n"
                     "    return {'a': 1}\n")
    assert _reason(out) == "forbidden" and "return.json" in out.failure.message  # type: ignore[union-attr]


def test_fifos_and_sockets_in_outputs_are_refused(sandbox: Runner) -> None:
    out = sandbox.py("import os\ndef main():\n    os.mkfifo(os.environ['MEMOPLANE_OUT'] + '/pipe')\n")
    assert _reason(out) == "forbidden" and "FIFO" in out.failure.message  # type: ignore[union-attr]


def test_large_return_value_and_files_round_trip(sandbox: Runner) -> None:
    source = ("import os\ndef main():\n    os.makedirs('/out/a/b')\n    open('/out/a/b/f', 'wb').write(b'y' * 3000000)\n"
              "    os.chmod('/out/a/b/f', 0o700)\n    return 'z' * 2000000\n")
    i, o = sandbox.dirs()
    out = sandbox.pool.run(SandboxRequest(PythonTask(source), i, o, limits=Limits(timeout_s=20)))
    assert out.ok and out.value == "z" * 2000000, out.failure
    f = o / "a" / "b" / "f"
    assert f.read_bytes() == b"y" * 3000000
    assert f.stat().st_mode & 0o7777 == 0o755  # the exec bit kept, modes the host's
    assert sorted(p.name for p in o.iterdir()) == ["a"]  # the return value is not an output


def test_jobs_do_not_see_each_others_sockets(sandbox: Runner) -> None:
    # Each job has its own network namespace: another job's abstract names and TCP
    # listeners are neither listed (/proc/net) nor reachable nor squattable.
    listener = ("import os, socket, time\ndef main(name):\n    u = socket.socket(socket.AF_UNIX)\n"
                "    u.bind('\\0' + name)\n    u.listen(1)\n"
                "    start = time.monotonic_ns()\n    time.sleep(2)\n    return [start, time.monotonic_ns()]\n")
    prober = ("import socket, time\ndef main(name):\n    seen, errors, times = [], set(), []\n"
              "    end = time.monotonic() + 4\n    while time.monotonic() < end:\n"
              "        times.append(time.monotonic_ns())\n"
              "        seen.append(name in open('/proc/net/unix').read())\n"
              "        c = socket.socket(socket.AF_UNIX)\n"
              "        try:\n            c.connect('\\0' + name)\n            errors.add('connected')\n"
              "        except OSError as e:\n            errors.add(type(e).__name__)\n"
              "        c.close()\n        time.sleep(0.01)\n"
              "    s = socket.socket(socket.AF_UNIX)\n    s.bind('\\0' + name)\n"
              "    return [times, any(seen), sorted(errors)]\n")
    name = f"memoplane-test-{os.getpid()}-{id(sandbox):x}"
    got: dict[str, Any] = {}

    def run(which: str, src: str) -> None:
        i, o = sandbox.dirs()
        got[which] = sandbox.pool.run(SandboxRequest(PythonTask(src, inputs={"name": name}), i, o,
                                                     limits=Limits(timeout_s=20)))

    threads = [threading.Thread(target=run, args=("listener", listener)),
               threading.Thread(target=run, args=("prober", prober))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lis, pro = got["listener"], got["prober"]
    assert lis.ok and pro.ok, (lis, pro)
    start, end = lis.value
    times, listed, errors = pro.value
    assert any(start <= t <= end for t in times), "the two jobs did not overlap"
    assert not listed and errors == ["ConnectionRefusedError"], pro.value
