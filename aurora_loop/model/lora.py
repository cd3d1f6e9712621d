"""LoRA adapters of the backbone's attention projections, chosen per roll-out step."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any


class LoRARollout(nn.Module):
    """Low-rank correction ``x @ A @ B * alpha / r`` for roll-out step ``step``.

    Parameters: ``lora_A`` (n, in, r) and ``lora_B`` (n, r, out), n = ``max_steps`` in mode
    ``all`` and 1 otherwise. Modes: ``single`` (one adapter for steps < max_steps),
    ``from_second`` (none at step 0, one shared adapter for 1 <= step < max_steps), ``all``
    (adapter ``step`` for step < max_steps). ``step`` may be a Python int or a traced int.
    ``A`` starts as the default init of a linear layer and ``B`` at zero, so a fresh adapter
    changes nothing.
    """

    out_features: int
    r: int = 8
    alpha: float = 8.0
    max_steps: int = 40
    mode: str = "single"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, step: int | Array) -> Array:
        n = self.max_steps if self.mode == "all" else 1
        fan_in = x.shape[-1]
        bound = 1.0 / fan_in**0.5

        def init_a(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        lora_a = self.param("lora_A", init_a, (n, fan_in, self.r), jnp.float32)
        lora_b = self.param("lora_B", nn.initializers.zeros, (n, self.r, self.out_features), jnp.float32)
        scaling = self.alpha / self.r
        dtype = self.dtype or jnp.result_type(x, lora_a)

        def correction(index: int | Array) -> Array:
            a, b = lora_a[index].astype(dtype), lora_b[index].astype(dtype)
            return (x.astype(dtype) @ a @ b) * scaling

        if isinstance(step, int):
            if step < 0:
                raise ValueError(f"the roll-out step must be non-negative, got {step}")
            if step >= self.max_steps or (self.mode == "from_second" and step == 0):
                return jnp.zeros((), dtype)
            return correction(step if self.mode == "all" else 0)
        step = jnp.asarray(step, jnp.int32)
        active = step < self.max_steps
        if self.mode == "from_second":
            active = active & (step > 0)
        index = jnp.clip(step, 0, n - 1) if self.mode == "all" else 0
        return jnp.where(active, correction(index), jnp.zeros((), dtype))
