"""examples/gitops: a kustomization that builds offline into valid objects of our CRDs.

kustomize refuses files outside a kustomization's directory, so the example jobs are
copies of examples/*.yaml; they must stay byte-identical. The build runs with
`kubectl kustomize` (kustomize built into kubectl), no cluster needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "examples" / "gitops"


def test_example_copies_are_identical() -> None:
    for source in sorted((ROOT / "examples").glob("*.yaml")):
        copy = GITOPS / source.name
        assert copy.is_file(), f"examples/gitops has no copy of {source.name}: cp {source} {copy}"
        assert copy.read_bytes() == source.read_bytes(), f"cp examples/{source.name} examples/gitops/"


def _build() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to build examples/gitops", pytrace=False)
    out = subprocess.run(["kubectl", "kustomize", str(GITOPS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomization_builds_valid_objects_in_one_namespace() -> None:
    docs = _build()
    schemas = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        schemas[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    kustomization = yaml.safe_load((GITOPS / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    jobs = set()
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == namespace
            kubernetes_validate.validate(doc, "1.36", strict=True)
            continue
        assert doc["apiVersion"] == "memoplane.io/v1alpha1", doc["kind"]
        assert doc["metadata"]["namespace"] == namespace
        errors = [e.message for e in OAS30Validator(schemas[doc["kind"]]).iter_errors(doc)]
        assert not errors, (doc["metadata"]["name"], errors)
        if doc["kind"] == "ComputeJob":
            jobs.add(doc["metadata"]["name"])
    expected = set()
    for source in (ROOT / "examples").glob("*.yaml"):
        expected |= {d["metadata"]["name"] for d in yaml.safe_load_all(source.read_text())
                     if d and d.get("kind") == "ComputeJob"}
    assert jobs == expected


def test_tool_manifests_point_at_this_directory() -> None:
    flux = [d for d in yaml.safe_load_all((GITOPS / "flux.yaml").read_text()) if d]
    ks = next(d for d in flux if d["kind"] == "Kustomization")
    assert ks["spec"]["path"] == "./examples/gitops" and ks["spec"]["wait"] is True
    app = yaml.safe_load((GITOPS / "argocd.yaml").read_text())
    assert app["spec"]["source"]["path"] == "examples/gitops"
    resources = yaml.safe_load((GITOPS / "kustomization.yaml").read_text())["resources"]
    assert "flux.yaml" not in resources and "argocd.yaml" not in resources
