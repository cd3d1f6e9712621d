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
from aurora_loop.model.fourier import lead_time_encoding, lead_times_encoding
from aurora_loop.model.insolation import insolation_jax, insolation_numpy
from aurora_loop.model.normalisation import log_transform, log_untransform
from aurora_loop.model.swin import Swin3DBackbone, checkpointed, detached

Array = Any
Params = Any


class AuroraModule(nn.Module):
    """The network on normalised fields. See :meth:`__call__`."""

    config: AuroraConfig
    known_grid: Any = None  # a posenc.KnownGrid: the patch areas as constants, no host callback
    space: Any = None  # a bands.SpacePlan: every example's grid split in bands of rows over devices

    def setup(self) -> None:
        self.encoder = Perceiver3DEncoder(self.config, self.known_grid, name="encoder")
        self.backbone = Swin3DBackbone(self.config, name="backbone")
        self.decoder = Perceiver3DDecoder(self.config, name="decoder")

    def __call__(self, batch: Batch, rollout_step: int | Array = 0, lead_times: Array | None = None,
                 noise: Array | None = None) -> tuple[dict[str, Array], dict[str, Array]]:
        """``batch``: normalised fields whose (H, W) divide by the patch size; static fields
        (H, W). Returns the next step's normalised fields: surf name -> (B, H, W), atmos
        name -> (B, C, H, W). Encoder and backbone outputs are sown as intermediates
        ``encoder_out`` (B, L', D) and ``backbone_out`` (B, L', 2D).

        ``lead_times`` (B,) hours: the lead time of every example (``variable_lead_time``
        models; ``None``: ``config.timestep_hours``). ``noise`` (B, L', D): the stochastic
        backbone's noise (:class:`~aurora_loop.model.swin.Swin3DBackbone`).

        With ``config.remat`` the encoder and the decoder, like every Swin block (see
        ``SwinStage``), keep only their inputs for the backward pass, as the reference's
        activation checkpointing does (:func:`~aurora_loop.model.swin.remat_after_cotangent`);
        ``config.remat_policy="dots"`` keeps their linear layers' outputs too
        (:func:`~aurora_loop.model.swin.checkpointed`).
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
        rematerialise = cfg.remat and not self.is_initializing()
        if cfg.variable_lead_time and lead_times is not None:
            hours = jnp.broadcast_to(jnp.asarray(lead_times), (b,))
            lead = lead_times_encoding(hours, cfg.embed_dim, cfg.use_updated_lead_time_embedding)
        else:
            static = lead_time_encoding(cfg.timestep_hours, cfg.embed_dim, cfg.use_updated_lead_time_embedding)
            lead = jnp.broadcast_to(jnp.asarray(static), (b, cfg.embed_dim))

        if self.space is not None and not self.is_initializing():
            return self._banded(batch, surf, levels, lead, rollout_step, noise)
        if rematerialise:
            encoder = detached(self.encoder)

            def encode(params: Params, fields: tuple, lat: Array, lon: Array, time: Array, lead: Array) -> Array:
                return encoder.apply({"params": params}, *fields, lat, lon, time, levels, lead)

            x = checkpointed(encode, cfg.remat_policy)(self.variables["params"]["encoder"], (surf, dict(batch.atmos_vars)),
                                              meta.lat, meta.lon, meta.time, lead)
        else:
            x = self.encoder(surf, dict(batch.atmos_vars), meta.lat, meta.lon, meta.time, levels, lead)
        self.sow("intermediates", "encoder_out", x)
        if cfg.stochastic and noise is None and self.is_initializing():
            noise = jnp.zeros(x.shape[:-1] + (cfg.embed_dim,), x.dtype)
        x = self.backbone(x, lead, patch_res, rollout_step, noise)
        self.sow("intermediates", "backbone_out", x)
        decode_args = (tuple(batch.surf_vars), tuple(batch.atmos_vars), levels, patch_res, (h, w))
        if rematerialise:
            decoder = detached(self.decoder)

            def decode(params: Params, x: Array) -> tuple[dict[str, Array], dict[str, Array]]:
                return decoder.apply({"params": params}, x, *decode_args)

            return checkpointed(decode, cfg.remat_policy)(self.variables["params"]["decoder"], x)
        return self.decoder(x, *decode_args)


    def _banded(self, batch: Batch, surf: dict[str, Array], levels: tuple, lead: Array, rollout_step: int | Array,
                noise: Array | None) -> tuple[dict[str, Array], dict[str, Array]]:
        """:meth:`__call__` with every example's grid split in bands of rows over the devices
        of ``space`` (:mod:`aurora_loop.model.bands`): the encoder, every Swin block and the
        decoder run on each device's band; the outputs are the grid's real rows again."""
        from jax.sharding import PartitionSpec

        from aurora_loop.model.bands import from_bands, to_bands
        from aurora_loop.model.posenc import position_scale_encoding
        from aurora_loop.model.swin import stage_bands

        cfg, plan = self.config, self.space
        p, d = cfg.patch_size, cfg.embed_dim
        h, w = batch.spatial_shape
        patch_res = (cfg.latent_levels, h // p, w // p)
        first = stage_bands(cfg, patch_res, plan)[0]
        meta = batch.metadata
        rematerialise = cfg.remat
        grid_spec = plan.banded_spec(5, 2)
        surf_b = {k: to_bands(v, first, v.ndim - 2, p) for k, v in surf.items()}
        atmos_b = {k: to_bands(v, first, v.ndim - 2, p) for k, v in batch.atmos_vars.items()}
        pos, scale = position_scale_encoding(meta.lat, meta.lon, p, d, self.known_grid)  # (L, D) each
        pos_b, scale_b = (to_bands(e.reshape(patch_res[1], patch_res[2], d), first, 0) for e in (pos, scale))
        encoder, decoder = detached(self.encoder), detached(self.decoder)

        def encode(params: Params, fields: tuple, pos_b: Array, scale_b: Array, time: Array, lead: Array) -> Array:
            specs = plan.param_specs(params)

            def body(prm: Params, fields_l: tuple, pos_l: Array, scale_l: Array, time_l: Array, lead_l: Array) -> Array:
                tokens = encoder.apply({"params": plan.gather(prm, specs)}, *fields_l, None, None, time_l, levels, lead_l,
                                       encodings=(pos_l.reshape(-1, d), scale_l.reshape(-1, d)))
                return tokens.reshape(tokens.shape[0], cfg.latent_levels, pos_l.shape[0], pos_l.shape[1], d)

            field_specs = ({k: plan.banded_spec(v.ndim, v.ndim - 2) for k, v in fields[0].items()},
                           {k: plan.banded_spec(v.ndim, v.ndim - 2) for k, v in fields[1].items()})
            encodings = plan.banded_spec(3, 0, examples=False)
            in_specs = (specs, field_specs, encodings, encodings, PartitionSpec(plan.data_axis),
                        plan.example_spec(2))
            return plan.map(body, in_specs, grid_spec)(params, fields, pos_b, scale_b, time, lead)

        encode_args = (self.variables["params"]["encoder"], (surf_b, atmos_b), pos_b, scale_b, jnp.asarray(meta.time), lead)
        x = checkpointed(encode, cfg.remat_policy)(*encode_args) if rematerialise else encode(*encode_args)
        capture = self.is_mutable_collection("intermediates")  # the taps: cropped and flattened only when asked for
        if capture:
            self.sow("intermediates", "encoder_out", from_bands(x, first, 2).reshape(x.shape[0], -1, d))
        if noise is not None:
            noise = to_bands(noise.reshape(noise.shape[0], *patch_res, noise.shape[-1]), first, 2)
        x = self.backbone(x, lead, patch_res, rollout_step, noise, space=plan)
        if capture:
            self.sow("intermediates", "backbone_out", from_bands(x, first, 2).reshape(x.shape[0], -1, x.shape[-1]))
        surf_names, atmos_names = tuple(batch.surf_vars), tuple(batch.atmos_vars)

        def decode(params: Params, x: Array) -> tuple[dict[str, Array], dict[str, Array]]:
            specs = plan.param_specs(params)

            def body(prm: Params, x_l: Array) -> tuple[dict[str, Array], dict[str, Array]]:
                b, latent, rows, cols, d2 = x_l.shape
                return decoder.apply({"params": plan.gather(prm, specs)}, x_l.reshape(b, -1, d2), surf_names, atmos_names, levels,
                                     (latent, rows, cols), (rows * p, w))

            out_specs = ({k: plan.banded_spec(3, 1) for k in surf_names}, {k: plan.banded_spec(4, 2) for k in atmos_names})
            return plan.map(body, (specs, grid_spec), out_specs)(params, x)

        decode_args = (self.variables["params"]["decoder"], x)
        surf_out, atmos_out = checkpointed(decode, cfg.remat_policy)(*decode_args) if rematerialise else decode(*decode_args)
        return ({k: from_bands(v, first, 1, p) for k, v in surf_out.items()},
                {k: from_bands(v, first, 2, p) for k, v in atmos_out.items()})


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
    """Cast the fields to ``dtype``, normalise and crop: the model's input.

    Aurora 1.5: ``scaled_*`` fields are log-transformed before normalising
    (``log_transform_scaled``), and output-only variables become zero fields after it
    (replacing any the batch holds, appended after the others otherwise), as the
    reference's ``AuroraV1p5`` does.
    """
    _check_variables(config, batch)
    batch = batch.astype(dtype)
    scaled = config.log_transformed_surf_vars
    if scaled:
        batch = batch.replace(surf_vars={k: log_transform(v) if k in scaled else v for k, v in batch.surf_vars.items()})
    batch = batch.normalise(config.surf_stats_dict).crop(config.patch_size)
    if config.output_only_surf_vars or config.output_only_atmos_vars:
        surf, atmos = dict(batch.surf_vars), dict(batch.atmos_vars)
        for names, fields in ((config.output_only_surf_vars, surf), (config.output_only_atmos_vars, atmos)):
            if names:
                like = jnp.zeros_like(next(iter(fields.values())))
                for name in names:
                    fields[name] = like
        batch = batch.replace(surf_vars=surf, atmos_vars=atmos)
    return batch


def noise_shape(config: AuroraConfig, batch: Batch) -> tuple[int, int, int]:
    """The stochastic backbone's noise shape (B, L', D) for ``batch`` (cropped or not):
    one embed_dim-vector per token of the first backbone stage."""
    p = config.patch_size
    h, w = batch.spatial_shape
    return (batch.batch_size, config.latent_levels * (h // p) * (w // p), config.embed_dim)


def finish_prediction(config: AuroraConfig, prediction: Batch, insolation: Array | None = None) -> Batch:
    """Aurora 1.5's post-processing of an unnormalised prediction: invert the log transform
    of ``scaled_*`` fields, and set ``insolation`` to the formula at the valid time (or to
    ``insolation`` (B, H, W), e.g. computed on the host by :func:`insolation_numpy`)."""
    scaled = config.log_transformed_surf_vars
    surf = {k: log_untransform(v) if k in scaled else v for k, v in prediction.surf_vars.items()}
    if config.prescribed_insolation and "insolation" in surf:
        meta = prediction.metadata
        if insolation is None:
            insolation = insolation_jax(meta.time, meta.lat, meta.lon)
        surf["insolation"] = jnp.asarray(insolation, jnp.float32).reshape(surf["insolation"].shape)
    return prediction.replace(surf_vars=surf)


def apply(
    config: AuroraConfig,
    params: Params,
    batch: Batch,
    *,
    rollout_step: int | Array | None = None,
    capture_intermediates: bool = False,
    known_grid: Any = None,
    lead_times: Array | float | None = None,
    noise: Array | None = None,
    rng: jax.Array | None = None,
    insolation: Array | None = None,
    space: Any = None,
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
      lead_times: hours ahead, a scalar or one per example (B,), for ``variable_lead_time``
        models (ignored by others, as in the reference); default ``config.timestep_hours``.
      noise: a stochastic model's noise (B, L', D) (:func:`noise_shape`), the tensor the
        reference feeds its ``noise_mlp``; or ``rng``, a key to draw it from.
      insolation: (B, H, W) the prescribed insolation at the valid time, when the caller
        computed it (else the formula runs in the graph).
      space: a :class:`~aurora_loop.model.bands.SpacePlan`: split every example's grid in
        bands of rows over the devices of its mesh's ``space`` axis (the same numbers).

    Returns:
      The prediction (t = 1): fields in physical units, float32, cropped to a multiple of the
      patch size, output-only variables included; ``metadata.time`` advanced by the lead
      time and ``metadata.rollout_step`` by one.
    """
    step = batch.metadata.rollout_step if rollout_step is None else rollout_step
    normalised = prepare(config, batch, params_dtype(params))
    module = AuroraModule(config, known_grid, space)
    if config.stochastic and noise is None:
        if rng is None:
            raise ValueError("a stochastic Aurora (the 1.5 ensemble) needs noise= or rng=")
        noise = jax.random.normal(rng, noise_shape(config, normalised), params_dtype(params))
    lead = None
    if config.variable_lead_time and lead_times is not None:
        lead = jnp.broadcast_to(jnp.asarray(lead_times, params_dtype(params)), (normalised.batch_size,))
    variables = {"params": params}
    if capture_intermediates:
        (surf, atmos), state = module.apply(variables, normalised, step, lead, noise, mutable=["intermediates"])
        taps = {k.removesuffix("_out"): v[0] for k, v in state["intermediates"].items()}
    else:
        surf, atmos = module.apply(variables, normalised, step, lead, noise)
    meta = normalised.metadata
    advance = config.timestep_hours if lead is None else lead
    prediction = Batch(
        surf_vars={k: v[:, None].astype(jnp.float32) for k, v in surf.items()},
        static_vars={k: v.astype(jnp.float32) for k, v in normalised.static_vars.items()},
        atmos_vars={k: v[:, None].astype(jnp.float32) for k, v in atmos.items()},
        metadata=Metadata(
            lat=jnp.asarray(meta.lat).astype(jnp.float32),
            lon=jnp.asarray(meta.lon).astype(jnp.float32),
            time=meta.time + advance,
            atmos_levels=meta.atmos_levels,
            rollout_step=batch.metadata.rollout_step + 1,
        ),
    ).unnormalise(config.surf_stats_dict)
    prediction = finish_prediction(config, prediction, insolation)
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


@functools.partial(jax.jit, static_argnums=(0, 4, 8))
def _rollout_step(config: AuroraConfig, params: Params, batch: Batch, step: Array, known_grid: Any = None,
                  lead_times: Array | None = None, noise: Array | None = None,
                  insolation: Array | None = None, space: Any = None) -> tuple[Batch, dict[str, Array]]:
    return apply(config, params, batch, rollout_step=step, capture_intermediates=True, known_grid=known_grid,
                 lead_times=lead_times, noise=noise, insolation=insolation, space=space)


def clip_rollout_inputs(config: AuroraConfig, prediction: Batch) -> Batch:
    """The prediction with ``config.rollout_input_clipping`` applied (what a roll-out feeds
    back; the reference's ``apply_rollout_input_clipping``)."""
    if not config.rollout_input_clipping:
        return prediction
    bounds = dict(config.rollout_input_clipping)

    def clip(fields: dict[str, Array]) -> dict[str, Array]:
        return {k: jnp.clip(v, *bounds[k]) if k in bounds else v for k, v in fields.items()}

    return prediction.replace(surf_vars=clip(prediction.surf_vars), atmos_vars=clip(prediction.atmos_vars))


class AccumulatedNoise:
    """The stochastic backbone's noise for a roll-out's successive forward passes (an
    iterator); subclasses say how one fresh draw is made (``_fresh``).

    Without accumulation every pass draws fresh standard-normal noise. With accumulation
    over ``n`` passes (the reference's ``set_noise_accumulation(n)``, which its ``rollout``
    sets to ``len(fine_lead_times)``) the noise is ``sum(cache) / sqrt(n)`` over a cache of
    the ``n`` latest draws, filled with fresh draws at the start: successive sub-steps see
    correlated noise, and every n passes it is new.
    """

    def __init__(self, accumulate: int = 0) -> None:
        self.n = int(accumulate)
        self.cache: list[Array] = []

    def _fresh(self) -> Array:
        raise NotImplementedError

    def __iter__(self) -> AccumulatedNoise:
        return self

    def __next__(self) -> Array:
        fresh = self._fresh()
        if self.n <= 0:
            return fresh
        if len(self.cache) >= self.n:
            self.cache.pop(0)
        self.cache.append(fresh)
        while len(self.cache) < self.n:
            self.cache.append(self._fresh())
        return sum(self.cache[1:], self.cache[0]) / (self.n**0.5)

    next = __next__


class NoiseStream(AccumulatedNoise):
    """:class:`AccumulatedNoise` drawn from one key: each draw splits ``rng``."""

    def __init__(self, rng: jax.Array, shape: tuple[int, ...], dtype: Any, accumulate: int = 0) -> None:
        super().__init__(accumulate)
        self.rng, self.shape, self.dtype = rng, shape, dtype

    def _fresh(self) -> Array:
        self.rng, key = jax.random.split(self.rng)
        return jax.random.normal(key, self.shape, self.dtype)


def rollout(config: AuroraConfig, params: Params, batch: Batch, steps: int, *,
            fine_lead_times: Any = None,
            noise: Any = None,
            rng: jax.Array | None = None,
            use_noise_accumulation: bool = True,
            apply_rollout_input_clipping: bool = True,
            intermediates: bool = False,
            known_grid: Any = None,
            space: Any = None) -> Iterator[Batch] | Iterator[tuple[Batch, dict[str, Array]]]:
    """Yield the roll-out's predictions, like the reference's ``aurora.rollout``.

    ``steps`` main steps of ``config.timestep_hours``. With ``fine_lead_times`` (hours,
    ``variable_lead_time`` models; the last must equal the model step) every main step
    yields one prediction per lead time, all from the same input, and the last one advances
    the roll-out: ``steps * len(fine_lead_times)`` predictions in the reference's order.
    Before a prediction becomes the next input its output-only variables are dropped and,
    with ``apply_rollout_input_clipping``, ``config.rollout_input_clipping`` is applied.

    A stochastic model takes ``noise``, a sequence of (B, L', D) arrays, one per forward
    pass, each the tensor the reference feeds its noise MLP (so a reference roll-out can be
    replayed), or draws its own from ``rng`` (:class:`NoiseStream`; accumulated over the
    sub-steps with ``use_noise_accumulation``, as the reference does).

    Each step is one jitted :func:`apply`, compiled once per (config, shapes): the roll-out
    step, lead times and noise are traced. A prediction of main step ``k`` (1-based) has
    ``metadata.rollout_step == batch.metadata.rollout_step + k`` and its valid time (computed
    on the host in float64), where the prescribed ``insolation`` is evaluated on the host as
    the reference does. With ``intermediates``, yields ``(prediction, {"encoder": (B, L', D),
    "backbone": (B, L', 2D)})``. ``known_grid``: as for :func:`apply` (the grid after
    cropping), e.g. ``KnownGrid(lat, lon, root_area=...)`` with the reference's patch areas.
    ``space``: as for :func:`apply` (every example's grid in bands of rows over devices).
    """
    dtype = params_dtype(params)
    batch = batch.astype(dtype).crop(config.patch_size)
    leads = [config.timestep_hours] if fine_lead_times is None else [float(v) for v in fine_lead_times]
    if fine_lead_times is not None:
        if not config.variable_lead_time:
            raise ValueError("fine_lead_times needs a model with variable_lead_time=True")
        if not leads or not np.isclose(leads[-1], config.timestep_hours):
            raise ValueError(f"the last of fine_lead_times must equal the model step, {config.timestep_hours} hours")
    stream = None
    if config.stochastic and noise is None:
        if rng is None:
            raise ValueError("a stochastic Aurora (the 1.5 ensemble) needs noise= or rng= for a roll-out")
        accumulate = len(leads) if use_noise_accumulation and fine_lead_times is not None else 0
        stream = NoiseStream(rng, noise_shape(config, batch), dtype, accumulate)
    given_noise = iter(noise) if noise is not None else None
    base_step = batch.metadata.rollout_step
    host_time = np.asarray(jax.device_get(batch.metadata.time), dtype=np.float64)
    b = batch.batch_size
    for k in range(steps):
        current = batch.replace(metadata=batch.metadata.replace(rollout_step=0))
        pred = None
        for lead in leads:
            lead_times = jnp.full((b,), lead, dtype) if config.variable_lead_time else None
            step_noise = None
            if config.stochastic:
                step_noise = jnp.asarray(next(given_noise), dtype) if given_noise is not None else stream.next()
            valid_time = host_time + lead
            insolation = None
            if config.prescribed_insolation and "insolation" in config.surf_vars:
                meta = batch.metadata
                insolation = insolation_numpy(valid_time, np.asarray(meta.lat), np.asarray(meta.lon))
            pred, taps = _rollout_step(config, params, current, jnp.int32(base_step + k), known_grid,
                                       lead_times, step_noise, insolation, space)
            pred = pred.replace(metadata=pred.metadata.replace(time=valid_time, rollout_step=base_step + k + 1))
            yield (pred, taps) if intermediates else pred
        host_time = host_time + leads[-1]
        if apply_rollout_input_clipping:
            pred = clip_rollout_inputs(config, pred)
        batch = next_input(batch, pred)
