"""Aurora: encoder -> Swin U-Net backbone -> decoder, and the pure functions around it.

- :class:`AuroraModule`: the Flax module on *normalised, cropped* fields.
- :func:`apply`: one forecast step on physical fields, as the reference's ``Aurora.forward``
  (normalise, crop, predict, unnormalise). Pure and jittable.
- :func:`rollout`: the reference's ``aurora.rollout`` (a generator of predictions).
- :func:`init_params`: fresh parameters.

Parameters are a dict ``{"encoder": ..., "backbone": ..., "decoder": ...}`` of float32
arrays (float64 works too, under x64, for exact comparisons).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aurora_loop.model.batch import Batch, Metadata
from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.decoder import Perceiver3DDecoder
from aurora_loop.model.encoder import Perceiver3DEncoder
from aurora_loop.model.fourier import lead_time_encoding
from aurora_loop.model.swin import Swin3DBackbone, detached, remat_after_cotangent

Array = Any
Params = Any


class AuroraModule(nn.Module):
    """The network on normalised fields. See :meth:`__call__`."""

    config: AuroraConfig
    known_grid: Any = None  # a posenc.KnownGrid: the patch areas as constants, no host callback

    def setup(self) -> None:
        self.encoder = Perceiver3DEncoder(self.config, self.known_grid, name="encoder")
        self.backbone = Swin3DBackbone(self.config, name="backbone")
        self.decoder = Perceiver3DDecoder(self.config, name="decoder")

    def __call__(self, batch: Batch, rollout_step: int | Array = 0) -> tuple[dict[str, Array], dict[str, Array]]:
        """``batch``: normalised fields whose (H, W) divide by the patch size; static fields
        (H, W). Returns the next step's normalised fields: surf name -> (B, H, W), atmos
        name -> (B, C, H, W). Encoder and backbone outputs are sown as intermediates
        ``encoder_out`` (B, L', D) and ``backbone_out`` (B, L', 2D).

        With ``config.remat`` the encoder and the decoder, like every Swin block (see
        ``SwinStage``), keep only their inputs for the backward pass, as the reference's
        activation checkpointing does (:func:`~aurora_loop.model.swin.remat_after_cotangent`).
        """
        cfg = self.config
        b, t = batch.batch_size, batch.num_steps
        h, w = batch.spatial_shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"the grid {h}x{w} must divide by the patch size {p}; crop the batch first")
        levels = tuple(batch.metadata.atmos_levels)
        surf = dict(batch.surf_vars)
        for name, field in batch.static_vars.items():
            surf[name] = jnp.broadcast_to(field, (b, t, h, w))
        patch_res = (cfg.latent_levels, h // p, w // p)
        meta = batch.metadata
        checkpointed = cfg.remat and not self.is_initializing()

        if checkpointed:
            encoder = detached(self.encoder)

            def encode(params: Params, fields: tuple, lat: Array, lon: Array, time: Array) -> Array:
                return encoder.apply({"params": params}, *fields, lat, lon, time, levels)

            x = remat_after_cotangent(encode)(self.variables["params"]["encoder"], (surf, dict(batch.atmos_vars)),
                                              meta.lat, meta.lon, meta.time)
        else:
            x = self.encoder(surf, dict(batch.atmos_vars), meta.lat, meta.lon, meta.time, levels)
        self.sow("intermediates", "encoder_out", x)
        x = self.backbone(x, lead_time_encoding(cfg.timestep_hours, cfg.embed_dim), patch_res, rollout_step)
        self.sow("intermediates", "backbone_out", x)
        decode_args = (tuple(batch.surf_vars), tuple(batch.atmos_vars), levels, patch_res, (h, w))
        if checkpointed:
            decoder = detached(self.decoder)

            def decode(params: Params, x: Array) -> tuple[dict[str, Array], dict[str, Array]]:
                return decoder.apply({"params": params}, x, *decode_args)

            return remat_after_cotangent(decode)(self.variables["params"]["decoder"], x)
        return self.decoder(x, *decode_args)


def params_dtype(params: Params) -> Any:
    """The dtype of the parameters (that of their first leaf)."""
    return jax.tree_util.tree_leaves(params)[0].dtype


def _check_variables(config: AuroraConfig, batch: Batch) -> None:
    for group, names, known in (
        ("surface", batch.surf_vars, config.surf_vars),
        ("static", batch.static_vars, config.static_vars),
        ("atmospheric", batch.atmos_vars, config.atmos_vars),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"{group} variables {unknown} are not in the model's {group} variables {list(known)}")
    if not batch.atmos_vars:
        raise ValueError("a batch needs at least one atmospheric variable")


def prepare(config: AuroraConfig, batch: Batch, dtype: Any) -> Batch:
    """Cast the fields to ``dtype``, normalise and crop: the model's input."""
    _check_variables(config, batch)
    batch = batch.astype(dtype)
    return batch.normalise(config.surf_stats_dict).crop(config.patch_size)


def apply(
    config: AuroraConfig,
    params: Params,
    batch: Batch,
    *,
    rollout_step: int | Array | None = None,
    capture_intermediates: bool = False,
    known_grid: Any = None,
) -> Batch | tuple[Batch, dict[str, Array]]:
    """One forecast step, like the reference's ``Aurora.forward``.

    Args:
      config: the architecture.
      params: parameters (see :func:`init_params` / :func:`load_reference_params`).
      batch: physical fields with t <= ``max_history_size`` history steps (newest last).
      rollout_step: the roll-out step for LoRA (a Python or traced int); defaults to
        ``batch.metadata.rollout_step``.
      capture_intermediates: also return ``{"encoder": (B, L', D), "backbone": (B, L', 2D)}``.
      known_grid: the batch's grid, known on the host before tracing
        (:class:`~aurora_loop.model.posenc.KnownGrid`, cropped coordinates): the patch
        areas become constants instead of a host callback. One made with ``root_area``
        feeds those patch areas (e.g. the PyTorch reference's) instead of computing them.

    Returns:
      The prediction (t = 1): fields in physical units, float32, cropped to a multiple of the
      patch size; ``metadata.time`` advanced by ``config.timestep_hours`` and
      ``metadata.rollout_step`` by one.
    """
    step = batch.metadata.rollout_step if rollout_step is None else rollout_step
    normalised = prepare(config, batch, params_dtype(params))
    module = AuroraModule(config, known_grid)
    if capture_intermediates:
        (surf, atmos), state = module.apply({"params": params}, normalised, step, mutable=["intermediates"])
        taps = {k.removesuffix("_out"): v[0] for k, v in state["intermediates"].items()}
    else:
        surf, atmos = module.apply({"params": params}, normalised, step)
    meta = normalised.metadata
    prediction = Batch(
        surf_vars={k: v[:, None].astype(jnp.float32) for k, v in surf.items()},
        static_vars={k: v.astype(jnp.float32) for k, v in normalised.static_vars.items()},
        atmos_vars={k: v[:, None].astype(jnp.float32) for k, v in atmos.items()},
        metadata=Metadata(
            lat=jnp.asarray(meta.lat).astype(jnp.float32),
            lon=jnp.asarray(meta.lon).astype(jnp.float32),
            time=meta.time + config.timestep_hours,
            atmos_levels=meta.atmos_levels,
            rollout_step=batch.metadata.rollout_step + 1,
        ),
    ).unnormalise(config.surf_stats_dict)
    return (prediction, taps) if capture_intermediates else prediction


def init_params(config: AuroraConfig, rng: jax.Array, batch: Batch) -> Params:
    """Fresh float32 parameters for ``config`` (``batch`` gives the shapes; any values)."""
    normalised = prepare(config, batch, jnp.float32)
    # ``lazy_init`` only traces the forward pass: the parameters are made without running it.
    variables = AuroraModule(config).lazy_init(rng, normalised, 0)
    return jax.tree_util.tree_map(jnp.asarray, dict(variables["params"]))


def next_input(batch: Batch, prediction: Batch) -> Batch:
    """The roll-out's next input: drop the oldest step, append the prediction."""
    return prediction.replace(
        surf_vars={k: jnp.concatenate([batch.surf_vars[k][:, 1:], v.astype(batch.surf_vars[k].dtype)], axis=1)
                   for k, v in prediction.surf_vars.items() if k in batch.surf_vars},
        atmos_vars={k: jnp.concatenate([batch.atmos_vars[k][:, 1:], v.astype(batch.atmos_vars[k].dtype)], axis=1)
                    for k, v in prediction.atmos_vars.items() if k in batch.atmos_vars},
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _rollout_step(config: AuroraConfig, params: Params, batch: Batch, step: Array,
                  known_grid: Any = None) -> tuple[Batch, dict[str, Array]]:
    return apply(config, params, batch, rollout_step=step, capture_intermediates=True, known_grid=known_grid)


def rollout(config: AuroraConfig, params: Params, batch: Batch, steps: int, *,
            intermediates: bool = False,
            known_grid: Any = None) -> Iterator[Batch] | Iterator[tuple[Batch, dict[str, Array]]]:
    """Yield ``steps`` autoregressive predictions, like the reference's ``aurora.rollout``.

    Each step is one jitted :func:`apply`, compiled once per (config, shapes): the roll-out
    step is passed traced. Prediction ``k`` (1-based) has ``metadata.rollout_step ==
    batch.metadata.rollout_step + k`` and its time advanced by ``k * config.timestep_hours``
    (computed on the host in float64). With ``intermediates``, yields ``(prediction,
    {"encoder": (B, L', D), "backbone": (B, L', 2D)})``. ``known_grid``: as for :func:`apply`
    (the grid after cropping; every step's batch is on it), e.g. a
    ``KnownGrid(lat, lon, root_area=...)`` with the reference's patch areas.
    """
    dtype = params_dtype(params)
    batch = batch.astype(dtype).crop(config.patch_size)
    base_step = batch.metadata.rollout_step
    host_time = np.asarray(jax.device_get(batch.metadata.time), dtype=np.float64)
    for k in range(steps):
        current = batch.replace(metadata=batch.metadata.replace(rollout_step=0))
        pred, taps = _rollout_step(config, params, current, jnp.int32(base_step + k), known_grid)
        host_time = host_time + config.timestep_hours
        pred = pred.replace(metadata=pred.metadata.replace(time=host_time, rollout_step=base_step + k + 1))
        yield (pred, taps) if intermediates else pred
        batch = next_input(batch, pred)
