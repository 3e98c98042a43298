"""`@memoize`: memoplane's keys and store for functions in a user's own code.

    @memoplane.memoize
    def featurize(table: pd.DataFrame, scale: float) -> np.ndarray: ...

The key covers the function's source, this interpreter's runtime identity, the
version salt and every argument by content (arrays and frames by their bytes),
after binding to the signature so f(1, b=2) and f(a=1, b=2) are one call.
Not covered: globals and other functions the body calls — bump `version=` when
those change. Runs in-process, not in a sandbox.

A stored result is served only if the trust policy accepts its attestations (the SDK may
unpickle what it reads: an unverified hit would run a stranger's code); what it computes is
signed with this user's key. Both are read from the keys directory once per function.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import math
import pickle
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from .canonical import MAX_JSON_DEPTH, canonical_json, check_json_depth, too_deep
from .cas import Provenance, ResultManifest, Store, StoredValue, open_store
from .embedded import key_lock
from .errors import InputError, NotFound, StoreCorrupted
from .fingerprint import fingerprint
from .history.deferred import DEFERRED
from .history.records import InputRecord, JobIdentity, RunRecord, new_run_id
from .keys import KeyParts, KeyTemplate, code_digest, runtime_identity
from .recent import VerifiedCache
from .trust import SigningKey, TrustPolicy, Verdict, Vouched, trusted_hit
from .trust.local import Keyring, commit_signed, refused_note

log = logging.getLogger("memoplane.sdk")
F = TypeVar("F", bound=Callable[..., Any])
_JSON_SCALARS = (str, int, float, bool, type(None))


class Memoized:
    """The wrapper `@memoize` returns: call it like the function."""

    def __init__(self, func: Callable[..., Any], *, store: Store | str | Path | None,
                 version: str, ignore: Iterable[str], allow_pickle: bool,
                 memory_bytes: int = 64 << 20) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.signature = inspect.signature(func)
        self.ignore = frozenset(ignore)
        unknown = self.ignore - set(self.signature.parameters)
        if unknown:
            raise InputError(f"memoize(ignore=...): {sorted(unknown)} are not parameters of {func.__qualname__}",
                             f"use names from {list(self.signature.parameters)}")
        self.version = version
        self.allow_pickle = allow_pickle
        self.code = code_digest(_source(func))
        self.entrypoint = f"{func.__module__}.{func.__qualname__}"
        self._store_arg = store
        self._store: Store | None = store if isinstance(store, Store) else None
        self._keys: tuple[TrustPolicy, SigningKey] | None = None
        self._vouched = Vouched()  # for self.keys' policy, read once
        self._lock = threading.Lock()
        self._recent = VerifiedCache(memory_bytes)
        self._plain_params = _plain_parameters(self.signature)
        self._template = KeyTemplate(self.code, self.entrypoint, runtime_identity().digest, salt=version)
        self._known: dict[str, _Known] = {}   # key -> what its record names (bounded: see _know)
        self._code_blob: str | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self._store_arg)  # type: ignore[arg-type]
        return self._store

    @property
    def keys(self) -> tuple[TrustPolicy, SigningKey]:
        """(whom this user trusts, what they sign with), read once."""
        if self._keys is None:
            with self._lock:
                if self._keys is None:
                    keyring = Keyring()
                    self._keys = (keyring.policy(), keyring.signer())
        return self._keys

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments by parameter name, defaults applied (f(1, b=2) == f(a=1, b=2))."""
        fast = self._plain_params
        if fast is not None and len(args) <= len(fast[0]) and not kwargs.keys() - fast[0][len(args):]:
            arguments = dict(fast[1])
            arguments.update(zip(fast[0], args, strict=False))  # the leading parameters given by position
            arguments.update(kwargs)
            if len(arguments) == len(fast[0]):
                return arguments
        bound = self.signature.bind(*args, **kwargs)  # raises the usual TypeError
        bound.apply_defaults()
        return dict(bound.arguments)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
        return {name: "py:" + _fingerprint(value, f"{self.func.__qualname__}({name}=...)")
                for name, value in self._arguments(args, kwargs).items() if name not in self.ignore}

    def key_parts(self, *args: Any, **kwargs: Any) -> KeyParts:
        return self._template.parts(self._inputs(args, kwargs))

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The cache key a call with these arguments has."""
        return self._template.key(self._inputs(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        inputs = self._inputs(args, kwargs)
        key = self._template.key(inputs)
        found, value, _ = self._lookup(key)
        if found:
            self._served(key, inputs, started)
            return value
        with key_lock(self.store, key):
            found, value, refused = self._lookup(key)  # another thread or process may have finished it
            if found:
                self._served(key, inputs, started)
                return value
            if refused is not None:
                log.warning("memoize %s: %s", self.entrypoint, refused_note(refused))
            return self._compute(key, self._template.parts(inputs), args, kwargs)

    def _served(self, key: str, inputs: dict[str, str], started: float) -> None:
        """Queue the hit's run record (memoplane.history.deferred: written off this thread)."""
        ended = time.time()
        DEFERRED.add(self.store, lambda: self._record(key, inputs, started, ended, cached=True))

    def _know(self, key: str, known: _Known) -> None:
        if len(self._known) >= 4096:  # a record without it reads the ref instead
            self._known.clear()
        self._known[key] = known

    def _record(self, key: str, inputs: dict[str, str], started: float, ended: float, cached: bool) -> RunRecord:
        """The run record of one call (built on the history thread)."""
        parts = self._template.parts(inputs)
        known = self._known.get(key)
        if known is None:
            digest = self.store.read_ref(key)
            manifest = self.store.get_result(digest) if digest is not None else None
            known = _Known(digest, manifest.logical_size if manifest else None, None,
                           manifest.provenance.duration_s if manifest else 0.0)
        if not cached and self._code_blob is None:
            self._code_blob = self.store.put_bytes(_source(self.func).encode("utf-8")).digest
        return RunRecord(
            run_id=new_run_id(int(started * 1e9)), job=JobIdentity("", self.entrypoint), key=key, result=known.digest,
            inputs=tuple(InputRecord(name, digest, None, "arg") for name, digest in parts.inputs.items()),
            code=parts.code, runtime=parts.runtime, env={}, node=socket.gethostname(), signer=known.signers,
            started=started, ended=ended, cached=cached, compute_seconds=known.seconds,
            code_blob=None if cached else self._code_blob, result_size=known.size, components=parts.components())

    def _lookup(self, key: str) -> tuple[bool, Any, Verdict | None]:
        """(found, value, the verdict that refused a stored result)."""
        recent = self._recent.get(key)
        if recent is not None:
            return True, _decode_bytes(*recent), None
        found = trusted_hit(self.store, key, self.keys[0], vouched=self._vouched)
        hit = found.hit
        if hit is None:
            return False, None, found.verdict if found.refused else None
        try:
            codec, raw = _load(self.store, hit.result)
        except (StoreCorrupted, NotFound):
            return False, None, None  # quarantined by the store; recompute
        self._recent.put(key, codec, raw)
        signers = ",".join(found.verdict.signers) if found.verdict is not None else ""
        self._know(key, _Known(hit.digest, hit.result.logical_size, signers or None, hit.result.provenance.duration_s))
        return True, _decode_bytes(codec, raw), None

    def _compute(self, key: str, parts: KeyParts, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        started, t0 = time.time(), time.perf_counter()
        value = self.func(*args, **kwargs)
        duration = time.perf_counter() - t0
        stored, codec = _encode(self.store, value, self.allow_pickle, self.func.__qualname__)
        empty = self.store.put_bytes(b"")
        result = ResultManifest(
            value=stored, stdout=empty, stderr=empty,
            provenance=Provenance(cache_key=key,
                                  inputs={n: d.removeprefix("py:") for n, d in parts.inputs.items()},
                                  runtime=parts.runtime, node=socket.gethostname(),
                                  started_at=started, ended_at=time.time(), duration_s=duration),
            meta={"codec": codec, "function": self.entrypoint, "sdk": True},
        )
        digest = self.store.put_result(result)
        commit_signed(self.store, parts.components(), result, digest, self.keys[1])
        self._recent.put(key, *_load(self.store, result))
        self._know(key, _Known(digest, result.logical_size, self.keys[1].keyid, duration))
        ended = time.time()
        DEFERRED.add(self.store, lambda: self._record(key, dict(parts.inputs), started, ended, cached=False))
        return value


@dataclass(frozen=True)
class _Known:
    """What a call's record names about its result: digest, size, who attests it, its compute seconds."""

    digest: str | None
    size: int | None
    signers: str | None
    seconds: float


def _plain_parameters(signature: inspect.Signature) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """(names, defaults) when every parameter is positional-or-keyword, so calls
    can be bound without inspect's general (and slow) algorithm."""
    params = list(signature.parameters.values())
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params), {p.name: p.default for p in params if p.default is not p.empty}


def _source(func: Callable[..., Any]) -> str:
    try:
        return textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        raise InputError(f"memoize: the source of {func.__qualname__} is not available",
                         "define the function in a .py file (not the REPL or exec)") from None


def _fingerprint(value: Any, where: str) -> str:
    """An argument's fingerprint; nesting deeper than MAX_JSON_DEPTH is an InputError
    (checked iteratively first; a RecursionError from other containers, e.g. a chain of
    dataclasses, is reported the same way)."""
    if isinstance(value, (list, tuple, dict)):
        check_json_depth(value, where)
    try:
        return fingerprint(value, where=where)
    except RecursionError:
        raise too_deep(where) from None


def _is_plain_json(value: Any, room: int = MAX_JSON_DEPTH) -> bool:
    """True only for values that come back from JSON with the same types, and nest at
    most `room` levels (deeper values go the pickle way, or are refused)."""
    if type(value) in _JSON_SCALARS:
        return not isinstance(value, float) or math.isfinite(value)
    if type(value) not in (list, dict) or room <= 0:
        return False
    if type(value) is list:
        return all(_is_plain_json(v, room - 1) for v in value)
    return all(type(k) is str and _is_plain_json(v, room - 1) for k, v in value.items())


def _encode(store: Store, value: Any, allow_pickle: bool, where: str) -> tuple[StoredValue, str]:
    if _is_plain_json(value):
        canonical_json(value)  # raises for lone surrogates and the like
        return store.put_value(value, "json"), "json"
    if isinstance(value, (bytes, bytearray)):
        return store.put_value(bytes(value), "bytes"), "bytes"
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray" and not value.dtype.hasobject:
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return store.put_value(buffer.getvalue(), "bytes"), "npy"
    if not allow_pickle:
        check_json_depth(value, f"the return value of {where}")
        raise InputError(f"{where} returned a {type(value).__name__}, which is not JSON, bytes or an array",
                         "return plain data, or memoize(allow_pickle=True)")
    try:
        data = pickle.dumps(value, protocol=5)
    except RecursionError:
        raise too_deep(f"the return value of {where}") from None
    return store.put_value(data, "bytes"), "pickle"


def _load(store: Store, result: ResultManifest) -> tuple[str, bytes]:
    """The verified encoded value: JSON text, raw bytes, .npy or pickle bytes."""
    codec = str(result.meta.get("codec", "json"))
    value = store.load_value(result.value)
    return codec, canonical_json(value) if codec == "json" else value


def _decode_bytes(codec: str, raw: bytes) -> Any:
    """A fresh object on every hit, so a caller mutating one result never
    changes what the next hit returns."""
    if codec == "json":
        return json.loads(raw)
    if codec == "bytes":
        return raw
    if codec == "npy":
        import numpy as np

        return np.load(io.BytesIO(raw), allow_pickle=False)
    if codec == "pickle":
        # Only our own store's verified (and, with a signer, signed) bytes reach here.
        return pickle.loads(raw)
    raise StoreCorrupted(f"result codec {codec!r} is unknown", "upgrade memoplane or clear the entry")


@overload
def memoize(func: F) -> F: ...
@overload
def memoize(*, store: Store | str | Path | None = None, version: str = "",
            ignore: Iterable[str] = (), allow_pickle: bool = True,
            memory_bytes: int = 64 << 20) -> Callable[[F], F]: ...


def memoize(func: Callable[..., Any] | None = None, *, store: Store | str | Path | None = None,
            version: str = "", ignore: Iterable[str] = (), allow_pickle: bool = True,
            memory_bytes: int = 64 << 20) -> Any:
    """Remember a function's results by the content of its code and arguments.

    store: a Store or directory (default: $MEMOPLANE_STORE or ~/.cache/memoplane/store);
    version: a salt, bump it when something the key cannot see changed;
    ignore: parameter names left out of the key (e.g. verbose, n_jobs);
    allow_pickle: store other return types with pickle (read back only when a key you trust
    signed them: trust only keys whose holders would not plant code);
    memory_bytes: encoded results kept in this process after their first verified
    read, so repeated hits skip the store (0 turns it off).
    """
    def wrap(f: Callable[..., Any]) -> Any:
        return Memoized(f, store=store, version=version, ignore=ignore, allow_pickle=allow_pickle,
                        memory_bytes=memory_bytes)

    return wrap(func) if func is not None else wrap
