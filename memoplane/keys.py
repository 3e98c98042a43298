"""Cache keys (DESIGN §3).

key = "b3:" + blake3(canonical_json({v, code, entrypoint, runtime, inputs, env, salt}))

Every component is itself a content digest or a plain value, never a mutable
name: an input contributes the digest of its bytes, the runtime the digest of
the interpreter version and installed distributions. The components are kept
(`KeyParts.components()`) so that a miss can be explained against the last run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .canonical import canonical_json

KEY_VERSION = 1
DIGEST_PREFIX = "b3:"
DIGEST_PATTERN = r"^b3:[0-9a-f]{64}$"  # a digest string, as the store and the API check it


def digest_bytes(data: bytes | memoryview) -> str:
    """The digest string of `data`: "b3:" + 64 hex digits."""
    return DIGEST_PREFIX + blake3.blake3(data).hexdigest()


def digest_file(path: str | os.PathLike[str]) -> str:
    """The digest string of a file's bytes (the store's blob digest), read through a mapping."""
    return DIGEST_PREFIX + blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def digest_value(value: Any) -> str:
    """The digest of a JSON value: equal values (any key order) give equal digests."""
    return digest_bytes(canonical_json(value))


def code_digest(source: str) -> str:
    """Source text by its exact bytes: a changed comment is changed code."""
    return digest_bytes(source.encode("utf-8"))


def command_digest(argv: tuple[str, ...] | list[str]) -> str:
    return digest_value({"argv": list(argv)})


@dataclass(frozen=True)
class RuntimeIdentity:
    profile: str
    python: str
    implementation: str
    machine: str
    distributions: tuple[tuple[str, str], ...]

    def components(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "python": self.python,
            "implementation": self.implementation,
            "machine": self.machine,
            "distributions": {name: version for name, version in self.distributions},
        }

    @functools.cached_property
    def digest(self) -> str:
        return digest_value(self.components())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _installed_distributions() -> tuple[tuple[str, str], ...]:
    """name -> version of every distribution on sys.path, first entry winning as
    imports do. Reads dist-info directory names (`name-version.dist-info`, how
    installers write them): a listdir per path entry instead of parsing every
    METADATA file, which importlib.metadata does at ~1 ms per distribution."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for item in names:
            if item.endswith(".dist-info"):
                name, _, version = item[: -len(".dist-info")].rpartition("-")
            elif item.endswith(".egg-info"):
                meta = importlib.metadata.PathDistribution(Path(entry or ".") / item)
                name, version = meta.metadata["Name"] or "", meta.version
            else:
                continue
            if name:
                found.setdefault(_normalize(name), version)
    return tuple(sorted(found.items()))


@functools.lru_cache(maxsize=8)
def runtime_identity(profile: str = "python") -> RuntimeIdentity:
    """Identity of the interpreter jobs run on: an upgrade of Python or of any
    installed distribution changes every key of that runtime (cached per process)."""
    return RuntimeIdentity(
        profile=profile,
        python=platform.python_version(),
        implementation=sys.implementation.name,
        machine=platform.machine(),
        distributions=_installed_distributions(),
    )


@dataclass(frozen=True)
class KeyParts:
    code: str                     # digest of the source or command
    entrypoint: str | None        # None for commands
    runtime: str                  # RuntimeIdentity.digest
    inputs: Mapping[str, str] = field(default_factory=dict)   # name -> content digest
    env: Mapping[str, str] = field(default_factory=dict)
    salt: str = ""                # spec.cache.version

    def components(self) -> dict[str, Any]:
        return {
            "v": KEY_VERSION,
            "code": self.code,
            "entrypoint": self.entrypoint,
            "runtime": self.runtime,
            "inputs": dict(self.inputs),
            "env": dict(self.env),
            "salt": self.salt,
        }

    @property
    def key(self) -> str:
        return digest_value(self.components())


class KeyTemplate:
    """Keys of many calls that differ only in their inputs (one memoized function):
    the fixed components are encoded once, so a key costs one join and one hash.

    Gives exactly `KeyParts(...).key` (tests check it) provided input names are
    Python identifiers and entries are "kind:b3:<hex>": neither needs escaping."""

    def __init__(self, code: str, entrypoint: str | None, runtime: str,
                 env: Mapping[str, str] | None = None, salt: str = "") -> None:
        self.fixed = KeyParts(code=code, entrypoint=entrypoint, runtime=runtime, env=dict(env or {}), salt=salt)
        head, sep, tail = canonical_json(self.fixed.components()).partition(b'"inputs":{}')
        assert sep, "the canonical components always hold an empty inputs object"
        self._head, self._tail = head + b'"inputs":{', b"}" + tail

    def key(self, inputs: Mapping[str, str]) -> str:
        body = ",".join(f'"{name}":"{inputs[name]}"' for name in sorted(inputs))
        return digest_bytes(self._head + body.encode("utf-8") + self._tail)

    def parts(self, inputs: Mapping[str, str]) -> KeyParts:
        fixed = self.fixed
        return KeyParts(fixed.code, fixed.entrypoint, fixed.runtime, dict(inputs), fixed.env, fixed.salt)


def explain_change(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """Which components of a key changed since `previous`, one line each.

    Inputs and env are compared entry by entry so the line names the input."""
    if previous is None:
        return ["no earlier run of this job is recorded"]
    changes: list[str] = []
    for part in ("v", "code", "entrypoint", "runtime", "salt"):
        if previous.get(part) != current.get(part):
            changes.append(f"{part} changed: {_short(previous.get(part))} -> {_short(current.get(part))}")
    for part in ("inputs", "env"):
        changes.extend(_mapping_changes(part, previous.get(part) or {}, current.get(part) or {}))
    return changes


def _mapping_changes(part: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    lines = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            lines.append(f"{part}.{name} added")
        elif name not in after:
            lines.append(f"{part}.{name} removed")
        elif before[name] != after[name]:
            lines.append(f"{part}.{name} changed: {_short(before[name])} -> {_short(after[name])}")
    return lines


def _short(value: Any) -> str:
    text = str(value)
    kind, _, rest = text.partition(":")
    if (kind == "json" or kind.startswith("blob")) and rest.startswith(DIGEST_PREFIX):  # blob-path: ...
        return f"{kind}:{rest[:15]}"
    if text.startswith(DIGEST_PREFIX):
        return text[:15]
    return text if len(text) <= 40 else text[:37] + "..."
