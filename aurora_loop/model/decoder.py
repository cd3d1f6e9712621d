"""The Perceiver 3D decoder: backbone tokens (B, latent_levels * L, 2D) -> weather fields.

The surface latent level is read out by one linear head per surface variable (p * p values
per patch). The atmospheric latent levels are de-aggregated into the requested pressure
levels by Perceiver cross-attention from Fourier-encoded level queries, then read out by one
linear head per atmospheric variable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aurora_loop.model.chunks import map_token_chunks
from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.fourier import levels_encoding
from aurora_loop.model.layers import KERNEL_INIT, dense
from aurora_loop.model.perceiver import PerceiverResampler
from aurora_loop.model.swin import detached

Array = Any


class VariableHeads(nn.Module):
    """One linear head per variable: ``kernel`` (V, D, p*p), ``bias`` (V, p*p).

    (..., D) features -> (..., V', p*p) for the subset ``names`` of ``var_names``.
    """

    var_names: tuple[str, ...]
    out_features: int

    @nn.compact
    def __call__(self, x: Array, names: tuple[str, ...]) -> Array:
        d = x.shape[-1]
        kernel = self.param("kernel", KERNEL_INIT, (len(self.var_names), d, self.out_features))
        bias = self.param("bias", nn.initializers.zeros, (len(self.var_names), self.out_features))
        unknown = [n for n in names if n not in self.var_names]
        if unknown:
            raise KeyError(f"the model has no output head for variables {unknown}; it knows {self.var_names}")
        index = jnp.asarray([self.var_names.index(n) for n in names], dtype=jnp.int32)
        k, b = kernel[index].astype(x.dtype), bias[index].astype(x.dtype)
        return jnp.einsum("...d,vdk->...vk", x, k) + b


def unpatchify(x: Array, h: int, w: int, p: int) -> Array:
    """(B, h/p * w/p, ..., p*p) patches -> (B, ..., h, w) fields."""
    b, _, *mid, _ = x.shape
    x = x.reshape(b, h // p, w // p, *mid, p, p)
    n = len(mid)
    order = (0, *range(3, 3 + n), 1, 3 + n, 2, 4 + n)
    return x.transpose(order).reshape(b, *mid, h, w)


class Perceiver3DDecoder(nn.Module):
    """Decodes (B, C' * L, 2D) tokens to per-variable fields on the (H, W) grid."""

    config: AuroraConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        surf_names: tuple[str, ...],
        atmos_names: tuple[str, ...],
        levels: tuple[float, ...],
        patch_res: tuple[int, int, int],
        grid: tuple[int, int],
    ) -> tuple[dict[str, Array], dict[str, Array]]:
        """Returns surf name -> (B, H, W) and atmos name -> (B, C, H, W)."""
        cfg = self.config
        p, d2 = cfg.patch_size, 2 * cfg.embed_dim
        b = x.shape[0]
        lat_levels, rows, cols = patch_res
        h, w = grid
        x = x.reshape(b, lat_levels, rows * cols, d2).transpose(0, 2, 1, 3)  # (B, L, C', 2D)
        length = rows * cols

        surf = VariableHeads(cfg.surf_vars, p * p, name="surf_heads")(x[:, :, 0], surf_names)  # (B, L, V, p*p)
        surf_fields = unpatchify(surf, h, w, p)  # (B, V, H, W)

        queries = dense(d2, "atmos_levels_embed")(jnp.asarray(levels_encoding(levels, d2), x.dtype))  # (C, 2D)
        context = x[:, :, 1:].reshape(b * length, lat_levels - 1, d2)
        resampler = PerceiverResampler(
            cfg.dec_depth, d2 // cfg.num_heads, cfg.num_heads, cfg.dec_mlp_ratio, cfg.perceiver_ln_eps,
            name="level_decoder",
        )
        heads = VariableHeads(cfg.atmos_vars, p * p, name="atmos_heads")
        if self.is_initializing():
            atmos = heads(resampler(queries, context), atmos_names)  # (B * L, C, V, p*p)
        else:  # the levels and their heads over chunks of patches (model/chunks.py)
            resample, read_out = detached(resampler), detached(heads)

            def disaggregate(weights: tuple, ctx: Array) -> Array:
                levels_out = resample.apply({"params": weights[0]}, weights[2], ctx)
                return read_out.apply({"params": weights[1]}, levels_out, atmos_names)

            own = self.variables["params"]
            atmos = map_token_chunks(disaggregate, (own["level_decoder"], own["atmos_heads"], queries), context,
                                     cfg.level_chunk_tokens, cfg.remat)
        atmos = atmos.reshape(b, length, len(levels), len(atmos_names), p * p).swapaxes(2, 3)  # (B, L, V, C, p*p)
        atmos_fields = unpatchify(atmos, h, w, p)  # (B, V, C, H, W)
        return (
            {k: surf_fields[:, i] for i, k in enumerate(surf_names)},
            {k: atmos_fields[:, i] for i, k in enumerate(atmos_names)},
        )
