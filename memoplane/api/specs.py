"""Parse specs with errors that name the field, and build manifests for the CLI.

Errors read like the API server's: `spec.inputs[2]: input 'noise' has 2 sources: ...`,
so a spec rejected by `memoplane` locally is rejected for the same reason by kubectl.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import InputError
from .common import API_VERSION, DNS_SUBDOMAIN_PATTERN, K8sModel
from .computejob import ComputeJob, ComputeJobSpec
from .gmemseed import GMemSeed, GMemSeedSpec
from .resultcache import ResultCache, ResultCacheSpec

M = TypeVar("M", bound=BaseModel)
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_FRIENDLY = {
    "extra_forbidden": "unknown field: check the spelling (kubectl explain shows the fields)",
    "missing": "required field is missing",
}


class SpecError(InputError):
    """A manifest or spec that the API server would reject; `problems` name each field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems), "fix the fields named above")


def field_path(root: str, loc: tuple[int | str, ...]) -> str:
    """`("inputs", 2, "name")` under `spec` -> `spec.inputs[2].name`."""
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def problems(exc: ValidationError, root: str = "spec") -> list[str]:
    """One `path: message` line per error, like the API server's field errors."""
    lines = []
    for error in exc.errors():
        path = field_path(root, tuple(error["loc"]))
        message = _FRIENDLY.get(error["type"], error["msg"]).removeprefix("Value error, ")
        lines.append(message if _names_subpath(message, path) else f"{path}: {message}")
    return lines


def _names_subpath(message: str, path: str) -> bool:
    """A model-level validator may name a deeper field itself: `spec.map.over: ...` under `spec`."""
    head, sep, _ = message.partition(": ")
    return bool(sep) and " " not in head and (head == path or head.startswith((path + ".", path + "[")))


def parse(model: type[M], data: Any, root: str = "spec") -> M:
    """Validate `data` as `model`, raising SpecError with field-named problems."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems(exc, root)) from None


def parse_computejob(obj: Mapping[str, Any]) -> ComputeJob:
    return parse(ComputeJob, obj, root="")


def parse_resultcache(obj: Mapping[str, Any]) -> ResultCache:
    return parse(ResultCache, obj, root="")


def parse_gmemseed(obj: Mapping[str, Any]) -> GMemSeed:
    return parse(GMemSeed, obj, root="")


def check_name(name: str, what: str = "metadata.name") -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise SpecError([(
            f"{what}: {name!r} is not a valid name: use lower-case letters, digits, '-' and '.'"
            " (at most 253 characters, starting and ending with a letter or digit)"
        )])
    return name


def manifest(
    kind: str,
    name: str,
    namespace: str | None,
    spec: K8sModel,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": check_name(name)}
    if namespace is not None:
        metadata["namespace"] = check_name(namespace, "metadata.namespace")
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec.to_k8s()}


def _spec(model: type[M], spec: M | Mapping[str, Any]) -> M:
    return spec if isinstance(spec, model) else parse(model, spec)


def computejob_manifest(
    name: str,
    namespace: str | None,
    spec: ComputeJobSpec | Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ComputeJob manifest ready for `kubectl apply`; the spec is validated first."""
    return manifest("ComputeJob", name, namespace, _spec(ComputeJobSpec, spec), labels)


def resultcache_manifest(
    name: str,
    namespace: str | None,
    spec: ResultCacheSpec | Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return manifest("ResultCache", name, namespace, _spec(ResultCacheSpec, spec), labels)


def gmemseed_manifest(
    name: str,
    namespace: str | None,
    spec: GMemSeedSpec | Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return manifest("GMemSeed", name, namespace, _spec(GMemSeedSpec, spec), labels)
