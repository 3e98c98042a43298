"""GMem: a deterministic dataset over the 2^64 address space, computed on read.

Values. Each stream (the base, then each layer) maps an address through the keyed
bijection in `mixer` to a uint64 word w. As a float it is the top bits:
float64 = (w >> 11) * 2^-53, float32 = (w >> 40) * 2^-24, both uniform in [0, 1).

Layers. Layer i is its own stream, keyed by (layer seed, domain i + 1), so a layer
never cancels or copies the base even when it has the same seed.
- float32/float64: value = (base + sum(w_i * layer_i)) / (1 + sum(w_i)), a weighted
  mean: it stays in [0, 1) with mean 1/2, but is no longer uniform once layers exist
  (it is a weighted sum of independent uniforms), which is the point of blending.
- uint64: value = base XOR layer_1 XOR ...; XOR with an independent uniform word
  keeps the result uniform. Weights have no meaning for bits, so they must be 1.

Overrides. `write`/`write_many` set values in an `Overlay`; every read applies it.
If a journal is attached (see `persist`), `write_many` appends one durable batch
before the overlay changes, and `write` buffers until `flush()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from . import mixer
from .mixer import MASK, U64, Key, U64Array
from .overlay import Overlay, Tier

DType = Literal["float32", "float64", "uint64"]
DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float64": np.float64, "uint64": np.uint64}
BLOCK = 1 << 15  # elements per block: x, tmp and ramp (3 x 256 KiB) stay in L2 (measured best)
_LAST_BELOW_ONE = {np.float32: np.nextafter(np.float32(1), np.float32(0)), np.float64: np.nextafter(1.0, 0.0)}


@dataclass(frozen=True)
class Layer:
    """A stream blended into the base; see the module docstring for the rule."""

    seed: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_seed(self.seed, "layer seed")
        w = float(self.weight)
        if not (math.isfinite(w) and w > 0):
            raise InputError(f"layer weight {self.weight!r} is not a positive finite number", "use e.g. 0.5")
        object.__setattr__(self, "weight", w)


@dataclass(frozen=True)
class GMemParams:
    """Everything that determines the generated values (the overlay aside)."""

    seed: int
    dtype: DType = "float64"
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_seed(self.seed, "seed")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r} is not supported", "use float32, float64 or uint64")
        layers = tuple(x if isinstance(x, Layer) else Layer(**x) for x in self.layers)
        if self.dtype == "uint64" and any(x.weight != 1.0 for x in layers):
            raise InputError("uint64 layers combine by XOR and take no weight", "set every layer weight to 1")
        object.__setattr__(self, "layers", layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "dtype": self.dtype,
            "layers": [{"seed": x.seed, "weight": x.weight} for x in self.layers],
        }


def _check_seed(seed: object, what: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK:
        raise InputError(f"{what} {seed!r} is not an integer in 0..2^64-1", "use a non-negative 64-bit integer")


class Journal(Protocol):
    """Where `write_many` makes a batch durable before the overlay changes."""

    def append(self, addrs: U64Array, bits: U64Array) -> None: ...


def to_bits(values: np.ndarray) -> U64Array:
    """Values as 8-byte words for the log: float32 bits sit in the low half."""
    if values.dtype == np.float32:
        return values.view(np.uint32).astype(np.uint64)
    return values.view(np.uint64)


def from_bits(bits: U64Array, dtype: np.dtype) -> np.ndarray:
    if dtype == np.float32:
        return bits.astype(np.uint32).view(np.float32)
    return bits.view(dtype)


class GMem:
    """A procedural dataset: `fetch*` compute values; writes override them.

    Reads never need the store: pass a snapshot as `Overlay.from_arrays(...)`.
    Reads are safe from several threads; writes need external serialisation.
    """

    def __init__(
        self,
        seed: int,
        dtype: DType = "float64",
        layers: Iterable[Layer | dict[str, Any]] = (),
        *,
        overlay: Overlay | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.params = GMemParams(seed, dtype, tuple(layers))  # type: ignore[arg-type]
        self.dtype = np.dtype(DTYPES[dtype])
        self._keys = [mixer.derive_key(seed, 0)] + [
            mixer.derive_key(x.seed, i + 1) for i, x in enumerate(self.params.layers)
        ]
        self._weights = [1.0] + [x.weight for x in self.params.layers]
        self._ramps = [mixer.ramp(k, BLOCK) for k in self._keys]
        self.overlay = overlay if overlay is not None else Overlay(self.dtype)
        if self.overlay.dtype != self.dtype:
            raise InputError(f"overlay holds {self.overlay.dtype}, GMem is {self.dtype}", "use one dtype")
        self.journal = journal
        self._unflushed: list[tuple[int, Any]] = []

    # -- reads -----------------------------------------------------------------

    def fetch(self, addr: int) -> Any:
        """The value at one address, as a Python float or int."""
        return self.fetch_many(np.array([_check_addr(addr)], dtype=np.uint64))[0].item()

    def fetch_range(self, offset: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values at offset, offset + 1, ..., offset + count - 1."""
        _check_addr(offset)
        if count < 0 or offset + count > 1 << 64:
            raise InputError(f"range {offset}+{count} leaves the 2^64 address space", "shrink count")
        out = self._out(count, out)
        x = np.empty(BLOCK, dtype=np.uint64)
        tmp = np.empty(BLOCK, dtype=np.uint64)
        for start in range(0, count, BLOCK):
            n = min(BLOCK, count - start)
            self._block(out[start : start + n], x[:n], tmp[:n], offset + start, None)
        self.overlay.apply_range(offset, out)
        return out

    def fetch_many(self, addresses: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
        """Values at arbitrary addresses (any order, repeats allowed)."""
        addrs = as_addresses(addresses)
        return self._generate(addrs, out, self.overlay.tiers())

    def generated(self, addresses: npt.ArrayLike) -> np.ndarray:
        """The values before overrides (what an address held when the seed was made)."""
        return self._generate(as_addresses(addresses), None, [])

    def _generate(self, addrs: U64Array, out: np.ndarray | None, tiers: list[Tier]) -> np.ndarray:
        out = self._out(addrs.shape[0], out)
        x, tmp = np.empty(BLOCK, dtype=np.uint64), np.empty(BLOCK, dtype=np.uint64)
        for start in range(0, addrs.shape[0], BLOCK):
            a = addrs[start : start + BLOCK]
            n = a.shape[0]
            dst = out[start : start + n]
            self._block(dst, x[:n], tmp[:n], 0, a)
            for tier in tiers:  # per block: the lookup's temporaries stay in cache
                tier.apply_many(a, dst)
        return out

    def _out(self, n: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty(n, dtype=self.dtype)
        if out.shape != (n,) or out.dtype != self.dtype:
            raise InputError(f"out must be a ({n},) {self.dtype} array", "allocate it with np.empty")
        return out

    def _words(self, i: int, x: U64Array, tmp: U64Array, offset: int, addrs: U64Array | None) -> None:
        """x = stream i's words for the block (contiguous from offset, or addrs)."""
        key: Key = self._keys[i]
        if addrs is None:
            mixer.mix_range_into(offset, self._ramps[i], x, tmp, key)
        else:
            mixer.mix_into(addrs, x, tmp, key)

    def _block(self, dst: np.ndarray, x: U64Array, tmp: U64Array, offset: int, addrs: U64Array | None) -> None:
        if self.dtype == np.uint64:
            self._words(0, dst, tmp, offset, addrs)
            for i in range(1, len(self._keys)):
                self._words(i, x, tmp, offset, addrs)
                np.bitwise_xor(dst, x, out=dst)
            return
        self._words(0, x, tmp, offset, addrs)
        _to_float(x, tmp, dst)
        if len(self._keys) == 1:
            return
        acc = np.empty(dst.shape[0], dtype=self.dtype)
        for i in range(1, len(self._keys)):
            self._words(i, x, tmp, offset, addrs)
            _to_float(x, tmp, acc)
            np.multiply(acc, self.dtype.type(self._weights[i]), out=acc)
            np.add(dst, acc, out=dst)
        np.multiply(dst, self.dtype.type(1.0 / sum(self._weights)), out=dst)
        # Rounding may reach 1.0 exactly; the documented range is [0, 1).
        np.minimum(dst, _LAST_BELOW_ONE[self.dtype.type], out=dst)

    # -- writes ----------------------------------------------------------------

    def write(self, addr: int, value: Any) -> None:
        """Override one address; with a journal it is durable after `flush()`."""
        a = np.array([_check_addr(addr)], dtype=np.uint64)
        v = _as_values([value], self.dtype)
        self.overlay.put_many(a, v)
        if self.journal is not None:
            self._unflushed.append((int(a[0]), v[0]))

    def write_many(self, addresses: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Override many addresses as one batch; later entries win over earlier ones.

        With a journal the batch is durable (and atomic under a crash) on return.
        """
        addrs = as_addresses(addresses)
        vals = _as_values(values, self.dtype)
        if vals.shape != addrs.shape:
            raise InputError(f"{addrs.shape[0]} addresses but {vals.shape[0]} values", "pass one value each")
        self.flush()
        if self.journal is not None:
            self.journal.append(addrs, to_bits(vals))
        self.overlay.put_many(addrs, vals)

    def flush(self) -> None:
        """Make single `write`s durable as one batch (no-op without a journal)."""
        if self.journal is None or not self._unflushed:
            return
        pending, self._unflushed = self._unflushed, []  # the journal may call flush() again
        addrs = np.array([a for a, _ in pending], dtype=np.uint64)
        vals = np.array([v for _, v in pending], dtype=self.dtype)
        try:
            self.journal.append(addrs, to_bits(vals))
        except BaseException:
            self._unflushed = pending + self._unflushed
            raise


def _to_float(x: U64Array, tmp: U64Array, dst: np.ndarray) -> None:
    """Top 53 (float64) or 24 (float32) bits of x, scaled to [0, 1); exact.

    The shifted word fits in int64, and numpy converts int64 to float with SIMD but
    uint64 through a slower path: the view is free and measured ~1.5x faster."""
    np.right_shift(x, U64(11 if dst.dtype == np.float64 else 40), out=tmp)
    np.copyto(dst, tmp.view(np.int64), casting="unsafe")
    np.multiply(dst, dst.dtype.type(2.0**-53 if dst.dtype == np.float64 else 2.0**-24), out=dst)


def _check_addr(addr: object) -> int:
    if isinstance(addr, (bool, float)) or not isinstance(addr, (int, np.integer)) or not 0 <= int(addr) <= MASK:
        raise InputError(f"address {addr!r} is not an integer in 0..2^64-1", "use a non-negative 64-bit integer")
    return int(addr)


def as_addresses(addresses: npt.ArrayLike) -> U64Array:
    """A 1-D uint64 array, refusing negatives and non-integers instead of wrapping."""
    if not isinstance(addresses, np.ndarray):
        items = np.ravel(np.asarray(addresses, dtype=object))
        return np.array([_check_addr(a) for a in items.tolist()], dtype=np.uint64)
    flat = np.ravel(addresses)
    if flat.dtype == np.uint64:
        return flat
    if flat.dtype.kind == "u":
        return flat.astype(np.uint64)
    if flat.dtype.kind == "i":
        if flat.size and int(flat.min()) < 0:
            raise InputError("a negative address was given", "addresses are 0..2^64-1")
        return flat.astype(np.uint64)
    if flat.dtype == object:
        return as_addresses(flat.tolist())
    raise InputError(f"addresses of dtype {flat.dtype} are not integers", "pass integer addresses")


def _as_values(values: npt.ArrayLike | Sequence[Any], dtype: np.dtype) -> np.ndarray:
    try:
        return np.ravel(np.asarray(values, dtype=dtype))
    except (OverflowError, TypeError, ValueError) as e:
        raise InputError(f"values do not fit {dtype} ({e})", f"pass {dtype} values") from e
