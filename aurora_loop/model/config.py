"""``AuroraConfig``: the architecture's hyper-parameters, named as the reference names them.

``AuroraConfig(**kwargs)`` accepts the keyword arguments of the PyTorch reference's
``aurora.Aurora`` constructor, so a configuration can be copied over verbatim. The options
of Aurora 1.5 (``AuroraV1p5``, ``AuroraV1p5Ensemble``) are implemented; those of the
air-pollution and wave variants are recognised but rejected unless left at their defaults.
``use_fp16_safe_attention`` is accepted and ignored: it only clamps float16 intermediates,
and this port computes in float32 or bfloat16, where it changes nothing.
``AuroraConfig.preset(name)`` gives the named models:

- ``aurora``: the 1.3 B parameter defaults of ``aurora.Aurora`` (LoRA on, as the fine-tuned
  checkpoint expects);
- ``small``: ``aurora.AuroraSmallPretrained`` (embed_dim 256, depths (2, 6, 2), no LoRA);
- ``tiny``: a CPU-sized model for demos and tests (embed_dim 32, 2 latent levels), the
  configuration of the parity fixture;
- ``v1p5`` / ``v1p5_ensemble``: the defaults of ``aurora.AuroraV1p5`` /
  ``aurora.AuroraV1p5Ensemble`` (26 surface variables of which 7 output-only, 36 static,
  per-sample lead times, input clipping, log-scaled ``scaled_*`` fields, prescribed
  insolation; the ensemble adds backbone noise), except ``autocast``: the reference's
  float16 autocast has no counterpart here (use bfloat16 through ``autocast=True``);
- ``v1p5_tiny`` / ``v1p5_ensemble_tiny``: those with the ``tiny`` backbone (the 1.5 parity
  fixtures' size).

The config is frozen and hashable, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

LORA_MODES = ("single", "from_second", "all")
REMAT_POLICIES = ("inputs", "dots")  # AuroraConfig.remat_policy

# Reference options outside this port's scope, with the default they must keep.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "level_condition": None,
    "dynamic_vars": False,
    "atmos_static_vars": False,
    "separate_perceiver": (),
    "modulation_heads": (),
    "positive_surf_vars": (),
    "positive_atmos_vars": (),
    "clamp_at_first_step": False,
    "simulate_indexing_bug": False,
}
# Reference options accepted and ignored (they change nothing numerically here).
_IGNORED = ("use_fp16_safe_attention",)


def _tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuple(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class AuroraConfig:
    """Hyper-parameters of Aurora (reference keyword names; see ``aurora.Aurora``)."""

    surf_vars: tuple[str, ...] = ("2t", "10u", "10v", "msl")
    """Surface-level variables the model reads and predicts."""
    static_vars: tuple[str, ...] = ("lsm", "z", "slt")
    """Static (time-invariant) variables the model reads."""
    atmos_vars: tuple[str, ...] = ("z", "u", "v", "t", "q")
    """Atmospheric variables (one field per pressure level)."""
    window_size: tuple[int, int, int] = (2, 6, 12)
    """Swin window (levels, latitude patches, longitude patches)."""
    encoder_depths: tuple[int, ...] = (6, 10, 8)
    """Swin blocks per backbone encoder stage."""
    encoder_num_heads: tuple[int, ...] = (8, 16, 32)
    """Attention heads per backbone encoder stage."""
    decoder_depths: tuple[int, ...] = (8, 10, 6)
    """Swin blocks per backbone decoder stage."""
    decoder_num_heads: tuple[int, ...] = (32, 16, 8)
    """Attention heads per backbone decoder stage."""
    latent_levels: int = 4
    """Latent levels including the surface (so ``latent_levels - 1`` atmospheric latents)."""
    patch_size: int = 4
    """Patch side in grid points."""
    embed_dim: int = 512
    """Token width D of the encoder (the backbone's last stage outputs 2D)."""
    num_heads: int = 16
    """Heads of the Perceiver level aggregation / de-aggregation."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width (encoder and backbone)."""
    drop_path: float = 0.0
    """Stochastic depth rate (must be 0 here)."""
    drop_rate: float = 0.0
    """Dropout rate (must be 0 here)."""
    enc_depth: int = 1
    """Perceiver blocks in the encoder."""
    dec_depth: int = 1
    """Perceiver blocks in the decoder."""
    dec_mlp_ratio: float = 2.0
    """MLP ratio in the decoder's Perceiver."""
    perceiver_ln_eps: float = 1e-5
    """Layer-norm epsilon in the Perceiver blocks."""
    max_history_size: int = 2
    """Most history steps the patch embedding takes."""
    timestep_hours: float = 6.0
    """Model step (the reference's ``timestep``), in hours."""
    stabilise_level_agg: bool = False
    """Extra layer norms on keys and queries of the first level-aggregation block."""
    use_lora: bool = True
    """Add LoRA adapters to the backbone's attention projections."""
    lora_steps: int = 40
    """Roll-out steps that get a LoRA correction (steps >= this get none)."""
    lora_mode: str = "single"
    """``single``: one LoRA for all steps; ``from_second``: none at step 0, one shared after;
    ``all``: one LoRA per roll-out step."""
    surf_stats: tuple[tuple[str, tuple[float, float]], ...] = ()
    """Overrides ``name -> (location, scale)`` of surface/static normalisation statistics."""
    atmos_stats: tuple[tuple[str, tuple[float, float]], ...] = ()
    """Overrides of atmospheric normalisation statistics per level, keyed as the reference
    keys them: ``"z_500" -> (location, scale)`` (``normalisation.stats_key``)."""
    autocast: bool = False
    """Compute the backbone in bfloat16 (parameters stay float32), as the reference's
    ``autocast``."""
    remat: bool = False
    """Rematerialise the encoder, every Swin block and the decoder in the backward pass
    (activation checkpointing)."""
    remat_policy: str = "inputs"
    """With ``remat``, what each checkpointed part keeps for the backward pass: ``inputs``
    (only its inputs; everything is recomputed: the least memory) or ``dots`` (also the
    outputs of its linear layers, ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``;
    only element-wise work and the attention products are recomputed)."""
    level_chunk_tokens: int = 2048
    """Patches per chunk of the Perceiver level aggregation (encoder) and de-aggregation
    with its output heads (decoder): they run as a loop over chunks of this many patches
    (0: all at once). The result is the same; with ``remat`` each chunk is recomputed on
    its own in the backward pass, so their memory follows the chunk, not the grid."""
    scan_blocks: bool = False
    """Run each Swin stage of four or more blocks as a loop over (unshifted, shifted) block
    pairs, so that XLA compiles one pair per stage instead of every block (shorter
    compiles for deep models); the parameter tree is unchanged (the pairs' parameters are
    stacked at apply time, which copies them and their gradients)."""
    # -- Aurora 1.5 -----------------------------------------------------------------------
    use_updated_lead_time_embedding: bool = False
    """Lead-time encoding with wavelengths from 6 h (not 1 min) and a linear channel."""
    variable_lead_time: bool = False
    """Lead times per example (hours) instead of the fixed ``timestep_hours``."""
    output_only_surf_vars: tuple[str, ...] = ()
    """Surface variables (of ``surf_vars``) that are predicted but never read: zeros after
    normalisation in the input, dropped when a roll-out advances."""
    output_only_atmos_vars: tuple[str, ...] = ()
    """Atmospheric variables that are predicted but never read (as the surface ones)."""
    rollout_input_clipping: tuple[tuple[str, tuple[float | None, float | None]], ...] = ()
    """``name -> (min, max)`` bounds (``None``: unbounded) applied to a prediction before a
    roll-out feeds it back (the prediction itself stays unclipped). Accepts the reference's
    ``{"tcc": {"min": 0, "max": 1}}``."""
    stochastic: bool = False
    """Inject noise into the backbone's conditioning (the ensemble model): per token, through
    ``noise_mlp``, carried to coarser stages by ``context_down_layers``."""
    log_transform_scaled: bool = False
    """Log-transform surface variables named ``scaled_*`` before normalising and invert it
    after (Aurora 1.5; the reference's ``AuroraV1p5`` does this by class, not by keyword)."""
    prescribed_insolation: bool = False
    """Replace the ``insolation`` prediction by the formula at the valid time (Aurora 1.5)."""

    def __init__(self, **kwargs: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(type(self))}
        if "timestep" in kwargs:
            step = kwargs.pop("timestep")
            kwargs["timestep_hours"] = step.total_seconds() / 3600.0 if isinstance(step, dt.timedelta) else float(step)
        if kwargs.pop("bf16_mode", False):
            kwargs["autocast"] = True
        dtype = kwargs.pop("autocast_dtype", None)
        if dtype is not None and "bfloat16" not in str(dtype):
            raise ValueError(f"autocast_dtype={dtype!r} is not supported; only bfloat16")
        for name in _IGNORED:
            kwargs.pop(name, None)
        for name, default in _UNSUPPORTED_DEFAULTS.items():
            if name in kwargs:
                value = _tuple(kwargs.pop(name))
                if value != default and not (default in (None, ()) and not value):
                    raise ValueError(f"AuroraConfig: {name}={value!r} belongs to an Aurora variant this port does not implement")
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(f"AuroraConfig got unknown keyword arguments: {', '.join(unknown)}")
        for name, field in fields.items():
            value = kwargs.get(name, field.default)
            if name in ("surf_stats", "atmos_stats"):
                items = value.items() if isinstance(value, Mapping) else (value or ())
                value = tuple(sorted((str(k), (float(v[0]), float(v[1]))) for k, v in items))
            if name == "rollout_input_clipping":
                value = _clipping(value)
            value = _tuple(value)
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if not isinstance(self.level_chunk_tokens, int) or self.level_chunk_tokens < 0:
            raise ValueError(f"level_chunk_tokens must be a whole number >= 0 (0: no chunks), got {self.level_chunk_tokens!r}")
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if self.latent_levels < 2:
            raise ValueError("latent_levels must be at least 2 (one is the surface)")
        if len(self.encoder_depths) != len(self.encoder_num_heads) or len(self.decoder_depths) != len(self.decoder_num_heads):
            raise ValueError("each depths tuple needs a num_heads tuple of the same length")
        if sum(self.encoder_depths) != sum(self.decoder_depths):
            raise ValueError("encoder_depths and decoder_depths must have the same total")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError("embed_dim must be a multiple of 4 and of num_heads")
        if self.drop_rate or self.drop_path:
            raise ValueError("drop_rate and drop_path must be 0 (dropout is not implemented)")
        if len(self.window_size) != 3:
            raise ValueError("window_size must be (levels, latitude, longitude)")
        for key, (_loc, scale) in (*self.surf_stats, *self.atmos_stats):
            if not 0.0 < scale < float("inf"):
                raise ValueError(f"the normalisation scale of {key!r} must be positive and finite, got {scale}")
        for key, _ in self.atmos_stats:
            if "_" not in key:
                raise ValueError(f"atmos_stats key {key!r} must name a variable and a level, like 'z_500'")
        for group, names, known in (("output_only_surf_vars", self.output_only_surf_vars, self.surf_vars),
                                    ("output_only_atmos_vars", self.output_only_atmos_vars, self.atmos_vars)):
            stray = [n for n in names if n not in known]
            if stray:
                raise ValueError(f"{group} {stray} must also be in {group.replace('output_only_', '')}")
        for name, _ in self.rollout_input_clipping:
            if name not in self.surf_vars and name not in self.atmos_vars:
                raise ValueError(f"rollout_input_clipping names {name!r}, which is not a surface or atmospheric variable")

    # -- conveniences ------------------------------------------------------------------
    @property
    def surf_stats_dict(self) -> dict[str, tuple[float, float]]:
        """Every statistics override in one dict, the reference's convention: surface/static
        names and atmospheric ``"name_level"`` keys (what ``Batch.normalise`` takes)."""
        return {**dict(self.surf_stats), **dict(self.atmos_stats)}

    @property
    def input_surf_vars(self) -> tuple[str, ...]:
        """The surface variables a batch supplies (``surf_vars`` less the output-only ones)."""
        return tuple(v for v in self.surf_vars if v not in self.output_only_surf_vars)

    @property
    def input_atmos_vars(self) -> tuple[str, ...]:
        """The atmospheric variables a batch supplies."""
        return tuple(v for v in self.atmos_vars if v not in self.output_only_atmos_vars)

    @property
    def log_transformed_surf_vars(self) -> tuple[str, ...]:
        """The ``scaled_*`` surface variables under ``log_transform_scaled``."""
        return tuple(v for v in self.surf_vars if v.startswith("scaled_")) if self.log_transform_scaled else ()

    @property
    def backbone_dtype(self) -> Any:
        """Compute dtype of the backbone: bfloat16 under ``autocast``, else that of the inputs."""
        return jnp.bfloat16 if self.autocast else None

    def replace(self, **changes: Any) -> AuroraConfig:
        return AuroraConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (reference keyword names, ``timestep_hours`` for the step)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["surf_stats"] = {k: list(v) for k, v in self.surf_stats}
        out["atmos_stats"] = {k: list(v) for k, v in self.atmos_stats}
        out["rollout_input_clipping"] = {k: {"min": lo, "max": hi} for k, (lo, hi) in self.rollout_input_clipping}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AuroraConfig:
        return cls(**json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AuroraConfig:
        """The named configuration (``aurora``, ``small``, ``tiny``, ``v1p5``, ...) with
        optional overrides (reference keyword arguments). As in the reference's
        ``AuroraV1p5``, a ``rollout_input_clipping`` override adds to the preset's bounds
        (a variable it names gets the new bounds, the others keep theirs)."""
        if name not in PRESETS:
            raise KeyError(f"unknown Aurora preset {name!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[name])
        if "rollout_input_clipping" in overrides and base.get("rollout_input_clipping"):
            merged = dict(_clipping(base["rollout_input_clipping"]))
            merged.update(dict(_clipping(overrides.pop("rollout_input_clipping"))))
            base["rollout_input_clipping"] = tuple(sorted(merged.items()))
        return cls(**{**base, **overrides})


def _clipping(value: Any) -> tuple[tuple[str, tuple[float | None, float | None]], ...]:
    """Clipping bounds as sorted ``(name, (min, max))`` pairs, from the reference's dict of
    ``{"min": .., "max": ..}`` dicts or from pairs."""
    items = value.items() if isinstance(value, Mapping) else (value or ())
    out = []
    for name, bounds in items:
        lo, hi = (bounds.get("min"), bounds.get("max")) if isinstance(bounds, Mapping) else tuple(bounds)
        out.append((str(name), (None if lo is None else float(lo), None if hi is None else float(hi))))
    return tuple(sorted(out))


PRESETS: dict[str, dict[str, Any]] = {
    "aurora": {},
    "small": dict(
        encoder_depths=(2, 6, 2),
        encoder_num_heads=(4, 8, 16),
        decoder_depths=(2, 6, 2),
        decoder_num_heads=(16, 8, 4),
        embed_dim=256,
        num_heads=8,
        use_lora=False,
    ),
    "tiny": dict(
        encoder_depths=(1, 2, 1),
        encoder_num_heads=(2, 4, 8),
        decoder_depths=(1, 2, 1),
        decoder_num_heads=(8, 4, 2),
        embed_dim=32,
        num_heads=4,
        window_size=(2, 4, 8),
        latent_levels=2,
        patch_size=4,
        use_lora=False,
    ),
}

_V1P5_SURF = (
    ("2t", "10u", "10v", "msl", "2d", "tcwv", "tcc", "100u", "100v", "sp", "lcc", "mcc")
    + ("hcc", "skt", "stl1", "swvl1", "ci", "scaled_sd", "i10fg", "blh", "uvb_1h")
    + ("ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h", "insolation")
)
_V1P5_STATIC = (
    ("lsm", "z", "anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "slt_0", "slt_1")
    + ("slt_2", "slt_3", "slt_4", "slt_5", "slt_6", "slt_7", "sdfor", "sdor", "tvh_0")
    + ("tvh_18", "tvh_19", "tvh_3", "tvh_4", "tvh_5", "tvh_6", "tvl_0", "tvl_1", "tvl_10")
    + ("tvl_11", "tvl_13", "tvl_16", "tvl_17", "tvl_2", "tvl_7", "tvl_9")
)
_V1P5_CLIPPING = {
    "tcwv": (0.0, None), "tcc": (0.0, 1.0), "lcc": (0.0, 1.0), "mcc": (0.0, 1.0), "hcc": (0.0, 1.0),
    "swvl1": (0.0, 70.0), "ci": (0.0, 1.0), "scaled_sd": (0.0, 10.0),
}
PRESETS["v1p5"] = dict(
    surf_vars=_V1P5_SURF,
    static_vars=_V1P5_STATIC,
    output_only_surf_vars=("i10fg", "blh", "uvb_1h", "ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h"),
    rollout_input_clipping=tuple(sorted(_V1P5_CLIPPING.items())),
    variable_lead_time=True,
    use_updated_lead_time_embedding=True,
    use_lora=False,
    log_transform_scaled=True,
    prescribed_insolation=True,
)
PRESETS["v1p5_ensemble"] = dict(PRESETS["v1p5"], stochastic=True)
_TINY_BACKBONE = {k: v for k, v in PRESETS["tiny"].items() if k != "use_lora"}
PRESETS["v1p5_tiny"] = dict(PRESETS["v1p5"], **_TINY_BACKBONE)
PRESETS["v1p5_ensemble_tiny"] = dict(PRESETS["v1p5_ensemble"], **_TINY_BACKBONE)
