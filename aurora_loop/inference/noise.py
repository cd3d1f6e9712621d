"""A stochastic model's noise in a forecast (Aurora 1.5's ensemble model).

Every forecast row (example) draws its noise from its own key: ``jax.random.key(seed)``
folded with the ensemble member, then with the initial time (:func:`member_keys`), so a
forecast does not depend on the batching, and member 0 is what the same seed gives without
an ensemble. :class:`RowNoise` draws (b, L', D) standard-normal float32 noise per forward
pass (L' tokens of the first backbone stage, D = embed_dim;
:func:`aurora_loop.model.aurora.noise_shape`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from aurora_loop.model.aurora import AccumulatedNoise


def member_keys(seed: int, member: int, init_hours: np.ndarray) -> Any:
    """(b,) PRNG keys of one member's forecasts from ``init_hours`` (hours since 1970):
    ``key(seed)`` folded with the member, then with each initial time (in minutes)."""
    import jax
    import jax.numpy as jnp

    minutes = (np.round(np.asarray(init_hours, np.float64) * 60.0).astype(np.int64) % (1 << 32)).astype(np.uint32)
    base = jax.random.fold_in(jax.random.key(int(seed)), int(member))
    return jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.asarray(minutes))


@functools.lru_cache(maxsize=8)
def _noise_draw(shape: tuple[int, ...], sharding: Any) -> Any:
    """Jitted ``keys (b,) -> (next keys, noise (b, *shape))``: one standard-normal draw per row."""
    import jax
    import jax.numpy as jnp

    def draw(keys: Any) -> tuple[Any, Any]:
        pairs = jax.vmap(jax.random.split)(keys)
        return pairs[:, 0], jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(pairs[:, 1])

    return jax.jit(draw, out_shardings=(sharding, sharding)) if sharding is not None else jax.jit(draw)


class RowNoise(AccumulatedNoise):
    """A stochastic Aurora's noise for a roll-out's forward passes, (b, L', D) each, every row
    (example) drawn from its own key (:func:`member_keys`); accumulated over ``accumulate``
    passes as :class:`aurora_loop.model.aurora.AccumulatedNoise` (the reference's noise
    accumulation over a main step's sub-steps)."""

    def __init__(self, keys: Any, shape: tuple[int, ...], accumulate: int = 0, sharding: Any = None) -> None:
        import jax

        super().__init__(accumulate)
        self.keys = keys if sharding is None else jax.device_put(keys, sharding)
        self._draw = _noise_draw(tuple(int(v) for v in shape), sharding)

    def _fresh(self) -> Any:
        self.keys, noise = self._draw(self.keys)
        return noise
