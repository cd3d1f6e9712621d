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

from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.fourier import absolute_time_encoding, levels_encoding
from aurora_loop.model.layers import MLP, dense, layer_norm
from aurora_loop.model.perceiver import PerceiverResampler
from aurora_loop.model.posenc import position_scale_encoding

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
        unknown = [n for n in names if n not in self.var_names]
        if unknown:
            raise KeyError(f"the model has no embedding for variables {unknown}; it knows {self.var_names}")
        n, v, t, h, w = x.shape
        if t > t_max:
            raise ValueError(f"{t} history steps given but the model takes at most {t_max}")
        index = jnp.asarray([self.var_names.index(name) for name in names], dtype=jnp.int32)
        kernel = weight[index, :t].astype(x.dtype)  # (V', T, p, p, D)
        patches = x.reshape(n, v, t, h // p, p, w // p, p)
        out = jnp.einsum("nvtaibj,vtijd->nabd", patches, kernel)
        return out.reshape(n, (h // p) * (w // p), self.embed_dim) + bias.astype(x.dtype)


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
    ) -> Array:
        """surf: name -> (B, T, H, W) (static variables included, broadcast over B and T);
        atmos: name -> (B, T, C, H, W); lat (H,), lon (W,) degrees; time (B,) hours since 1970;
        levels: the C pressure levels (hPa); lead: the lead-time encoding (B, D)
        (:func:`~aurora_loop.model.fourier.lead_times_encoding`)."""
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
        atmos_embed = LevelPatchEmbed(cfg.atmos_vars, p, d, cfg.max_history_size, name="atmos_token_embeds")
        tokens_surf = surf_embed(x_surf.swapaxes(1, 2), surf_names)  # (B, L, D)
        x_atmos = x_atmos.transpose(0, 3, 2, 1, 4, 5).reshape(b * c, len(atmos_names), t, h, w)
        tokens_atmos = atmos_embed(x_atmos, atmos_names).reshape(b, c, -1, d)  # (B, C, L, D)
        length = tokens_surf.shape[1]

        trunc = nn.initializers.truncated_normal(stddev=0.02)
        surf_level = self.param("surf_level_encoding", trunc, (d,))
        tokens_surf = tokens_surf + surf_level.astype(dtype)
        tokens_surf = tokens_surf + layer_norm("surf_norm")(MLP(int(d * cfg.mlp_ratio), name="surf_mlp")(tokens_surf))

        level_enc = jnp.asarray(levels_encoding(levels, d), dtype)
        tokens_atmos = tokens_atmos + dense(d, "atmos_levels_embed")(level_enc)[None, :, None, :]

        # Aggregate the C pressure levels into latent levels, independently for every patch.
        latents = self.param("atmos_latents", trunc, (cfg.latent_levels - 1, d)).astype(dtype)
        context = tokens_atmos.transpose(0, 2, 1, 3).reshape(b * length, c, d)
        agg = PerceiverResampler(
            cfg.enc_depth, d // cfg.num_heads, cfg.num_heads, cfg.mlp_ratio, cfg.perceiver_ln_eps,
            ln_k_q=cfg.stabilise_level_agg, name="level_agg",
        )(latents, context)
        tokens_atmos = agg.reshape(b, length, -1, d).transpose(0, 2, 1, 3)  # (B, C', L, D)

        x = jnp.concatenate([tokens_surf[:, None], tokens_atmos], axis=1)  # (B, latent, L, D)
        pos, scale = position_scale_encoding(lat, lon, p, d, self.known_grid)
        x = x + dense(d, "pos_embed")(pos.astype(dtype)) + dense(d, "scale_embed")(scale.astype(dtype))
        x = x.reshape(b, -1, d)

        x = x + dense(d, "lead_time_embed")(jnp.asarray(lead, dtype))[:, None, :]
        absolute = absolute_time_encoding(time, d).astype(dtype)  # (B, D)
        return x + dense(d, "absolute_time_embed")(absolute)[:, None, :]
