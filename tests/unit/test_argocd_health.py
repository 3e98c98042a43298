"""The Argo CD health checks of ComputeJob, ResultCache and GMemSeed, run as Argo CD runs them.

charts/memoplane/argocd/ has Argo CD's own layout for resource customizations
(`<group>/<Kind>/health.lua`, `health_test.yaml`, `testdata/`); every case in a
health_test.yaml is run here in Lua 5.1 (the language gopher-lua, Argo CD's interpreter,
implements) through lupa, with the object as the global `obj` and no io/os/require.
The test data must also be valid objects of our CRDs, and argocd-cm-patch.yaml must
carry the same scripts. The scripts and the patch are generated from one source
(kstatus.lua.tmpl plus kstatus-extra/<Kind>.lua) by hack/sync-argocd-health; a test fails
when a checked-in copy differs from what it produces.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "charts" / "memoplane" / "argocd"
CHECKS = ARGOCD / "memoplane.io"
KINDS = ("ComputeJob", "ResultCache", "GMemSeed")
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

try:
    from lupa import lua51  # Lua 5.1, as gopher-lua
except ImportError as exc:  # pragma: no cover - a missing tool fails, never skips
    raise ImportError("lupa is needed to run the Argo CD health checks: pip install -e '.[test]'") from exc


def _to_lua(runtime: Any, value: Any) -> Any:
    """JSON value -> Lua value: objects and arrays become tables (arrays 1-based), null is nil."""
    if isinstance(value, dict):
        table = runtime.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _to_lua(runtime, v)
        return table
    if isinstance(value, list):
        table = runtime.table()
        for i, v in enumerate(value, start=1):
            table[i] = _to_lua(runtime, v)
        return table
    return value


def run_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    runtime.execute("io, os, require, dofile, loadfile, load, loadstring, package, debug = nil")
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(script)
    assert result is not None, "the script returned nothing"
    return {k: result[k] for k in ("status", "message") if result[k] is not None}


def _cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for kind in KINDS:
        spec = yaml.safe_load((CHECKS / kind / "health_test.yaml").read_text())
        for case in spec["tests"]:
            cases.append((kind, case))
    return cases


def test_layout_is_argocds() -> None:
    for kind in KINDS:
        d = CHECKS / kind
        assert (d / "health.lua").is_file(), d
        tests = yaml.safe_load((d / "health_test.yaml").read_text())["tests"]
        assert len(tests) >= 4, f"{kind}: too few cases"
        assert {t["healthStatus"]["status"] for t in tests} >= {"Healthy", "Progressing", "Degraded"}, kind
        used = {t["inputPath"] for t in tests}
        present = {f"testdata/{p.name}" for p in (d / "testdata").glob("*.yaml")}
        assert used == present, f"{kind}: testdata files without a case, or cases without a file"


@pytest.mark.parametrize(("kind", "case"), _cases(), ids=lambda v: v if isinstance(v, str) else v["inputPath"])
def test_health_case(kind: str, case: dict[str, Any]) -> None:
    script = (CHECKS / kind / "health.lua").read_text()
    obj = yaml.safe_load((CHECKS / kind / case["inputPath"]).read_text())
    assert obj["kind"] == kind
    got = run_health(script, obj)
    assert got["status"] in STATUSES
    assert got == case["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_testdata_are_valid_objects_of_our_crds(kind: str) -> None:
    from openapi_schema_validator import OAS30Validator

    crds = {c["spec"]["names"]["kind"]: c for c in
            (yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml"))}
    schema = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path in sorted((CHECKS / kind / "testdata").glob("*.yaml")):
        errors = [e.message for e in OAS30Validator(schema).iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors}"


@pytest.mark.parametrize("kind", KINDS)
def test_checks_survive_odd_objects(kind: str) -> None:
    """No Lua error on shapes the API server allows: empty status, empty conditions, no generation."""
    script = (CHECKS / kind / "health.lua").read_text()
    base = {"apiVersion": "memoplane.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}}
    statuses: list[dict[str, Any]] = [{}, {"conditions": []}, {"conditions": [{"type": "Ready"}]},
                                      {"conditions": [{"type": "Stalled", "status": "True"}]}, {"observedGeneration": 1}]
    for status in statuses:
        got = run_health(script, {**base, "status": status})
        assert got["status"] in STATUSES and got.get("message"), (status, got)


def test_argocd_cm_patch_carries_the_same_scripts() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    data = patch["data"]
    for kind in KINDS:
        key = f"resource.customizations.health.memoplane.io_{kind}"
        assert data.get(key) == (CHECKS / kind / "health.lua").read_text(), (
            f"{key} differs from {kind}/health.lua: copy the script into argocd-cm-patch.yaml")
    assert set(data) == {f"resource.customizations.health.memoplane.io_{k}" for k in KINDS}


def _generator() -> ModuleType:
    """hack/sync-argocd-health, imported (it has no .py suffix)."""
    path = ROOT / "hack" / "sync-argocd-health"
    loader = importlib.machinery.SourceFileLoader("sync_argocd_health", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_generated_files_are_current() -> None:
    """Every health.lua and argocd-cm-patch.yaml is exactly what the generator writes."""
    gen = _generator()
    assert tuple(gen.KINDS) == KINDS
    files = gen.render()
    assert set(files) == {CHECKS / k / "health.lua" for k in KINDS} | {ARGOCD / "argocd-cm-patch.yaml"}
    stale = [str(p.relative_to(ROOT)) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"{stale} differ from kstatus.lua.tmpl: edit the template, then run hack/sync-argocd-health"
    assert gen.main(["--check"]) == 0


def test_generator_shares_one_source() -> None:
    """The kinds differ only in their names and their kstatus-extra additions."""
    gen = _generator()
    scripts = {k: gen.script(k) for k in KINDS}
    assert "@KIND@" not in "".join(scripts.values()) and "@EXTRA@" not in "".join(scripts.values())
    assert scripts["ResultCache"].replace("ResultCache", "GMemSeed") == scripts["GMemSeed"]
    assert "status.phase" in scripts["ComputeJob"] and "status.phase" not in scripts["ResultCache"]


def test_generator_notices_a_hand_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed copy is reported stale: the check above is not vacuous."""
    gen = _generator()
    copy = tmp_path / "argocd"
    shutil.copytree(ARGOCD, copy)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "ARGOCD", copy)
    monkeypatch.setattr(gen, "TEMPLATE", copy / "kstatus.lua.tmpl")
    monkeypatch.setattr(gen, "EXTRA", copy / "kstatus-extra")
    monkeypatch.setattr(gen, "PATCH", copy / "argocd-cm-patch.yaml")
    assert gen.stale() == []
    lua = copy / "memoplane.io" / "GMemSeed" / "health.lua"
    lua.write_text(lua.read_text().replace('"Stalled"', '"Stuck"'))
    assert gen.stale() == [lua]
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.stale() == []
