"""The store's records: the manifests of blobs, trees and results, as canonical JSON.

Every manifest object is stored "sealed": its canonical JSON, a newline, and the
digest of that JSON, so a truncated or flipped manifest is caught before it is
parsed. Tree and result digests are blake3 of their canonical JSON, so equal content
gives equal addresses. A blob's
digest is blake3 of its plain content (however it was chunked), so its manifest
is checked by re-hashing the content on read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal, cast

from ..canonical import canonical_json, check_json_depth
from ..errors import InputError
from ..tree_limits import MAX_TREE_DEPTH, MAX_TREE_ENTRIES
from .digests import b3, check_digest

VERSION = 1
ValueKind = Literal["json", "bytes", "file", "none"]
VALUE_KINDS = ("json", "bytes", "file", "none")


class SealError(ValueError):
    pass


def seal(body: dict[str, Any]) -> bytes:
    data = canonical_json(body)
    return data + b"\n" + b3(data).encode()


def unseal(stored: bytes) -> dict[str, Any]:
    """Parse a sealed object; raises SealError if it is damaged."""
    data, sep, digest = stored.rpartition(b"\n")
    if not sep or b3(data).encode() != digest:
        raise SealError("its checksum does not match its content (truncated or altered)")
    try:
        body = json.loads(data)
    except ValueError as e:
        raise SealError(f"it is not JSON: {e}") from None
    except RecursionError:  # never written by memoplane: its values nest at most MAX_JSON_DEPTH
        raise SealError("its JSON nests too deeply to decode") from None
    if not isinstance(body, dict):
        raise SealError("it is not a JSON object")
    return body


def _get(d: dict[str, Any], name: str, typ: type | tuple[type, ...], where: str) -> Any:
    if name not in d:
        raise InputError(f"{where}.{name} is missing", f"add {name} to the {where}")
    v = d[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise InputError(f"{where}.{name}: {v!r} has the wrong type", f"use a {typ}")
    return v


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "blob") -> BlobRef:
        return cls(check_digest(_get(d, "digest", str, where), f"{where}.digest"), _get(d, "size", int, where))


@dataclass(frozen=True)
class BlobManifest:
    size: int
    chunks: tuple[tuple[str, int], ...]  # (chunk digest, plain size)

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "size": self.size, "chunks": [list(c) for c in self.chunks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlobManifest:
        chunks = tuple((check_digest(c[0], "chunk"), int(c[1])) for c in _get(d, "chunks", list, "blob"))
        size = _get(d, "size", int, "blob")
        if sum(n for _, n in chunks) != size:
            raise InputError("blob.size differs from the sum of its chunk sizes", "rewrite the blob")
        return cls(size, chunks)


NAME_MAX = 255                # bytes in one path component (Linux)


def tree_path_problem(rel: str) -> str | None:
    """Why `rel` cannot name a file in a tree (None: it can): a relative POSIX path of
    UTF-8 names, no empty, '.' or '..' component, no NUL, at most MAX_TREE_DEPTH deep."""
    parts = rel.split("/")
    if not rel or rel.startswith("/"):
        return "is not a relative path"
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' component"
    if "\0" in rel:
        return "contains a NUL character"
    if len(parts) > MAX_TREE_DEPTH:
        return f"is nested more than {MAX_TREE_DEPTH} directories deep"
    try:
        if any(len(part.encode("utf-8")) > NAME_MAX for part in parts):
            return f"has a name longer than {NAME_MAX} bytes"
    except UnicodeEncodeError:
        return "is not UTF-8"
    return None


def short_path(rel: str, limit: int = 120) -> str:
    """A path for a one-line message: repr'd, and cut in the middle when long."""
    text = repr(rel)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


@dataclass(frozen=True)
class TreeEntry:
    """A regular file: its blob, size and exec bit. Trees hold nothing else (no links)."""

    digest: str
    size: int = 0
    exec: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "exec": self.exec}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TreeEntry:
        if not isinstance(d, dict):
            raise InputError(f"{where} is not an object", "rewrite the tree")
        if "link" in d:  # written by memoplane before links were refused
            raise InputError(f"{where} is a symbolic link, which a stored tree may not hold",
                             "recompute the result; its job must write regular files only")
        return cls(check_digest(_get(d, "digest", str, where), f"{where}.digest"),
                   _get(d, "size", int, where), bool(_get(d, "exec", bool, where)))


@dataclass(frozen=True)
class TreeManifest:
    entries: dict[str, TreeEntry]  # relative POSIX path -> entry

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries.values())

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "entries": {p: e.to_dict() for p, e in self.entries.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TreeManifest:
        """Refuses what materialising could not do safely: bad paths, a path that is both a
        file and a directory, too many entries, links (see TreeEntry)."""
        raw = _get(d, "entries", dict, "tree")
        if len(raw) > MAX_TREE_ENTRIES:
            raise InputError(f"tree has {len(raw)} entries, more than {MAX_TREE_ENTRIES}", "rewrite the tree")
        entries = {}
        for rel, entry in raw.items():
            problem = tree_path_problem(rel)
            if problem:
                raise InputError(f"tree entry {short_path(rel)} {problem}", "the tree was tampered with")
            entries[rel] = TreeEntry.from_dict(entry, f"tree.entries[{short_path(rel)}]")
        # In component order a file's descendants, if any, come right after it.
        ordered = sorted(entries, key=lambda rel: rel.split("/"))
        for rel, after in pairwise(ordered):
            if after.startswith(rel + "/"):
                raise InputError(f"tree entry {short_path(rel)} is both a file and a directory",
                                 "the tree was tampered with")
        return cls(entries)

    def blobs(self) -> list[str]:
        return [e.digest for e in self.entries.values()]

    @property
    def digest(self) -> str:
        return b3(canonical_json(self.to_dict()))


@dataclass(frozen=True)
class StoredValue:
    """A job's return value: inline JSON when small, else a blob (JSON text, bytes or a file)."""

    kind: ValueKind = "none"
    inline: Any = None
    blob: BlobRef | None = None

    @property
    def size(self) -> int:
        if self.blob:
            return self.blob.size
        return 0 if self.kind == "none" else len(canonical_json(self.inline))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "inline": self.inline, "blob": self.blob.to_dict() if self.blob else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredValue:
        kind = _get(d, "kind", str, "value")
        if kind not in VALUE_KINDS:
            raise InputError(f"value.kind: {kind!r} is not a value kind", f"use one of {VALUE_KINDS}")
        blob = d.get("blob")
        check_json_depth(d.get("inline"), "value.inline")
        return cls(cast(ValueKind, kind), d.get("inline"), BlobRef.from_dict(blob, "value.blob") if blob else None)


@dataclass(frozen=True)
class Provenance:
    cache_key: str
    inputs: dict[str, str]  # input name -> content digest
    runtime: str  # runtime profile identity digest
    node: str
    started_at: float  # seconds since the epoch
    ended_at: float
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"cache_key": self.cache_key, "inputs": dict(self.inputs), "runtime": self.runtime,
                "node": self.node, "started_at": float(self.started_at), "ended_at": float(self.ended_at),
                "duration_s": float(self.duration_s)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        w = "provenance"
        inputs = _get(d, "inputs", dict, w)
        for k, v in inputs.items():
            check_digest(v, f"provenance.inputs[{k!r}]")
        return cls(check_digest(_get(d, "cache_key", str, w), "provenance.cache_key"), inputs,
                   _get(d, "runtime", str, w), _get(d, "node", str, w),
                   float(_get(d, "started_at", (int, float), w)), float(_get(d, "ended_at", (int, float), w)),
                   float(_get(d, "duration_s", (int, float), w)))


@dataclass(frozen=True)
class ResultManifest:
    """What a job produced and how. Built by the runner, stored by `Store.put_result`."""

    value: StoredValue
    stdout: BlobRef
    stderr: BlobRef
    provenance: Provenance
    output_tree: BlobRef | None = None  # digest and total size of the output tree
    meta: dict[str, Any] = field(default_factory=dict)  # runner extras: exit code, isolation, ...
    # Written by the shared-secret MAC that attestations replaced (memoplane.trust): always None
    # now, and kept because the digest covers it, so every stored result keeps its address.
    signature: str | None = None

    @property
    def key(self) -> str:
        return self.provenance.cache_key

    @property
    def logical_size(self) -> int:
        tree = self.output_tree.size if self.output_tree else 0
        return self.value.size + tree + self.stdout.size + self.stderr.size

    def blobs(self) -> list[str]:
        """Blob digests this result names directly (the tree's are in the tree)."""
        out = [self.stdout.digest, self.stderr.digest]
        return out + ([self.value.blob.digest] if self.value.blob else [])

    def body(self) -> dict[str, Any]:
        """Everything but the (legacy) signature."""
        return {"v": VERSION, "value": self.value.to_dict(), "stdout": self.stdout.to_dict(),
                "stderr": self.stderr.to_dict(), "provenance": self.provenance.to_dict(),
                "output_tree": self.output_tree.to_dict() if self.output_tree else None,
                "meta": dict(self.meta)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @property
    def digest(self) -> str:
        """The address (of to_dict, the legacy signature field included)."""
        return b3(canonical_json(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResultManifest:
        w = "result"
        if d.get("v") != VERSION:
            raise InputError(f"result.v: {d.get('v')!r} is not supported", f"this memoplane reads v{VERSION}")
        tree = d.get("output_tree")
        sig = d.get("signature")
        if sig is not None and not isinstance(sig, str):
            raise InputError("result.signature is not a string", "re-sign the result")
        return cls(StoredValue.from_dict(_get(d, "value", dict, w)),
                   BlobRef.from_dict(_get(d, "stdout", dict, w), "stdout"),
                   BlobRef.from_dict(_get(d, "stderr", dict, w), "stderr"),
                   Provenance.from_dict(_get(d, "provenance", dict, w)),
                   BlobRef.from_dict(tree, "output_tree") if tree else None,
                   dict(d.get("meta") or {}), sig)
