"""GMemLinear: generated weights from a seed and a parameter vector."""

from __future__ import annotations

import numpy as np
import pytest

from memoplane.errors import InputError
from memoplane.gmem import GMemLinear


def test_weights_are_deterministic_scaled_and_linear_in_theta() -> None:
    a = GMemLinear(3, 256, 128, [1.0, 0.0])
    b = GMemLinear(3, 256, 128, [0.0, 1.0])
    ab = GMemLinear(3, 256, 128, [2.0, -0.5])
    assert np.array_equal(a.weight(), GMemLinear(3, 256, 128, [1.0, 0.0]).weight())
    assert np.allclose(ab.weight(), 2.0 * a.weight() - 0.5 * b.weight())
    w = a.weight()
    assert abs(w.mean()) < 4 * np.sqrt(1 / 256 / w.size) and w.var() == pytest.approx(1 / 256, rel=0.02)
    assert abs(np.corrcoef(a.weight().ravel(), b.weight().ravel())[0, 1]) < 0.02  # bases independent
    assert not np.allclose(GMemLinear(4, 256, 128, [1.0, 0.0]).weight(), w)


def test_theta_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x, target = rng.normal(size=(8, 16)), rng.normal(size=(8, 4))
    theta = rng.normal(size=3)

    def loss(t: np.ndarray) -> float:
        return float(0.5 * ((GMemLinear(9, 16, 4, t).forward(x) - target) ** 2).sum())

    layer = GMemLinear(9, 16, 4, theta)
    grad = layer.theta_grad(x, layer.forward(x) - target)
    eps = 1e-6
    numeric = [(loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps) for e in np.eye(3)]
    assert np.allclose(grad, numeric, rtol=1e-5)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(InputError):
        GMemLinear(1, 0, 4, [1.0])
    with pytest.raises(InputError):
        GMemLinear(1, 4, 4, [])
    with pytest.raises(InputError):
        GMemLinear(1, 2**32, 2**32, [1.0])
