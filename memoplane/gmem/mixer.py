"""The keyed 64-bit bijection behind every generated value.

    x = addr * k_mul + k_add                      (affine, k_mul odd: a bijection)
    x = splitmix64_finalizer(x)                   (Stafford "mix13")
    x = x + k_mid                                 (key between the rounds)
    x = moremur(x)                                (Evensen's finalizer, other shifts)

Every step is invertible mod 2^64 (odd multiply, xorshift, add), so the map is a
permutation of the 64-bit space: distinct addresses never collide (see `unmix`).
The keys come from the seed through a SplitMix64 stream, so seeds s and s+1 get
unrelated multipliers and offsets: their streams are not shifted views of one
another, unlike `addr + seed` designs. Round 1 alone is SplitMix64 with a per-seed
gamma; round 2 removes what is left of the affine structure between seeds (related
gammas) and of fmix-style weaknesses on counter inputs.

The kernels work in place on caller-owned uint64 buffers: numpy's uint64 multiply
wraps mod 2^64, and reusing two block-sized buffers keeps the working set in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64 = np.uint64
MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_SM1, _SM2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finalizer
_MM1, _MM2 = 0x3C79AC492BA7B653, 0x1C69B3F74AC4AE35  # moremur
_ROUND1 = ((30, _SM1), (27, _SM2), (31, 0))
_ROUND2 = ((27, _MM1), (33, _MM2), (27, 0))

U64Array = npt.NDArray[np.uint64]


def splitmix64(x: int) -> int:
    """The SplitMix64 finalizer on a Python int (used for key derivation)."""
    x &= MASK
    x = ((x ^ (x >> 30)) * _SM1) & MASK
    x = ((x ^ (x >> 27)) * _SM2) & MASK
    return x ^ (x >> 31)


def _gamma(z: int) -> int:
    """An odd multiplier with many bit transitions (SplitMix's mixGamma rule)."""
    z = splitmix64(z) | 1
    if (z ^ (z >> 1)).bit_count() < 24:
        z ^= 0xAAAAAAAAAAAAAAAA
    return z


@dataclass(frozen=True)
class Key:
    """Per-stream key material: k_mul odd, k_add and k_mid arbitrary."""

    mul: int
    add: int
    mid: int


def derive_key(seed: int, domain: int = 0) -> Key:
    """Key for (seed, domain); domain 0 is a GMem's base stream, i+1 its layer i."""
    if not 0 <= seed <= MASK:
        raise ValueError(f"seed {seed} is outside 0..2^64-1")
    state = splitmix64(seed ^ splitmix64(domain * GOLDEN + 0x6D656D6F706C616E))
    words = []
    for _ in range(3):
        state = (state + GOLDEN) & MASK
        words.append(state)
    return Key(mul=_gamma(words[0]), add=splitmix64(words[1]), mid=splitmix64(words[2]))


def mix_scalar(addr: int, key: Key) -> int:
    """Reference implementation on Python ints; the vector kernels must match it."""
    x = (addr * key.mul + key.add) & MASK
    for shift, mult in _ROUND1:
        x ^= x >> shift
        x = (x * mult) & MASK if mult else x
    x = (x + key.mid) & MASK
    for shift, mult in _ROUND2:
        x ^= x >> shift
        x = (x * mult) & MASK if mult else x
    return x


def unmix_scalar(value: int, key: Key) -> int:
    """The inverse of `mix_scalar`: proof by construction that the map is a bijection."""
    x = value & MASK
    for shift, mult in reversed(_ROUND2):
        x = (x * pow(mult, -1, 1 << 64)) & MASK if mult else x
        x = _unxorshift(x, shift)
    x = (x - key.mid) & MASK
    for shift, mult in reversed(_ROUND1):
        x = (x * pow(mult, -1, 1 << 64)) & MASK if mult else x
        x = _unxorshift(x, shift)
    return ((x - key.add) * pow(key.mul, -1, 1 << 64)) & MASK


def _unxorshift(x: int, shift: int) -> int:
    y = x
    for _ in range(64 // shift + 1):
        y = x ^ (y >> shift)
    return y


def _xorshift(x: U64Array, tmp: U64Array, shift: np.uint64) -> None:
    np.right_shift(x, shift, out=tmp)
    np.bitwise_xor(x, tmp, out=x)


_R1 = [(U64(s), U64(m) if m else None) for s, m in _ROUND1]
_R2 = [(U64(s), U64(m) if m else None) for s, m in _ROUND2]


def finish(x: U64Array, tmp: U64Array, key: Key) -> None:
    """Both rounds, in place, on x that already holds addr * k_mul + k_add."""
    for shift, mult in _R1:
        _xorshift(x, tmp, shift)
        if mult is not None:
            np.multiply(x, mult, out=x)
    np.add(x, U64(key.mid), out=x)
    for shift, mult in _R2:
        _xorshift(x, tmp, shift)
        if mult is not None:
            np.multiply(x, mult, out=x)


def mix_into(addrs: U64Array, out: U64Array, tmp: U64Array, key: Key) -> None:
    """out[:] = mix(addrs) for arbitrary addresses; out and tmp are scratch-sized."""
    np.multiply(addrs, U64(key.mul), out=out)
    np.add(out, U64(key.add), out=out)
    finish(out, tmp, key)


def ramp(key: Key, size: int) -> U64Array:
    """i * k_mul for i < size: a contiguous block is then one scalar add away."""
    r = np.arange(size, dtype=np.uint64)
    np.multiply(r, U64(key.mul), out=r)
    return r


def mix_range_into(offset: int, ramp_: U64Array, out: U64Array, tmp: U64Array, key: Key) -> None:
    """out[:n] = mix(offset + i) using (offset + i)*k_mul + k_add = ramp[i] + const."""
    n = out.shape[0]
    const = U64((offset * key.mul + key.add) & MASK)
    np.add(ramp_[:n], const, out=out)
    finish(out, tmp[:n], key)
