"""Perceiver cross-attention blocks: aggregate pressure levels into latent levels and back."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aurora_loop.model.layers import MLP, attention, dense, layer_norm

Array = Any


class PerceiverAttention(nn.Module):
    """Cross-attention of latents (N, L1, D) to a context (N, L2, D) -> (N, L1, D).

    Latents shared by all N (e.g. learnt queries) may be passed once, as (L1, D): they are
    projected once and only then broadcast, instead of projecting N identical copies.
    """

    head_dim: int
    num_heads: int
    ln_k_q: bool = False

    @nn.compact
    def __call__(self, latents: Array, context: Array) -> Array:
        inner = self.head_dim * self.num_heads
        q = dense(inner, "to_q", use_bias=False)(latents)
        k, v = jnp.split(dense(2 * inner, "to_kv", use_bias=False)(context), 2, axis=-1)
        if self.ln_k_q:
            k = layer_norm("ln_k")(k)
            q = layer_norm("ln_q")(q)
        q = jnp.broadcast_to(q, (*context.shape[:-2], *q.shape[-2:]))

        def heads(t: Array) -> Array:  # (N, L, H*Dh) -> (N, H, L, Dh)
            return t.reshape(*t.shape[:-1], self.num_heads, self.head_dim).swapaxes(-2, -3)

        out = attention(heads(q), heads(k), heads(v)).swapaxes(-2, -3)
        out = out.reshape(*out.shape[:-2], inner)
        return dense(latents.shape[-1], "to_out", use_bias=False)(out)


class PerceiverBlock(nn.Module):
    """Post-norm residual block: ``x += ln1(attn(x, ctx)); x += ln2(ff(x))``."""

    head_dim: int
    num_heads: int
    mlp_ratio: float
    ln_eps: float
    ln_k_q: bool = False

    @nn.compact
    def __call__(self, latents: Array, context: Array) -> Array:
        d = latents.shape[-1]
        attn = PerceiverAttention(self.head_dim, self.num_heads, self.ln_k_q, name="attn")
        latents = layer_norm("ln1", self.ln_eps)(attn(latents, context)) + latents
        ff = MLP(int(d * self.mlp_ratio), name="ff")
        return layer_norm("ln2", self.ln_eps)(ff(latents)) + latents


class PerceiverResampler(nn.Module):
    """``depth`` Perceiver blocks; latents (N, L1, D) or shared (L1, D), context (N, L2, D) -> (N, L1, D)."""

    depth: int
    head_dim: int
    num_heads: int
    mlp_ratio: float
    ln_eps: float = 1e-5
    ln_k_q: bool = False

    @nn.compact
    def __call__(self, latents: Array, context: Array) -> Array:
        for i in range(self.depth):
            block = PerceiverBlock(
                self.head_dim, self.num_heads, self.mlp_ratio, self.ln_eps,
                ln_k_q=self.ln_k_q and i == 0, name=f"layers_{i}",
            )
            latents = block(latents, context)
        return jnp.broadcast_to(latents, (*context.shape[:-2], *latents.shape[-2:]))
