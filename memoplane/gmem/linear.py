"""GMemLinear: a linear layer whose weights are generated, not stored.

    W(theta) = sum_r theta[r] * B_r,   B_r[i, j] = sqrt(3 / in) * (2 u - 1)

where u is the GMem float64 value at address (r * in + i) * out + j of the layer's
seed. Each B_r has i.i.d. entries with mean 0 and variance 1/in (the usual
fan-in scaling), so a layer of any size is described by its seed and `rank`
numbers: the parameter vector theta is all that is trained, stored or sent.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from .engine import GMem

F64Array = npt.NDArray[np.float64]


class GMemLinear:
    """y = x @ W(theta) (+ nothing else: add a bias outside if needed)."""

    def __init__(self, seed: int, in_features: int, out_features: int, theta: npt.ArrayLike) -> None:
        self.theta = np.array(theta, dtype=np.float64).ravel()
        if in_features < 1 or out_features < 1 or self.theta.size < 1:
            raise InputError("GMemLinear needs positive sizes and at least one parameter", "check the shapes")
        if self.theta.size * in_features * out_features >= 1 << 64:
            raise InputError("the basis does not fit the 2^64 address space", "use a smaller layer or rank")
        self.gmem = GMem(seed, "float64")
        self.in_features, self.out_features = in_features, out_features

    def basis(self, r: int) -> F64Array:
        """B_r as an (in, out) array, computed on each call (nothing is kept)."""
        n = self.in_features * self.out_features
        b = self.gmem.fetch_range(r * n, n)
        b *= 2.0
        b -= 1.0
        b *= np.sqrt(3.0 / self.in_features)
        return b.reshape(self.in_features, self.out_features)

    def weight(self) -> F64Array:
        w = np.zeros((self.in_features, self.out_features))
        for r, t in enumerate(self.theta.tolist()):
            w += t * self.basis(r)
        return w

    def forward(self, x: npt.ArrayLike) -> F64Array:
        return np.asarray(x, dtype=np.float64) @ self.weight()

    def theta_grad(self, x: npt.ArrayLike, grad_out: npt.ArrayLike) -> F64Array:
        """dL/dtheta given dL/dy: <x^T grad_out, B_r> for each r."""
        g = np.asarray(x, dtype=np.float64).T @ np.asarray(grad_out, dtype=np.float64)
        return np.array([float(np.vdot(g, self.basis(r))) for r in range(self.theta.size)])
