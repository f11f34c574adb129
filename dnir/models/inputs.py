"""Random inputs drawn the way real layers feed the kernel: gates g <= 0, beta in
(0, 1), unit-norm keys (unless the graph normalises them itself)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..types import numpy_dtype
from .config import DeltaNetConfig
from .reference import l2normalize


def random_inputs(cfg: DeltaNetConfig, rng) -> dict[str, np.ndarray]:
    """Arrays by graph input name in the graph's dtypes (q, k, v, beta rounded to a half
    `cfg.dtype`; g and the state float32); rng: a numpy Generator or a seed (an integer >= 0)."""
    if isinstance(rng, (int, np.integer)) and rng < 0:
        raise InputError(f"seed {rng}: expected an integer >= 0 (NumPy's generators take no negative seed)")
    rng = np.random.default_rng(rng)
    shapes = cfg.input_shapes()

    def normal(name):
        return rng.standard_normal(shapes[name])

    q, k = normal("q"), normal("k")
    if not cfg.l2norm:
        # The delta rule is stable for beta * |k|^2 < 2; real layers normalise the keys.
        q, k = l2normalize(q), l2normalize(k)
    inputs = {
        "q": q, "k": k, "v": normal("v"),
        "g": -np.logaddexp(0.0, normal("g") - 2.0),           # -softplus: log-decay in (-inf, 0)
        "beta": 1.0 / (1.0 + np.exp(-normal("beta"))),         # sigmoid
    }
    if cfg.initial_state:
        inputs["initial_state"] = 0.5 * normal("initial_state")
    return {name: a.astype(numpy_dtype(cfg.dtype_of(name))) for name, a in inputs.items()}
