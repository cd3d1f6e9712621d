"""The two attention paths: ``jax.nn.dot_product_attention`` (taken on GPUs) and the einsum
form (taken elsewhere) compute the same thing, with the shapes the model gives them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model.layers import attention, einsum_attention, fused_attention
from aurora_loop.model.windows import shifted_window_mask


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_fused_attention_matches_the_einsum_form(dtype, tol) -> None:
    keys = jax.random.split(jax.random.key(0), 4)
    # Shifted windows: (batch groups, windows, heads, tokens, head dim) with the window mask as bias.
    mask = jnp.asarray(shifted_window_mask((2, 4, 8), (2, 2, 4), (1, 1, 2)))  # (nW, N, N)
    nw, n = mask.shape[0], mask.shape[1]
    q, k, v = (jax.random.normal(key, (3, nw, 4, n, 8), dtype) for key in keys[:3])
    bias = mask[None, :, None]
    expected = einsum_attention(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(fused_attention(q, k, v, bias), np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)
    assert float(jnp.abs(expected).max()) > 0.1
    # Perceiver: (examples, heads, latents, head dim) against (examples, heads, levels, head dim), no bias.
    q2 = jax.random.normal(keys[3], (5, 2, 3, 8), dtype)
    k2 = v2 = jax.random.normal(keys[0], (5, 2, 7, 8), dtype)
    np.testing.assert_allclose(np.asarray(fused_attention(q2, k2, v2), np.float32),
                               np.asarray(einsum_attention(q2, k2, v2), np.float32), atol=tol, rtol=tol)
    # Off a GPU the model takes the einsum form.
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(attention(q, k, v, bias)), np.asarray(expected))
