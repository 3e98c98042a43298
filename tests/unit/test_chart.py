"""charts/memoplane, offline: lint, render, validate every object, check the security posture.

`helm lint --strict` and `helm template` run with the helm that hack/cluster builds
(memoplane.testing.build). Every rendered object is validated without network:
built-in kinds against the Kubernetes JSON schemas that kubernetes-validate ships (strict:
unknown fields are errors), CRDs against apiextensions.k8s.io/v1, our custom resources
against the openAPIV3Schema of our CRDs. The ServiceMonitor (Prometheus Operator) has no
schema here; its shape is checked by hand. Installing into a real API server is
tests/integration/test_helm.py.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from memoplane.testing import build

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "memoplane"
KUBE_VERSION = "1.36"   # hack/versions.env's kube-apiserver; kubernetes-validate ships its schemas
NAMESPACE = "memoplane-system"
AGENT_CAPS = {"SYS_ADMIN", "SYS_PTRACE", "SETUID", "SETGID", "MKNOD"}

_LIMITS = ('{"creations_per_minute": 6, "creation_burst": 2, "concurrent_sandboxes": 3, "executions_per_minute": 60,'
           ' "execution_burst": 5, "concurrent_executions": 4}')
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "external-s3": ["--set", "objectStore.minio.enabled=false",
                    "--set", "objectStore.external.endpoint=https://s3.example.com",
                    "--set", "objectStore.external.existingSecret=s3-keys"],
    "external-s3-inline-keys": ["--set", "objectStore.minio.enabled=false",
                                "--set", "objectStore.external.endpoint=http://minio.storage:9000",
                                "--set", "objectStore.external.accessKey=AK",
                                "--set", "objectStore.external.secretKey=SK"],
    "monitoring": ["--set", "metrics.serviceMonitor.enabled=true",
                   "--set", "metrics.grafanaDashboard.enabled=true"],
    "hostpath-cache-no-crds": ["--set", "agent.localCache.type=hostPath", "--set", "crds.install=false",
                               "--set", "defaultResultCache.namespaces={ml,research}",
                               "--set", "image.digest=sha256:" + "a" * 64],
    "privileged-agent": ["--set", "agent.privileged=true", "--set", "rbac.aggregateToDefaultRoles=false"],
    "api": ["--set", "api.enabled=true", "--set", "api.apiKeys.existingSecret=memoplane-api-keys",
            "--set", "api.runNamespaces={ml,research}",
            "--set-json", 'api.tiers={"gold": {"key": ' + _LIMITS + ', "team": ' + _LIMITS + '}}'],
    "host-network-node": ["--set", "hostNetwork=true", "--set", "apiServer.host=127.0.0.1",
                          "--set", "apiServer.port=6443", "--set", "image.pullPolicy=Never",
                          "--set", "api.enabled=true", "--set", "api.apiKeys.existingSecret=k"],
    "object-inputs": ["--set-json", 'objectInputs=[{"namespaces":["ml"],"bucket":"datasets","prefix":"tables/"},'
                                    '{"namespaces":"*","bucket":"public-data","prefix":""}]'],
}


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return build.ensure_binary("helm")
    except build.BuildError as exc:
        pytest.fail(f"helm is needed for the chart tests and could not be built: {exc}", pytrace=False)


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "mp", str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} found"
    return found[0]


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def crd_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(helm: Path, variant: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VARIANTS[variant])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_validate_offline(helm: Path, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    ours = crd_schemas()
    assert docs
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group == "memoplane.io":
            errors = [e.message for e in OAS30Validator(ours[doc["kind"]]).iter_errors(doc)]
            assert not errors, f"{what}: {errors}"
        elif group == "monitoring.coreos.com":
            assert doc["kind"] == "ServiceMonitor"
            assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["endpoints"]
            assert all(set(e) <= {"port", "path", "interval"} for e in doc["spec"]["endpoints"])
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_default_objects(helm: Path) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 4
    for kind in ("Deployment", "DaemonSet", "StatefulSet", "ResultCache"):
        assert kinds.count(kind) == 1, kind
    assert kinds.count("Secret") == 2  # the store keys and the agents' signing key
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert {"mp-memoplane-operator-metrics", "mp-memoplane-agent-metrics", "mp-memoplane-minio"} <= services
    assert "ServiceMonitor" not in kinds


def test_crds_are_the_generated_ones_kept_on_uninstall(helm: Path) -> None:
    docs = [d for d in render(helm) if d["kind"] == "CustomResourceDefinition"]
    source = {yaml.safe_load(p.read_text())["metadata"]["name"]: yaml.safe_load(p.read_text())
              for p in (ROOT / "crds").glob("*.yaml")}
    assert {d["metadata"]["name"] for d in docs} == set(source)
    for doc in docs:
        meta = doc["metadata"]
        assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert meta["labels"]["app.kubernetes.io/part-of"] == "memoplane"
        assert {**doc, "metadata": {"name": meta["name"]}} == source[meta["name"]]
    docs = [d for d in render(helm, "--set", "crds.keep=false") if d["kind"] == "CustomResourceDefinition"]
    assert all("annotations" not in d["metadata"] for d in docs)


def test_operator_is_one_recreated_replica_with_restricted_security(helm: Path) -> None:
    dep = find(render(helm), "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert_restricted(pod)
    (c,) = pod["containers"]
    assert c["args"] == ["operator"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["MEMOPLANE_METRICS_PORT"]) == ports["metrics"] == 9090
    assert int(env["MEMOPLANE_HEALTH_PORT"]) == ports["health"] == 8081
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def assert_restricted(pod: dict[str, Any]) -> None:
    """Pod Security Standards, restricted profile (the checks that apply to these pods)."""
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    psc = pod.get("securityContext", {})
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, c["name"]
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), c["name"]


def test_minio_is_restricted_with_a_kept_pvc(helm: Path) -> None:
    docs = render(helm)
    sts = find(docs, "StatefulSet", "-minio")
    assert_restricted(sts["spec"]["template"]["spec"])
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    secret = find(docs, "Secret", "-minio-credentials")
    assert set(secret["data"]) == {"accessKey", "secretKey"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_agent_has_exactly_the_documented_privileges(helm: Path) -> None:
    ds = find(render(helm), "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    assert pod.get("hostUsers", True) is True
    # One hostPath by default: the node's own signing key, which outlives the pod.
    assert [v["hostPath"] for v in pod["volumes"] if "hostPath" in v] == [
        {"path": "/var/lib/memoplane/node-key", "type": "DirectoryOrCreate"}]
    (c,) = pod["containers"]
    assert c["args"] == ["agent"]
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert sc["seccompProfile"] == {"type": "Unconfined"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["MEMOPLANE_REQUIRE_ISOLATION"]["value"] == "1"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", env["MEMOPLANE_LOCAL_CACHE"]["value"]} <= mounts
    # Every capability is explained where users read about it.
    values = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    for cap in AGENT_CAPS:
        assert re.search(rf"- {cap}\b", values), f"{cap} is not in values.yaml"
        assert cap in readme, f"{cap} is not explained in the chart README"


def test_privileged_agent_adds_no_capabilities_list(helm: Path) -> None:
    ds = find(render(helm, *VARIANTS["privileged-agent"]), "DaemonSet", "-agent")
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["privileged"] is True and "add" not in sc["capabilities"]


def _env_names_read(*paths: Path) -> set[str]:
    names: set[str] = set()
    for path in paths:
        names |= set(re.findall(r"""env(?:iron)?\.get\(\s*["']([A-Z0-9_]+)["']""", path.read_text()))
        names |= set(re.findall(r"""\b(MEMOPLANE_[A-Z0-9_]+)\b""", path.read_text()))
    return names


def _settings_env(*classes: Any) -> set[str]:
    """The environment variables memoplane.settings reads for these settings classes."""
    return {f.metadata["env"] for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("env")}


def test_env_the_chart_sets_is_read_by_the_processes(helm: Path) -> None:
    from memoplane import settings as s

    docs = render(helm)
    common = [ROOT / "memoplane" / "cluster" / "kube.py"]
    store = _settings_env(s.StoreSettings) | {s.CREDENTIALS_ENV} | _settings_env(s.SigningSettings)
    readers = {
        "-operator": _env_names_read(ROOT / "operator" / "memoplane_operator" / "__main__.py", *common)
        | _settings_env(s.OperatorSettings) | store,
        "-agent": _env_names_read(ROOT / "sandbox-node" / "memoplane_agent" / "__main__.py", *common)
        | _settings_env(s.AgentSettings) | _settings_env(s.ServeSettings) | store,   # its sessions' ServeSettings
    }
    for kind, suffix in (("Deployment", "-operator"), ("DaemonSet", "-agent")):
        (c,) = find(docs, kind, suffix)["spec"]["template"]["spec"]["containers"]
        set_by_chart = {e["name"] for e in c["env"]} - {"TMPDIR"}
        unread = set_by_chart - readers[suffix]
        assert not unread, f"{suffix}: the chart sets {sorted(unread)}, which nothing reads"
        for needed in ("MEMOPLANE_S3_ENDPOINT", "MEMOPLANE_NAMESPACE", "MEMOPLANE_WATCH_NAMESPACES"):
            assert needed in set_by_chart, (suffix, needed)
        keys = {"MEMOPLANE_S3_ACCESS_KEY", "MEMOPLANE_S3_SECRET_KEY"}
        if suffix == "-operator":
            assert keys <= set_by_chart
        else:  # a job that reads the agent's /proc/<pid>/environ must not find the store keys
            assert not keys & set_by_chart and "MEMOPLANE_S3_CREDENTIALS_DIR" in set_by_chart


@pytest.mark.parametrize(("variant", "secret"), [("defaults", "mp-memoplane-minio-credentials"),
                                                 ("external-s3", "s3-keys"),
                                                 ("external-s3-inline-keys", "mp-memoplane-s3-credentials")])
def test_agent_reads_the_store_keys_from_a_secret_volume_only_it_can_read(helm: Path, variant: str,
                                                                          secret: str) -> None:
    pod = find(render(helm, *VARIANTS[variant]), "DaemonSet", "-agent")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in env.values()), "no Secret in the environment"
    directory = env["MEMOPLANE_S3_CREDENTIALS_DIR"]["value"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": secret, "defaultMode": 0o400,
                                "items": [{"key": "accessKey", "path": "accessKey"},
                                          {"key": "secretKey", "path": "secretKey"}]}
    assert "fsGroup" not in pod.get("securityContext", {}), "fsGroup would make the key files group-readable"


def _rules(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in doc["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_rbac_is_least_privilege(helm: Path) -> None:
    docs = render(helm)
    op = _rules(find(docs, "ClusterRole", "-operator"))
    agent = _rules(find(docs, "ClusterRole", "-agent"))
    for rules in (op, agent):
        assert not any("*" in r for rule in rules for r in rule), "no wildcards"
        assert not any(r[1] in ("pods", "pods/exec", "nodes") for r in rules)
    # The operator gets a Secret a ResultCache names (trusted keys); nothing lists Secrets.
    assert {v for _, r, v in op if r == "secrets"} == {"get"} and not any(r == "secrets" for _, r, _ in agent)
    assert ("memoplane.io", "computejobs/status", "patch") in agent
    assert not any(v in ("create", "update", "patch", "delete") for g, r, v in agent if r == "computejobs")
    assert ("memoplane.io", "resultcaches", "create") in op
    assert ("", "configmaps", "get") in op and ("", "configmaps", "list") not in op
    # Leases only in the release namespace.
    assert not any(r == "leases" for _, r, _ in op | agent)
    op_lease = find(docs, "Role", "-operator")
    agent_lease = find(docs, "Role", "-agent")
    assert op_lease["metadata"]["namespace"] == agent_lease["metadata"]["namespace"] == NAMESPACE
    assert {v for _, r, v in _rules(op_lease) if r == "leases"} == {"get", "list", "watch"}
    assert {v for _, r, v in _rules(agent_lease) if r == "leases"} == {"get", "create", "update", "delete"}
    # The agents' keys the operator remembers: it alone writes them, an agent may only read them.
    assert {(v, tuple(rule.get("resourceNames", ()))) for rule in op_lease["rules"] for v in rule["verbs"]
            if rule["resources"] == ["configmaps"]} == {("create", ()), ("patch", ("memoplane-agent-keys",))}
    assert [(rule["verbs"], rule.get("resourceNames")) for rule in agent_lease["rules"]
            if rule["resources"] == ["configmaps"]] == [(["get"], ["memoplane-agent-keys"])]
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE


def test_external_s3_uses_the_given_endpoint_and_secret(helm: Path) -> None:
    docs = render(helm, *VARIANTS["external-s3"])
    assert not [d for d in docs if d["kind"] == "StatefulSet" or (d["kind"] == "Secret" and "-signing-key" not in
                                                                    d["metadata"]["name"])]
    (c,) = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MEMOPLANE_S3_ENDPOINT"]["value"] == "https://s3.example.com"
    assert env["MEMOPLANE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "accessKey"}


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "objectStore.minio.enabled=false"], "endpoint"),
    (["--set", "objectStore.minio.enabled=false", "--set", "objectStore.external.endpoint=http://s3:9000"],
     "set existingSecret, or both accessKey and secretKey"),
    (["--set", "operator.replicas=2"], "operator/replicas"),
    (["--set", "agent.capacity=0"], "agent/capacity"),
    (["--set", "agent.seccompProfile.type=Localhost"], "localhostProfile"),
    (["--set", "unknownKey=1"], "unknownKey"),
    (["--set", "apiServer.host=127.0.0.1"], "apiServer.host and apiServer.port are set together"),
    (["--set", "apiServer.address=127.0.0.1"], "additional properties 'address' not allowed"),
    (["--set", "apiServer.host=https://10.0.0.1"], "apiServer/host"),
    (["--set", "hostNetwork=yes"], "hostNetwork"),
    (["--set", "image.digest=latest"], "image/digest"),
    (["--set-json", 'objectInputs=[{"namespaces":"*","bucket":"memoplane","prefix":""}]'],
     "the result bucket (objectStore.bucket), which is never readable"),
    (["--set-json", 'objectInputs=[{"namespaces":"*","bucket":"data","prefix":"tables"}]'], "objectInputs/0/prefix"),
    (["--set-json", 'objectInputs=[{"bucket":"data","prefix":""}]'], "namespaces"),
    (["--set", "api.enabled=true"], "api.enabled needs api.apiKeys.existingSecret"),
    (["--set", "api.enabled=true", "--set", "api.apiKeys.existingSecret=k", "--set", "api.replicas=2"],
     "additional properties 'replicas' not allowed"),
    (["--set", "api.enabled=true", "--set", "api.apiKeys.existingSecret=k", "--set-json",
      'api.tiers={"gold": {"key": {"creation_burst": 1}, "team": {}}}'], "api/tiers/gold/key"),
])
def test_bad_values_are_refused(helm: Path, args: list[str], message: str) -> None:
    proc = run_helm(helm, "template", "mp", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_host_network_and_the_api_server_address_reach_every_pod_that_talks_to_the_api(helm: Path) -> None:
    docs = render(helm, *VARIANTS["host-network-node"])
    for kind, suffix in (("DaemonSet", "-agent"), ("Deployment", "-operator"), ("Deployment", "-api")):
        pod = find(docs, kind, suffix)["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet", suffix
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c["env"]}
        assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443"), suffix
    for kind, suffix in (("DaemonSet", "-agent"), ("Deployment", "-operator")):
        pod = find(render(helm), kind, suffix)["spec"]["template"]["spec"]
        assert "hostNetwork" not in pod and "dnsPolicy" not in pod
        assert not any(e["name"].startswith("KUBERNETES_") for c in pod["containers"] for e in c["env"])


def test_the_object_allowlist_reaches_the_operator_as_the_setting_it_reads(helm: Path) -> None:
    from memoplane.settings import OBJECT_INPUTS_ENV, ObjectGrant, parse_object_grants

    def allowlist(*args: str) -> tuple[ObjectGrant, ...]:
        (c,) = find(render(helm, *args), "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
        return parse_object_grants({e["name"]: e for e in c["env"]}[OBJECT_INPUTS_ENV]["value"])

    assert allowlist() == ()
    assert allowlist(*VARIANTS["object-inputs"]) == (ObjectGrant(("ml",), "datasets", "tables/"),
                                                     ObjectGrant(None, "public-data", ""))


def test_the_home_prefix_places_the_default_caches_and_the_operators_homes(helm: Path) -> None:
    from memoplane.settings import HOME_ENV, home_location

    docs = render(helm, "--set", "objectStore.bucket=shared", "--set", "objectStore.homePrefix=cluster-a/",
                  "--set", "defaultResultCache.namespaces={ml}")
    (c,) = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    home = {e["name"]: e for e in c["env"]}[HOME_ENV]["value"]
    assert home_location({HOME_ENV: home}) == ("shared", "cluster-a")
    assert find(docs, "ResultCache")["spec"]["store"] == {"bucket": "shared", "prefix": "cluster-a/ml/"}


def test_monitoring_objects(helm: Path) -> None:
    import json

    docs = render(helm, *VARIANTS["monitoring"])
    sm = find(docs, "ServiceMonitor")
    selector = sm["spec"]["selector"]["matchLabels"]
    selected = [d for d in docs if d["kind"] == "Service"
                and all(d["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert {d["metadata"]["name"] for d in selected} == {"mp-memoplane-operator-metrics", "mp-memoplane-agent-metrics"}
    assert all(p["name"] == "metrics" for d in selected for p in d["spec"]["ports"])
    dashboard = json.loads(find(docs, "ConfigMap", "-dashboard")["data"]["memoplane.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    metrics_py = (ROOT / "memoplane" / "cluster" / "metrics.py").read_text()
    for name in set(re.findall(r"\b(memoplane_[a-z_]+?)(?:_bucket)?\b", exprs)):
        base = re.sub(r"_total$", "", name)
        assert f'"{base}' in metrics_py, f"the dashboard queries {name}, which memoplane does not export"


def test_default_result_caches(helm: Path) -> None:
    docs = render(helm, *VARIANTS["hostpath-cache-no-crds"])
    caches = [d for d in docs if d["kind"] == "ResultCache"]
    assert {d["metadata"]["namespace"] for d in caches} == {"ml", "research"}
    for rc in caches:
        assert rc["metadata"]["name"] == "default"
        assert rc["spec"]["store"] == {"bucket": "memoplane", "prefix": f"{rc['metadata']['namespace']}/"}
        assert "helm.sh/hook" in rc["metadata"]["annotations"]
        assert "finalizers" not in rc["metadata"]
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"]


def test_the_operators_signing_key_is_generated_kept_and_mounted_read_only(helm: Path) -> None:
    from memoplane.settings import NODE_KEY_DIR_ENV, SIGNING_KEY_FILE_ENV, SIGNING_KEYID_ENV
    from memoplane.trust import SigningKey

    docs = render(helm)
    secret = find(docs, "Secret", "-signing-key")
    keyid = secret["metadata"]["annotations"]["memoplane.io/key-id"]
    assert keyid == "mp-agents-1" and secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pem = base64.b64decode(secret["data"]["private.pem"])
    assert SigningKey.parse(keyid, pem).keyid == keyid  # an Ed25519 PKCS#8 key the processes load
    other = find(render(helm), "Secret", "-signing-key")["data"]["private.pem"]
    assert other != secret["data"]["private.pem"], "generated per install"
    # Kept on upgrade: the template reads the installed Secret back (`helm template` cannot).
    source = (CHART / "templates" / "signingkey.yaml").read_text()
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \$name', source)
    assert 'index $existing.data "private.pem"' in source
    pod = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[SIGNING_KEYID_ENV] == keyid
    directory, file = str(env[SIGNING_KEY_FILE_ENV]).rsplit("/", 1)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400,
                                "items": [{"key": "private.pem", "path": file}]}
    # The agents never see it: each signs with its own key, kept in a directory on its node.
    pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert SIGNING_KEY_FILE_ENV not in env and SIGNING_KEYID_ENV not in env
    assert not [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env[NODE_KEY_DIR_ENV]]
    assert not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"] == {"path": "/var/lib/memoplane/node-key", "type": "DirectoryOrCreate"}
    moved = find(render(helm, "--set", "agent.nodeKey.hostPath=/srv/mp-key"), "DaemonSet", "-agent")
    assert [v["hostPath"]["path"] for v in moved["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mount["name"]] == ["/srv/mp-key"]


def test_api_is_off_by_default_and_then_leaves_the_agents_without_a_session_endpoint(helm: Path) -> None:
    docs = render(helm)
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-api", "-api-sessions"))]
    (c,) = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"]
    assert not {"MEMOPLANE_SESSION_SECRET_FILE", "MEMOPLANE_SESSION_PORT"} & {e["name"] for e in c["env"]}


def test_api_deployment_runs_serve_with_its_settings_restricted(helm: Path) -> None:
    from memoplane import settings as s

    docs = render(helm, *VARIANTS["api"])
    dep = find(docs, "Deployment", "-api")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["serviceAccountName"] == "mp-memoplane-api"
    (c,) = pod["containers"]
    assert c["args"] == ["memoplane", "serve"]
    env = {e["name"]: e for e in c["env"]}
    read = _settings_env(s.ServeSettings, s.StoreSettings) | {"MEMOPLANE_STORE", s.KEYS_DIR_ENV, "XDG_CACHE_HOME"}
    assert set(env) <= read, f"the chart sets {sorted(set(env) - read)}, which serve does not read"
    settings = s.from_env(s.ServeSettings, {k: e["value"] for k, e in env.items() if "value" in e})
    assert (settings.host, settings.port, settings.clock_window) == ("0.0.0.0", 3000, 300)
    assert settings.max_timeout == 3600 and settings.max_sandboxes == 32
    assert s.serve_tiers(settings)["gold"].key.concurrent_sandboxes == 3
    assert env["MEMOPLANE_SERVE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["MEMOPLANE_STORE"]["value"] == "s3://memoplane/_api"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 3000}
    assert c["livenessProbe"]["tcpSocket"] == c["readinessProbe"]["tcpSocket"] == {"port": "http"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable, secret in (("MEMOPLANE_SERVE_API_KEYS", "memoplane-api-keys"),
                             ("MEMOPLANE_SESSION_SECRET_FILE", "mp-memoplane-api-sessions")):
        path = Path(env[variable]["value"])
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        volume = volumes[mount["name"]]["secret"]
        assert volume["secretName"] == secret and volume["defaultMode"] == 0o400
        assert [item["path"] for item in volume["items"]] == [path.name]
    service = find(docs, "Service", "-api")
    assert service["spec"]["ports"] == [{"name": "http", "port": 3000, "targetPort": "http"}]


def test_agents_serve_sessions_to_the_api_with_the_same_generated_secret(helm: Path) -> None:
    docs = render(helm, *VARIANTS["api"])
    secret = find(docs, "Secret", "-api-sessions")
    assert len(base64.b64decode(secret["data"]["secret"])) == 48
    pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    path = Path(env["MEMOPLANE_SESSION_SECRET_FILE"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"] and volume["secret"]["defaultMode"] == 0o400
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["sessions"] == int(env["MEMOPLANE_SESSION_PORT"]["value"]) == 8091
    assert env["MEMOPLANE_SERVE_MAX_TIMEOUT"]["value"] == "3600"   # the agents' sessions live as long as the API's


def test_api_rbac_is_leases_list_its_sandbox_objects_and_the_run_namespaces_jobs_only(helm: Path) -> None:
    docs = render(helm, *VARIANTS["api"])
    role = find(docs, "Role", "-api")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == {("coordination.k8s.io", "leases", "list"), ("memoplane.io", "sandboxes", "create"),
                            ("memoplane.io", "sandboxes", "delete"), ("memoplane.io", "sandboxes", "list"),
                            ("memoplane.io", "sandboxes", "watch"), ("memoplane.io", "sandboxes/status", "patch"),
                            ("", "configmaps", "get")}
    assert [r.get("resourceNames") for r in role["rules"] if r["resources"] == ["configmaps"]] == [["memoplane-agent-keys"]]
    runs = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-api-runs")]
    assert sorted(d["metadata"]["namespace"] for d in runs) == ["ml", "research"]
    for run_role in runs:
        assert _rules(run_role) == {("memoplane.io", "computejobs", "create"), ("memoplane.io", "computejobs", "get"),
                                    ("memoplane.io", "resultcaches", "get"), ("", "configmaps", "get"),
                                    ("", "secrets", "get")}
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-api-runs")]
    assert sorted((b["metadata"]["namespace"], b["subjects"][0]["name"], b["subjects"][0]["namespace"])
                  for b in bindings) == [("ml", "mp-memoplane-api", NAMESPACE), ("research", "mp-memoplane-api", NAMESPACE)]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding") and d["metadata"]["name"].endswith("-api")]
    edit, view = _rules(find(docs, "ClusterRole", "-edit")), _rules(find(docs, "ClusterRole", "-view"))
    assert not any(r.startswith("sandboxes") for _, r, _ in edit), "Sandbox objects are the API's to write"
    assert ("memoplane.io", "sandboxes", "list") in view


def test_tier_limits_in_the_schema_are_the_settings(helm: Path) -> None:
    import json

    from memoplane.settings import TIER_LIMITS

    schema = json.loads((CHART / "values.schema.json").read_text())
    tier = schema["properties"]["api"]["properties"]["tiers"]["additionalProperties"]["properties"]["key"]
    assert set(tier["properties"]) == set(tier["required"]) == set(TIER_LIMITS)
