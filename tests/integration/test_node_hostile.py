"""The hostile suite's attacks (tests/hostile) as ComputeJobs through the agent pod on the real node
(issue 15, step 3): escapes, identity and outputs, each contained as on the host, and neither the
host's secrets nor the agent container's (the store keys in /var/run/secrets/memoplane/store, the
node key, the service-account token) reach a job. After every test the agent pod is the same pod,
never restarted, and runs the next job.

tests/hostile/test_materialize.py is not here: it attacks the agent's writing of a stored tree
into a directory, with no job involved; the pod changes nothing of it."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memoplane.cluster.stores import Stores
from memoplane.sandbox.isolate import JOB_HOST_ID
from memoplane.testing import node_release
from memoplane.testing.node_release import AGENT, Jobs, Release, job, namespace_store, status

pytestmark = pytest.mark.timeout(900)
Obj = dict[str, Any]

LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
RACE = (Path(__file__).parents[1] / "attacks" / "output_race.py").read_text()
STORE_KEYS = "/var/run/secrets/memoplane/store"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
NOT_IN_A_POD = {"cgroup_memory", "cgroup_pids"}  # isolation layers the agent pod cannot have (see below)
NODE_KEY_DIR = "/var/lib/memoplane/node-key"  # the agent container's MEMOPLANE_NODE_KEY_DIR (the chart's)
# What a job tries to read: the value is an exception's name, or what it read.
PROBE = ("import os\ndef main(paths):\n    seen = {}\n    for p in paths:\n        try:\n"
         "            if os.path.isdir(p):\n                seen[p] = 'listed: ' + ' '.join(os.listdir(p))\n"
         "            else:\n                with open(p, 'rb') as f:\n"
         "                    seen[p] = 'read: ' + f.read(65536).decode('utf-8', 'replace')\n"
         "        except OSError as e:\n            seen[p] = type(e).__name__\n    return seen\n")


def _volume(pod: Obj, name: str) -> Obj:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


@pytest.fixture(scope="module")
def agent_secrets(memoplane_on_node: Release) -> dict[str, str]:
    """The agent container's secrets, by where it sees them: the store keys (its Secret), the
    service-account token (read in the container) and the node key files (a host path)."""
    release = memoplane_on_node
    pod = release.wait_ready(AGENT)
    secret_name = _volume(pod, "store-credentials")["secret"]["secretName"]
    data = json.loads(release.kubectl("get", "secret", secret_name, "-o", "json").stdout)["data"]
    # The access key is a name (here MinIO's root user, "memoplane"): only its path is probed.
    found = {f"{STORE_KEYS}/secretKey": base64.b64decode(data["secretKey"]).decode()}
    found[f"{SERVICE_ACCOUNT}/token"] = release.kubectl(
        "exec", pod["metadata"]["name"], "-c", "agent", "--", "cat", f"{SERVICE_ACCOUNT}/token").stdout
    key_dir = Path(_volume(pod, "node-key")["hostPath"]["path"])
    keys = [k for k in key_dir.iterdir() if k.is_file()]
    assert keys, f"the agent made no node key in {key_dir}"
    for key in keys:
        found[f"{NODE_KEY_DIR}/{key.name}"] = key.read_bytes().decode("utf-8", "replace")
    return found


@pytest.fixture
def contained(memoplane_on_node: Release, node_jobs: Jobs, node_ns: str) -> Iterator[str]:
    """The test's namespace; afterwards the agent pod is the same, never restarted, and runs a job."""
    before = memoplane_on_node.wait_ready(AGENT)
    yield node_ns
    after = memoplane_on_node.wait_ready(AGENT)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the agent pod was replaced"
    assert node_release.restarts(after) == node_release.restarts(before), "the agent container restarted"
    node_jobs.apply(node_ns, job("next", "import os\ndef main():\n    return os.getpid()\n", {}))
    s = status(node_jobs.wait(node_ns, "next"))
    assert s["phase"] == "Succeeded" and s["result"]["value"] == 1, s


def _run(jobs: Jobs, ns: str, name: str, source: str, inputs: dict[str, Any] | None = None, **spec: Any) -> Obj:
    jobs.apply(ns, job(name, source, inputs or {}, backoffLimit=0, **spec))
    return status(jobs.wait(ns, name))


def _failed(s: Obj) -> str:
    assert s["phase"] == "Failed", s
    return str(s["failure"]["reason"])


def test_agent_and_host_secrets_are_not_readable(memoplane_on_node: Release, node_jobs: Jobs, contained: str,
                                                 agent_secrets: dict[str, str]) -> None:
    info = memoplane_on_node.info
    host = [str(Path(info.state_dir) / "pki" / "ca.key"), info.kubeconfig, "/etc/shadow", "/root/.kube/config",
            "/proc/1/environ", f"/proc/1/root{STORE_KEYS}/secretKey"]
    in_pod = [*agent_secrets, f"{STORE_KEYS}/accessKey", STORE_KEYS, NODE_KEY_DIR,
              "/var/run/secrets/memoplane/sessions/secret"]
    s = _run(node_jobs, contained, "probe", PROBE, {"paths": [*host, *in_pod]})
    assert s["phase"] == "Succeeded", s
    seen = s["result"]["value"]
    leaked = {p: v[:80] for p, v in seen.items() if not v.endswith("Error")}
    assert leaked == {}, f"a job read what it must not: {leaked}"
    text = json.dumps(s)
    for where, secret in agent_secrets.items():
        assert secret.strip() and secret.strip() not in text, f"{where} came back"


def test_outbound_connections_to_host_listeners_are_unreachable(
        memoplane_on_node: Release, node_jobs: Jobs, contained: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    ports = [listener.getsockname()[1], memoplane_on_node.info.ports.apiserver]
    source = ("import socket\ndef main(ports):\n    out = []\n    for port in ports:\n        try:\n"
              "            socket.create_connection(('127.0.0.1', port), timeout=3)\n"
              "            out.append('connected')\n        except OSError as e:\n"
              "            out.append(str(e))\n    return out\n")
    s = _run(node_jobs, contained, "net", source, {"ports": ports})
    assert s["phase"] == "Succeeded", s
    assert all("unreachable" in r.lower() for r in s["result"]["value"]), s["result"]["value"]
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    listener.close()


@pytest.mark.parametrize("call", [
    "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None)",
    "libc.ptrace(16, os.getppid() or 1, 0, 0)",       # PTRACE_ATTACH
    "libc.syscall(321, 0, 0, 0)",                     # bpf
    "libc.syscall(250, 0, 0, 0, 0, 0)",               # keyctl
    "libc.syscall(428, -100, b'/in', 1)",             # open_tree
])
def test_forbidden_system_calls_fail_the_job(node_jobs: Jobs, contained: str, call: str) -> None:
    s = _run(node_jobs, contained, "syscall", LIBC + f"def main():\n    return {call}\n")
    assert _failed(s) == "forbidden" and "seccomp" in s["failure"]["message"], s


def test_job_is_root_of_a_one_id_namespace_with_no_capabilities(
        node_jobs: Jobs, node_stores: Stores, contained: str) -> None:
    source = ("def main():\n    status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
              "    return [open('/proc/self/uid_map').read().split(), open('/proc/self/gid_map').read().split(),\n"
              "            [status[k].strip() for k in ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs', 'Seccomp')],\n"
              "            sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])]\n")
    s = _run(node_jobs, contained, "identity", source)
    assert s["phase"] == "Succeeded", s
    one_id = ["0", str(JOB_HOST_ID), "1"]
    assert s["result"]["value"] == [one_id, one_id, ["0" * 16, "0" * 16, "0" * 16, "1", "2"], ["lo"]]
    # The job's record: every isolation layer held inside the pod, but the per-job cgroups: the
    # container's /sys/fs/cgroup is read-only (cgroup v1 here), so memory is bounded by rlimits
    # (test_memory_bomb_...) and processes by RLIMIT_NPROC (pids_limit) instead.
    isolation = namespace_store(node_stores, contained).get_result(s["result"]["digest"]).meta["isolation"]
    missing = {layer: held for layer, held in isolation.items() if held is not True}
    assert set(missing) == NOT_IN_A_POD, isolation
    assert isolation["pids_limit"] is True and isolation["unprivileged_uid"] is True, isolation


def test_memory_bomb_fails_the_job_not_the_pod(node_jobs: Jobs, contained: str) -> None:
    source = "def main():\n    xs = []\n    while True:\n        xs.append(bytearray(16 << 20))\n"
    assert _failed(_run(node_jobs, contained, "memory", source, resources={"memory": "256Mi"})) == "memory"


def test_output_race_returns_no_secret_of_the_agent(node_jobs: Jobs, node_stores: Stores, contained: str,
                                                    agent_secrets: dict[str, str]) -> None:
    names = []
    for k in range(12):
        target = "/proc/self" if k % 2 else STORE_KEYS
        names.append(f"race-{k}")
        node_jobs.apply(contained, job(names[-1], RACE, {"target": target, "delay": 0.002 * (k % 6), "hold": "frame"},
                                       backoffLimit=0))
    store = namespace_store(node_stores, contained)
    phases = []
    for name, obj in node_jobs.wait_all(contained, names).items():
        s = status(obj)
        seen = [json.dumps(s)]
        digest = (s.get("result") or {}).get("digest")
        tree = store.get_result(digest).output_tree if digest else None
        if tree is not None:
            for rel, entry in store.get_tree(tree.digest).entries.items():
                assert entry.digest is not None, f"{name}: a link was stored: {rel}"
                seen.append(store.get_bytes(entry.digest).decode("utf-8", "replace"))
        for where, secret in agent_secrets.items():
            assert secret.strip() not in "\n".join(seen), f"{name}: {where} came back"
        assert "MEMOPLANE_S3" not in "\n".join(seen), f"{name}: the agent's environment came back"
        phases.append(s["phase"] if s["phase"] == "Succeeded" else s["failure"]["reason"])
    assert set(phases) <= {"Succeeded", "forbidden"}, phases


def test_set_id_bits_and_links_in_outputs_are_refused(node_jobs: Jobs, contained: str) -> None:
    setid = ("import os, shutil\ndef main():\n    shutil.copy('/usr/bin/true', os.environ['MEMOPLANE_OUT'] + '/t')\n"
             "    os.chmod(os.environ['MEMOPLANE_OUT'] + '/t', 0o6755)\n")
    s = _run(node_jobs, contained, "setid", setid)
    assert _failed(s) == "forbidden" and "set-user/group-id" in s["failure"]["message"], s
    link = (f"import os\ndef main():\n    os.symlink('{STORE_KEYS}/secretKey', os.environ['MEMOPLANE_OUT'] + '/k')\n")
    s = _run(node_jobs, contained, "link", link)
    assert _failed(s) == "forbidden" and "symlink" in s["failure"]["message"], s
