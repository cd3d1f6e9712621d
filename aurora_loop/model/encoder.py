"""The Perceiver 3D encoder: weather fields -> (B, latent_levels * L, D) tokens.

Every variable of a level is embedded patch by patch over the history (a strided 3D
convolution with one kernel per variable, shorter histories using the newest kernel
slices' prefix), the surface level gets a learnt encoding and an MLP, the pressure levels
are aggregated into ``latent_levels - 1`` latent levels by Perceiver cross-attention, and
Fourier encodings of patch position, patch size, lead time and absolute time are added.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_loop.model.chunks import map_token_chunks
from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.fourier import absolute_time_encoding, levels_encoding
from aurora_loop.model.layers import MLP, dense, layer_norm
from aurora_loop.model.perceiver import PerceiverResampler
from aurora_loop.model.posenc import position_scale_encoding
from aurora_loop.model.swin import detached

Array = Any


class LevelPatchEmbed(nn.Module):
    """Per-variable patch embedding of one level.

    Parameters: ``weight`` (V, T_max, p, p, D) for the variables ``var_names`` in order, and
    ``bias`` (D,). Input (N, V', T, H, W) for a subset ``names`` of the variables, T <= T_max;
    output (N, H/p * W/p, D).
    """

    var_names: tuple[str, ...]
    patch_size: int
    embed_dim: int
    history_size: int

    @nn.compact
    def __call__(self, x: Array, names: tuple[str, ...]) -> Array:
        p, t_max = self.patch_size, self.history_size
        fan_in = t_max * p * p
        bound = 1.0 / math.sqrt(fan_in)

        def uniform(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        weight = self.param("weight", uniform, (len(self.var_names), t_max, p, p, self.embed_dim))
        bias = self.param("bias", uniform, (self.embed_dim,))
        n, v, t, h, w = x.shape
        kernel, bias = patch_kernel({"weight": weight, "bias": bias}, self.var_names, names, t, x.dtype)
        patches = x.reshape(n, v, t, h // p, p, w // p, p)
        out = jnp.einsum("nvtaibj,vtijd->nabd", patches, kernel)
        return out.reshape(n, (h // p) * (w // p), self.embed_dim) + bias


def patch_kernel(params: dict[str, Array], var_names: tuple[str, ...], names: tuple[str, ...], t: int, dtype: Any) -> tuple[Array, Array]:
    """The kernel (V', T, p, p, D) and bias (D,) in ``dtype`` that a :class:`LevelPatchEmbed`
    with parameters ``params`` applies to the variables ``names`` (a subset of ``var_names``,
    in that order) over ``t`` history steps (the newest kernel slices' prefix)."""
    unknown = [n for n in names if n not in var_names]
    if unknown:
        raise KeyError(f"the model has no embedding for variables {unknown}; it knows {var_names}")
    if t > params["weight"].shape[1]:
        raise ValueError(f"{t} history steps given but the model takes at most {params['weight'].shape[1]}")
    index = jnp.asarray([var_names.index(name) for name in names], dtype=jnp.int32)
    return params["weight"][index, :t].astype(dtype), params["bias"].astype(dtype)


class Perceiver3DEncoder(nn.Module):
    """Encodes normalised fields into tokens (B, latent_levels * L, D), L = (H/p) * (W/p).

    ``known_grid``: the grid's coordinates on the host, if known before tracing
    (:class:`~aurora_loop.model.posenc.KnownGrid`); then the patch areas are constants.
    """

    config: AuroraConfig
    known_grid: Any = None

    @nn.compact
    def __call__(
        self,
        surf: dict[str, Array],
        atmos: dict[str, Array],
        lat: Array,
        lon: Array,
        time: Array,
        levels: tuple[float, ...],
        lead: Array,
        encodings: tuple[Array, Array] | None = None,
    ) -> Array:
        """surf: name -> (B, T, H, W) (static variables included, broadcast over B and T);
        atmos: name -> (B, T, C, H, W); lat (H,), lon (W,) degrees; time (B,) hours since 1970;
        levels: the C pressure levels (hPa); lead: the lead-time encoding (B, D)
        (:func:`~aurora_loop.model.fourier.lead_times_encoding`). ``encodings``: the patches'
        (position, scale) encodings (L, D) each, when they were computed elsewhere (a band of
        a grid's rows sees only its own patches; ``lat``/``lon`` are then unused)."""
        cfg = self.config
        d, p = cfg.embed_dim, cfg.patch_size
        surf_names, atmos_names = tuple(surf), tuple(atmos)
        if not atmos_names:
            raise ValueError("the encoder needs at least one atmospheric variable")
        x_atmos = jnp.stack([atmos[k] for k in atmos_names], axis=2)  # (B, T, V, C, H, W)
        b, t, _, c, h, w = x_atmos.shape
        dtype = x_atmos.dtype
        if surf_names:
            x_surf = jnp.stack([surf[k] for k in surf_names], axis=2).astype(dtype)  # (B, T, V, H, W)
        else:  # no surface inputs: the surface level starts from the embedding's bias
            x_surf = jnp.zeros((b, t, 0, h, w), dtype)

        surf_embed = LevelPatchEmbed(cfg.surf_vars + cfg.static_vars, p, d, cfg.max_history_size, name="surf_token_embeds")
        tokens_surf = surf_embed(x_surf.swapaxes(1, 2), surf_names)  # (B, L, D)
        length = tokens_surf.shape[1]

        trunc = nn.initializers.truncated_normal(stddev=0.02)
        surf_level = self.param("surf_level_encoding", trunc, (d,))
        tokens_surf = tokens_surf + surf_level.astype(dtype)
        tokens_surf = tokens_surf + layer_norm("surf_norm")(MLP(int(d * cfg.mlp_ratio), name="surf_mlp")(tokens_surf))

        # Every pressure level's patches are embedded, and the C levels aggregated into latent
        # levels, independently for every patch: over chunks of patches (model/chunks.py).
        atmos_embed = LevelPatchEmbed(cfg.atmos_vars, p, d, cfg.max_history_size, name="atmos_token_embeds")
        level_embed = dense(d, "atmos_levels_embed")(jnp.asarray(levels_encoding(levels, d), dtype))  # (C, D)
        latents = self.param("atmos_latents", trunc, (cfg.latent_levels - 1, d)).astype(dtype)
        resampler = PerceiverResampler(
            cfg.enc_depth, d // cfg.num_heads, cfg.num_heads, cfg.mlp_ratio, cfg.perceiver_ln_eps,
            ln_k_q=cfg.stabilise_level_agg, name="level_agg",
        )
        if self.is_initializing():
            tokens_atmos = atmos_embed(x_atmos.transpose(0, 3, 2, 1, 4, 5).reshape(b * c, -1, t, h, w), atmos_names)
            context = (tokens_atmos.reshape(b, c, -1, d) + level_embed[None, :, None, :]).transpose(0, 2, 1, 3)
            agg = resampler(latents, context.reshape(b * length, c, d))
        else:
            v = len(atmos_names)
            pixels = x_atmos.reshape(b, t, v, c, h // p, p, w // p, p).transpose(0, 4, 6, 3, 2, 1, 5, 7)
            pixels = pixels.reshape(b * length, c, v, t, p, p)  # every patch's pixels, level by level
            own = self.variables["params"]
            kernel, bias = patch_kernel(own["atmos_token_embeds"], cfg.atmos_vars, atmos_names, t, dtype)
            module = detached(resampler)

            def embed_and_aggregate(weights: tuple, pixels: Array) -> Array:
                agg_params, kernel, bias, level_embed, latents = weights
                tokens = jnp.einsum("ncvtij,vtijd->ncd", pixels, kernel) + bias + level_embed  # (n, C, D)
                return module.apply({"params": agg_params}, latents, tokens)  # (n, C', D)

            agg = map_token_chunks(embed_and_aggregate, (own["level_agg"], kernel, bias, level_embed, latents), pixels,
                                   cfg.level_chunk_tokens, cfg.remat)
        tokens_atmos = agg.reshape(b, length, -1, d).transpose(0, 2, 1, 3)  # (B, C', L, D)

        x = jnp.concatenate([tokens_surf[:, None], tokens_atmos], axis=1)  # (B, latent, L, D)
        pos, scale = encodings if encodings is not None else position_scale_encoding(lat, lon, p, d, self.known_grid)
        x = x + dense(d, "pos_embed")(pos.astype(dtype)) + dense(d, "scale_embed")(scale.astype(dtype))
        x = x.reshape(b, -1, d)

        x = x + dense(d, "lead_time_embed")(jnp.asarray(lead, dtype))[:, None, :]
        absolute = absolute_time_encoding(time, d).astype(dtype)  # (B, D)
        return x + dense(d, "absolute_time_embed")(absolute)[:, None, :]
