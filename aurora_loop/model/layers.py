"""Small building blocks shared by the encoder, backbone and decoder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Dtype = Any

KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.02)  # the reference's init of linear layers


def gelu(x: Array) -> Array:
    """The exact (erf) GELU, as ``torch.nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


def dense(features: int, name: str, use_bias: bool = True, dtype: Dtype | None = None) -> nn.Dense:
    """A float32-parameter linear layer computing in ``dtype`` (None: the inputs' dtype)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT, name=name
    )


def layer_norm(name: str, eps: float = 1e-5, affine: bool = True, dtype: Dtype | None = None) -> nn.LayerNorm:
    """Layer norm over the last axis with the two-pass variance of ``torch.nn.LayerNorm``."""
    return nn.LayerNorm(
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``hidden``; (..., D) -> (..., D)."""

    hidden: int
    act: str = "gelu"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = dense(self.hidden, "fc1", dtype=self.dtype)(x)
        y = gelu(y) if self.act == "gelu" else nn.silu(y)
        return dense(x.shape[-1], "fc2", dtype=self.dtype)(y)


def attention(q: Array, k: Array, v: Array, bias: Array | None = None) -> Array:
    """Softmax attention over heads: q (..., H, Lq, Dh), k/v (..., H, Lk, Dh) -> (..., H, Lq, Dh).

    ``bias`` (broadcastable to (..., H, Lq, Lk)) is added to the logits; the softmax runs in
    at least float32. On a GPU this is :func:`fused_attention` (cuDNN's fused kernels where
    they apply); elsewhere :func:`einsum_attention`, which XLA:CPU runs as fast
    (``benchmarks/attention.py``). Both agree to float32 rounding (the parity tests pass
    with either).
    """
    if jax.default_backend() == "gpu":
        return fused_attention(q, k, v, bias)
    return einsum_attention(q, k, v, bias)


def einsum_attention(q: Array, k: Array, v: Array, bias: Array | None = None) -> Array:
    """:func:`attention` as two einsums around a float32 softmax."""
    scale = q.shape[-1] ** -0.5
    exact = float(np.log2(scale)).is_integer()
    if exact:  # a power of two scales q exactly, and XLA:CPU need not expand the scale to the logits' shape
        q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("...qd,...kd->...qk", q, k)
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(acc)
    if not exact:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(acc)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v)


def fused_attention(q: Array, k: Array, v: Array, bias: Array | None = None) -> Array:
    """:func:`attention` through ``jax.nn.dot_product_attention`` (same shapes and maths).

    The leading dims fold into one batch dim, heads move behind the sequence (the layout
    the fused kernels take), and ``bias`` is broadcast over the folded batch.
    """
    lead, (h, lq, dh), lk = q.shape[:-3], q.shape[-3:], k.shape[-2]
    n = int(np.prod(lead)) if lead else 1

    def fold(x: Array, length: int) -> Array:
        return x.reshape(n, h, length, dh).swapaxes(1, 2)  # (N, L, H, Dh)

    b = None
    if bias is not None:
        b = jnp.broadcast_to(bias, (*lead, h if bias.shape[-3] != 1 else 1, lq, lk)).reshape(n, -1, lq, lk).astype(q.dtype)
    out = jax.nn.dot_product_attention(fold(q, lq), fold(k, lk), fold(v, lk), bias=b)
    return out.swapaxes(1, 2).reshape(*lead, h, lq, dh)
