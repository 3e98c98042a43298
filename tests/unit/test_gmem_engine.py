"""The GMem engine: the mixer, reads over the 2^64 space, layers and overrides."""

from __future__ import annotations

import numpy as np
import pytest

from memoplane.errors import InputError
from memoplane.gmem import GMem, Layer, Overlay, engine, mixer, seed_digest
from memoplane.gmem.overlay import _EMPTY, HashIndex

TOP = 2**64 - 1


def test_known_answers_pin_the_value_function() -> None:
    # Changing any of these changes every stored digest: bump persist.MIXER_ID then.
    words = GMem(1337, "uint64").fetch_many([0, 1, 2, TOP])
    assert [hex(int(w)) for w in words] == [
        "0xb862df4408547997", "0xb5956692f76f90ef", "0x82534489f260b85e", "0xe0fb0e74555bf235",
    ]  # fmt: skip
    assert GMem(1337).fetch(0) == 0.7202586690039697
    assert GMem(1337, "float32").fetch(1) == pytest.approx(0.7093108892440796, abs=0)


@pytest.mark.parametrize("seed", [0, 1, 1337, 2**63, TOP])
def test_vector_kernels_match_the_scalar_reference_and_invert(seed: int) -> None:
    key = mixer.derive_key(seed)
    addrs = [0, 1, 2, 2**32, 2**63, TOP - 1, TOP, 0xDEADBEEF12345678]
    words = GMem(seed, "uint64").fetch_many(addrs)
    for a, w in zip(addrs, words.tolist(), strict=True):
        assert w == mixer.mix_scalar(a, key)
        assert mixer.unmix_scalar(w, key) == a


def test_bijection_no_collisions_on_a_block_and_distinct_keys() -> None:
    words = GMem(3, "uint64").fetch_range(2**40, 1 << 20)
    assert np.unique(words).size == words.size
    keys = {mixer.derive_key(s) for s in range(1000)}
    assert len(keys) == 1000 and all(k.mul & 1 for k in keys)


def test_range_many_and_fetch_agree_across_blocks() -> None:
    g = GMem(11, "float64")
    n = engine.BLOCK * 2 + 17
    rng = g.fetch_range(5, n)
    assert np.array_equal(rng, g.fetch_many(np.arange(5, 5 + n, dtype=np.uint64)))
    assert g.fetch(5 + n - 1) == rng[-1]


def test_the_end_of_the_address_space() -> None:
    g = GMem(1, "uint64")
    tail = g.fetch_range(TOP - 9, 10)
    assert int(tail[-1]) == mixer.mix_scalar(TOP, mixer.derive_key(1))
    assert g.fetch_range(TOP, 1)[0] == tail[-1]
    with pytest.raises(InputError):
        g.fetch_range(TOP - 9, 11)
    with pytest.raises(InputError):
        g.fetch(2**64)


@pytest.mark.parametrize("bad", [[-1], np.array([-3, 4]), [1.5], np.array([0.5]), ["7"], [2**64]])
def test_bad_addresses_are_refused_not_wrapped(bad: object) -> None:
    with pytest.raises(InputError):
        GMem(1).fetch_many(bad)  # type: ignore[arg-type]


def test_float_ranges_and_float32_is_the_top_24_bits() -> None:
    words = GMem(8, "uint64").fetch_range(0, 100_000)
    f64 = GMem(8, "float64").fetch_range(0, 100_000)
    f32 = GMem(8, "float32").fetch_range(0, 100_000)
    assert np.array_equal(f64, (words >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    assert np.array_equal(f32, ((words >> np.uint64(40)).astype(np.float64) * 2.0**-24).astype(np.float32))
    assert f64.min() >= 0 and f64.max() < 1 and f32.max() < 1 and f32.dtype == np.float32


def test_float_layers_are_a_weighted_mean_in_range() -> None:
    a = np.arange(1000, dtype=np.uint64)
    base = GMem(1).fetch_many(a)
    layer_alone = GMem(1, layers=[Layer(7, 0.5)]).fetch_many(a) * 1.5 - base
    blended = GMem(1, layers=[Layer(7, 0.5), Layer(8, 2.0)]).fetch_many(a)
    assert 0 < layer_alone.min() and layer_alone.max() < 0.5  # 0.5 * an independent uniform
    assert blended.min() >= 0 and blended.max() < 1
    assert GMem(1, layers=[{"seed": 7, "weight": 0.5}]).fetch(3) == GMem(1, layers=[Layer(7, 0.5)]).fetch(3)


def test_uint64_layers_xor_and_never_cancel_a_same_seed_base() -> None:
    a = np.arange(1000, dtype=np.uint64)
    base = GMem(5, "uint64").fetch_many(a)
    layered = GMem(5, "uint64", [Layer(5)]).fetch_many(a)
    two = GMem(5, "uint64", [Layer(5), Layer(5)]).fetch_many(a)
    assert not np.any(layered == base) and not np.any(layered == 0) and not np.any(two == base)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1, "dtype": "int8"}, "dtype"),
        ({"seed": 1, "layers": [Layer(2, 1.0)], "dtype": "uint64"}, None),
        ({"seed": 1, "layers": [{"seed": 2, "weight": 0.5}], "dtype": "uint64"}, "XOR"),
        ({"seed": 1, "layers": [{"seed": 2, "weight": 0.0}]}, "weight"),
        ({"seed": 1, "layers": [{"seed": 2, "weight": float("nan")}]}, "weight"),
    ],
)
def test_parameter_validation(kwargs: dict, match: str | None) -> None:
    if match is None:
        GMem(**kwargs)
        return
    with pytest.raises(InputError, match=match):
        GMem(**kwargs)


def test_seeds_are_mixed_into_keys_not_added_to_addresses() -> None:
    # A seed-shift design would make seed s+1 at address a equal seed s at a+1.
    a = GMem(100, "uint64").fetch_range(0, 10_000)
    b = GMem(101, "uint64").fetch_range(0, 10_000)
    assert np.intersect1d(a, b).size == 0


# -- overrides ----------------------------------------------------------------------


def test_writes_are_seen_by_every_read_path() -> None:
    g = GMem(2)
    g.write(10, 0.25)
    g.write_many([20, 30, TOP], [0.5, 0.75, 2.5])
    assert g.fetch(10) == 0.25 and g.fetch(TOP) == 2.5
    r = g.fetch_range(0, 40)
    assert r[10] == 0.25 and r[20] == 0.5 and r[30] == 0.75 and r[11] == g.generated([11])[0]
    assert g.fetch_many([30, 31, 10]).tolist()[::2] == [0.75, 0.25]
    assert g.fetch_range(TOP, 1)[0] == 2.5
    assert g.generated([10])[0] != 0.25


def test_later_writes_win_within_and_across_batches() -> None:
    g = GMem(2, "uint64")
    g.write_many([5, 6, 5], [1, 2, 3])
    assert g.fetch(5) == 3
    g.write(5, 4)
    g.write_many([6], [7])
    assert g.fetch_many([5, 6]).tolist() == [4, 7]
    assert len(g.overlay) == 2


def test_write_validation() -> None:
    g = GMem(2, "uint64")
    with pytest.raises(InputError):
        g.write_many([1, 2], [1])
    with pytest.raises(InputError):
        g.write(1, -1)
    with pytest.raises(InputError):
        g.write(-1, 1)


def test_large_overlay_matches_a_dict_through_all_tiers() -> None:
    rng = np.random.default_rng(3)
    g = GMem(9, "float64")
    ref: dict[int, float] = {}
    pool = rng.integers(0, 2**64 - 1, size=50_000, dtype=np.uint64, endpoint=True)
    pool[:3] = [0, TOP, _EMPTY]  # the edges and the hash table's free-slot marker
    for i in range(12):  # batches of mixed sizes exercise delta, base and merges
        idx = rng.integers(0, pool.size, size=int(rng.integers(1, 30_000)))
        vals = rng.random(idx.size)
        g.write_many(pool[idx], vals)
        ref.update(zip(pool[idx].tolist(), vals.tolist(), strict=True))
        if i % 4 == 3:
            g.write(int(pool[0]), float(i))
            ref[int(pool[0])] = float(i)
        q = np.concatenate([pool[rng.integers(0, pool.size, size=5000)], pool[:3]])
        expect = g.generated(q)
        for j, a in enumerate(q.tolist()):
            if a in ref:
                expect[j] = ref[a]
        assert np.array_equal(g.fetch_many(q), expect)
        assert len(g.overlay) == len(ref)
    keys, values = g.overlay.to_arrays()
    assert keys.tolist() == sorted(ref) and values.tolist() == [ref[k] for k in sorted(ref)]


def test_hash_index_probes_through_clusters() -> None:
    keys = np.arange(0, 5000, dtype=np.uint64) * np.uint64(2**52)  # few distinct homes
    idx = HashIndex(keys, keys.copy())
    q = np.concatenate([keys, keys + np.uint64(1)])
    pos, vals = idx.lookup(q)
    assert sorted(pos.tolist()) == list(range(5000)) and np.array_equal(vals, q[pos])


def test_overlay_from_arrays_needs_no_store_and_keeps_its_digest() -> None:
    g = GMem(4, "float32")
    g.write_many([1, 2, 3], [0.5, 0.25, 0.125])
    keys, values = g.overlay.to_arrays()
    sandboxed = GMem(4, "float32", overlay=Overlay.from_arrays(keys, values))
    assert np.array_equal(sandboxed.fetch_range(0, 5), g.fetch_range(0, 5))
    assert seed_digest(sandboxed.params, sandboxed.overlay) == seed_digest(g.params, g.overlay)
    with pytest.raises(InputError):
        GMem(4, "float64", overlay=sandboxed.overlay)


def test_digest_covers_parameters_and_overlay_state_not_history() -> None:
    def digest(seed: int = 1, dtype: str = "float64", layers: tuple = (), writes: tuple = ()) -> str:
        g = GMem(seed, dtype, layers)  # type: ignore[arg-type]
        for batch in writes:
            g.write_many(*batch)
        return seed_digest(g.params, g.overlay)

    base = digest()
    assert base.startswith("b3:") and len(base) == 67
    others = {
        digest(seed=2), digest(dtype="float32"), digest(layers=(Layer(3, 0.5),)),
        digest(layers=(Layer(3, 0.25),)), digest(writes=(([1], [0.5]),)),
    }  # fmt: skip
    assert base not in others and len(others) == 5
    one = digest(writes=(([1, 2], [0.5, 0.25]),))
    assert one == digest(writes=(([2], [0.1]), ([1], [0.5]), ([2], [0.25])))
    assert GMem(1).params == GMem(1, layers=()).params
