"""The documents `memoplane apply -f` reads: validated with the API's own models, and what
is not supported embedded refused with the document, the field and the fix named.

Supported embedded: ComputeJob, ConfigMap (for fromConfigMap), GMemSeed without written
overrides (a fresh seed's digest is its parameters'; overrides live in a cluster's store).
Refused: ResultCache (its store, retention, quota, sharing and trust are a cluster's; here
the store is --store and the trust policy is your keyring) and every other kind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ..api.computejob import ComputeJob
from ..api.specs import SpecError, parse_computejob
from ..cluster import protocol as p
from ..cluster import seeds
from ..errors import InputError
from ..gmem.persist import seed_digest

DEFAULT_NAMESPACE = "default"
SUFFIXES = (".yaml", ".yml", ".json")
Ref = tuple[str, str]   # (namespace, name)


@dataclass(frozen=True)
class JobDoc:
    label: str              # where the document is: "dag.yaml, document 2"
    obj: dict[str, Any]     # the manifest as given, metadata.namespace filled in
    job: ComputeJob

    @property
    def ref(self) -> Ref:
        return self.obj["metadata"]["namespace"], self.job.metadata.name


@dataclass
class Manifests:
    jobs: dict[Ref, JobDoc] = field(default_factory=dict)            # in document order
    config_maps: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[Ref, dict[str, Any]] = field(default_factory=dict)  # with the status a fresh seed has


def load(source: str) -> Manifests:
    """FILE, DIR (its *.yaml, *.yml, *.json, sorted) or - (stdin)."""
    out = Manifests()
    for label, doc in documents(source):
        _add(out, label, doc)
    if not out.jobs:
        raise InputError(f"{source}: no ComputeJob documents", "give a file with kind: ComputeJob manifests")
    return out


def documents(source: str) -> Iterator[tuple[str, Any]]:
    for name, text in _texts(source):
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InputError(f"{name}: not valid YAML{where} ({problem})", "fix the YAML syntax") from None
        for index, doc in enumerate(docs, 1):
            if doc is not None:
                yield f"{name}, document {index}", doc


def _texts(source: str) -> Iterator[tuple[str, str]]:
    if source == "-":
        yield "<stdin>", sys.stdin.read()
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"-f {source}: no such file or directory", "give a manifest file, a directory or -")
    for file in files:
        try:
            yield str(file), file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: cannot be read ({exc})", "give a readable UTF-8 file") from None


def _add(out: Manifests, label: str, doc: Any) -> None:
    if not isinstance(doc, dict):
        raise InputError(f"{label}: not a Kubernetes object", "each document needs apiVersion, kind and metadata")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"{label}: metadata.name: required field is missing", "give the object a name")
    obj = {**doc, "metadata": {**meta, "namespace": meta.get("namespace") or DEFAULT_NAMESPACE}}
    ref: Ref = (obj["metadata"]["namespace"], name)
    what = f"{label} ({kind} '{name}')"
    if (kind, api) == ("ComputeJob", p.API_VERSION):
        _unique(out.jobs, ref, what)
        out.jobs[ref] = JobDoc(label, obj, _computejob(obj, what))
    elif (kind, api) == ("ConfigMap", "v1"):
        _unique(out.config_maps, ref, what)
        out.config_maps[ref] = obj
    elif (kind, api) == ("GMemSeed", p.API_VERSION):
        _unique(out.seeds, ref, what)
        out.seeds[ref] = _fresh_seed(obj, what)
    elif (kind, api) == ("ResultCache", p.API_VERSION):
        raise InputError(f"{what}: ResultCache is not supported embedded (the store is --store, trust is your "
                         "keyring; retention, quota and sharing are a cluster's)",
                         "remove it from what you give memoplane apply, or kubectl apply it to a cluster")
    else:
        raise InputError(f"{what}: kind {kind!r} ({api}) is not supported by memoplane apply",
                         f"give ComputeJob, GMemSeed ({p.API_VERSION}) or ConfigMap (v1) documents")


def _unique(seen: dict[Ref, Any], ref: Ref, what: str) -> None:
    if ref in seen:
        raise InputError(f"{what}: a second object of this kind with this name in namespace '{ref[0]}'",
                         "give each object a distinct metadata.name")


def _computejob(obj: dict[str, Any], what: str) -> ComputeJob:
    try:
        job = parse_computejob(obj)
    except SpecError as exc:
        raise InputError(f"{what}: {'; '.join(exc.problems)}", "fix the fields named") from None
    spec = job.spec
    if spec.verify is not None and spec.verify.replicas > 1:
        raise InputError(f"{what}: spec.verify.replicas {spec.verify.replicas}: not supported embedded: "
                         "needs distinct nodes", "use replicas 1 here, or apply the manifest to a cluster")
    if spec.cache.result_cache != "default":
        raise InputError(f"{what}: spec.cache.resultCache '{spec.cache.result_cache}': not supported embedded "
                         "(one store: --store)", "remove spec.cache.resultCache, or apply the manifest to a cluster")
    return job


def _fresh_seed(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """The seed as a cluster reports it before anyone wrote to it: Ready, digest of its parameters."""
    params = seeds.parse_seed(obj)
    if isinstance(params, str):
        raise InputError(f"{what}: {params}", "fix the fields named")
    state = seeds.SeedState(seed_digest(params), 0, 0, "embedded", None)
    return {**obj, "status": seeds.ready({}, 1, state, datetime.now(UTC))}
