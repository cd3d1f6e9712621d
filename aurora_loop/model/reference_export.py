"""This port's parameters -> the PyTorch reference's state dict and constructor arguments.

The inverse of :func:`aurora_loop.model.checkpoint.state_dict_to_params`:

- :func:`params_to_state_dict` gives the reference's current, name-based ``state_dict()``
  (``aurora.Aurora(**kwargs).state_dict()``: names and shapes exactly as the reference has
  them, float32 numpy arrays): ``kernel`` leaves are transposed back into ``weight``,
  layer-norm ``scale`` becomes ``weight``, the per-variable patch embeddings and heads are
  unstacked in the config's variable order, and the LoRA adapters into ``loras.<step>``.
- :func:`reference_kwargs` gives the keyword arguments of ``aurora.Aurora`` for a config
  (this port's own options, such as ``remat``, are dropped); :func:`reference_kwargs_json`
  its JSON form, which ``AuroraConfig(**kwargs)`` also accepts.

Neither needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from aurora_loop.model.config import AuroraConfig

# The keyword arguments of ``aurora.Aurora`` that this port's config carries (microsoft-aurora
# 1.x and 2.0.1 alike); ``timestep_hours`` becomes ``timestep`` (a ``datetime.timedelta``).
REFERENCE_KWARGS = (
    "surf_vars", "static_vars", "atmos_vars", "window_size", "encoder_depths", "encoder_num_heads",
    "decoder_depths", "decoder_num_heads", "latent_levels", "patch_size", "embed_dim", "num_heads",
    "mlp_ratio", "drop_path", "drop_rate", "enc_depth", "dec_depth", "dec_mlp_ratio", "perceiver_ln_eps",
    "max_history_size", "timestep", "stabilise_level_agg", "use_lora", "lora_steps", "lora_mode",
    "surf_stats", "autocast",
    # Aurora 1.5 (microsoft-aurora 2.0.1)
    "use_updated_lead_time_embedding", "variable_lead_time", "output_only_surf_vars", "output_only_atmos_vars",
    "rollout_input_clipping", "stochastic",
)
# AuroraConfig fields that are no keyword argument of the reference (dropped from the kwargs):
# ``remat``, ``remat_policy``, ``level_chunk_tokens`` and ``scan_blocks`` are this port's own; ``atmos_stats`` the reference takes from the module-level
# tables ``aurora.normalisation.locations`` / ``scales`` (see :func:`atmos_stats_overrides`).
# ``log_transform_scaled`` / ``prescribed_insolation`` the reference sets by class
# (``aurora.AuroraV1p5``; see :func:`reference_class`).
OWN_FIELDS = ("remat", "remat_policy", "level_chunk_tokens", "scan_blocks", "atmos_stats", "log_transform_scaled", "prescribed_insolation")
DEFAULT_TIMESTEP_HOURS = 6.0


def reference_kwargs(config: AuroraConfig) -> dict[str, Any]:
    """The keyword arguments of ``aurora.Aurora`` for ``config``: ``aurora.Aurora(**kwargs)``
    builds the same architecture. Tuples stay tuples, ``timestep`` is a ``timedelta``;
    ``surf_stats`` is given (as a dict) only when the config overrides some statistics."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if name in OWN_FIELDS:
            continue
        if name == "timestep_hours":
            out["timestep"] = dt.timedelta(hours=float(value))
        elif name == "surf_stats":
            if value:
                out["surf_stats"] = {k: (float(v[0]), float(v[1])) for k, v in value}
        elif name == "rollout_input_clipping":
            out[name] = {k: {"min": lo, "max": hi} for k, (lo, hi) in value} or None
        elif name in REFERENCE_KWARGS:
            out[name] = value
        else:  # a new AuroraConfig field must be classified here, never dropped silently
            raise ValueError(f"AuroraConfig.{name} is neither a reference keyword argument nor listed in OWN_FIELDS")
    return out


def reference_class(config: AuroraConfig) -> str:
    """The reference class to build with :func:`reference_kwargs`: ``AuroraV1p5`` (or
    ``AuroraV1p5Ensemble`` when stochastic) for a config with Aurora 1.5's class-level
    transforms, ``Aurora`` otherwise."""
    if config.log_transform_scaled or config.prescribed_insolation:
        return "AuroraV1p5Ensemble" if config.stochastic else "AuroraV1p5"
    return "Aurora"


def atmos_stats_overrides(config: AuroraConfig) -> dict[str, tuple[float, float]]:
    """The config's atmospheric normalisation overrides (``"z_500" -> (location, scale)``),
    which the reference has no keyword for: set ``aurora.normalisation.locations[key]`` and
    ``scales[key]`` to them before running the reference. Empty for most configs."""
    return {k: (float(v[0]), float(v[1])) for k, v in getattr(config, "atmos_stats", ())}


def reference_kwargs_json(config: AuroraConfig) -> dict[str, Any]:
    """:func:`reference_kwargs` as JSON-able values: tuples become lists; ``timestep`` is left
    out when it is the reference's default (6 h), so that ``aurora.Aurora(**kwargs)`` takes the
    dict as it is, and is otherwise a number of hours (convert it with
    ``datetime.timedelta(hours=...)`` before calling the reference; ``AuroraConfig`` takes
    the number as it is).

    Turn the lists back into tuples before calling the reference: its encoder extends
    ``surf_vars`` in place (``surf_vars += static_vars``), so with a list the decoder also
    gets heads for the static variables and the state dict no longer fits."""
    out: dict[str, Any] = {}
    for name, value in reference_kwargs(config).items():
        if name == "timestep":
            hours = value.total_seconds() / 3600.0
            if hours != DEFAULT_TIMESTEP_HOURS:
                out["timestep"] = hours
        elif name == "surf_stats":
            out[name] = {k: list(v) for k, v in value.items()}
        elif isinstance(value, tuple):
            out[name] = list(value)
        else:
            out[name] = value
    return out


# --- parameter names ------------------------------------------------------------------------

_PERCEIVER_INDEX = {"attn": "0", "ff": "1", "ln1": "2", "ln2": "3"}
_MLP_INDEX = {"fc1": "0", "fc2": "2"}
_NUMBERED = re.compile(r"^(encoder_layers|decoder_layers|context_down_layers|blocks|layers)_(\d+)$")


def _reference_module(path: tuple[str, ...]) -> str:
    """Dotted reference name of a Flax module path (inverts ``checkpoint._flax_path``)."""
    out: list[str] = []
    i = 0
    while i < len(path):
        seg = path[i]
        nxt = path[i + 1] if i + 1 < len(path) else None
        prev = path[i - 1] if i > 0 else None
        m = _NUMBERED.match(seg)
        if m and m.group(1) == "layers":
            if nxt not in _PERCEIVER_INDEX:
                raise ValueError(f"unexpected Perceiver part {nxt!r} in {'/'.join(path)}")
            out += ["layers", m.group(2), _PERCEIVER_INDEX[nxt]]
            i += 2
            continue
        if m:
            out += [m.group(1), m.group(2)]
        elif seg == "modulation":
            out += ["ln_modulation", "1"]
        elif seg in _MLP_INDEX and prev in ("time_mlp", "noise_mlp"):
            out.append(_MLP_INDEX[seg])  # backbone.{time,noise}_mlp.{0,2}
        elif seg in _MLP_INDEX and prev in ("surf_mlp", "ff"):
            out += ["net", _MLP_INDEX[seg]]  # the Perceiver MLP: <mlp>.net.{0,2}
        else:
            out.append(seg)  # the Swin MLP keeps mlp.fc1 / mlp.fc2
        i += 1
    return ".".join(out)


def _plain_leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    """Reference name and value of an ordinary leaf (linear / layer norm / free parameter)."""
    last = path[-1]
    if last == "kernel":
        if value.ndim != 2:
            raise ValueError(f"{'/'.join(path)} has shape {value.shape}, expected a 2-d kernel")
        return f"{_reference_module(path[:-1])}.weight", value.T
    if last == "scale":
        return f"{_reference_module(path[:-1])}.weight", value
    return _reference_module(path), value


def _paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += _paths(value, prefix + (str(key),))
        else:
            out.append((prefix + (str(key),), value))
    return out


def unwrap_params(params: Any) -> Any:
    """The parameter tree itself, out of a Flax ``{"params": ...}`` collection if wrapped."""
    if isinstance(params, Mapping) and set(params) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def params_to_state_dict(config: AuroraConfig, params: Any) -> dict[str, np.ndarray]:
    """The reference's name-based ``state_dict()`` (name -> float32 numpy array) of ``params``.

    ``params`` must have exactly the structure and shapes of ``config``'s parameters (checked
    first; a mismatch raises :class:`~aurora_loop.model.checkpoint.CheckpointError` naming the
    parameter). Loading the result with
    :func:`~aurora_loop.model.checkpoint.load_reference_params` gives ``params`` back
    bit for bit.
    """
    from aurora_loop.model.checkpoint import CheckpointError, _check_against, _flax_path, _leaf, param_shapes

    params = unwrap_params(params)
    if not isinstance(params, Mapping):
        raise CheckpointError(f"expected a parameter tree (a mapping), got {type(params).__name__}")
    _check_against(params, param_shapes(config))
    surf_names = tuple(config.surf_vars) + tuple(config.static_vars)
    state: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray) -> None:
        if name in state:
            raise CheckpointError(f"two parameters map onto the reference name {name}")
        state[name] = np.ascontiguousarray(value, dtype=np.float32)

    for path, leaf in _paths(params):
        value = np.asarray(leaf, dtype=np.float32)
        if path[:1] == ("encoder",) and len(path) == 3 and path[1] in ("surf_token_embeds", "atmos_token_embeds") and path[2] == "weight":
            kind = path[1].split("_", 1)[0]
            names = surf_names if kind == "surf" else tuple(config.atmos_vars)
            for i, var in enumerate(names):  # (T, p, p, D) -> (D, 1, T, p, p)
                put(f"encoder.{kind}_token_embeds.weights.{var}", value[i].transpose(3, 0, 1, 2)[:, None])
        elif path[:1] == ("decoder",) and len(path) == 3 and path[1] in ("surf_heads", "atmos_heads"):
            kind = path[1].split("_", 1)[0]
            names = tuple(config.surf_vars) if kind == "surf" else tuple(config.atmos_vars)
            for i, var in enumerate(names):  # kernel (2D, p*p) -> weight (p*p, 2D); bias (p*p,)
                if path[2] == "kernel":
                    put(f"decoder.{kind}_heads.{var}.weight", value[i].T)
                else:
                    put(f"decoder.{kind}_heads.{var}.{path[2]}", value[i])
        elif len(path) >= 2 and path[-2] in ("lora_qkv", "lora_proj") and path[-1] in ("lora_A", "lora_B"):
            module = _reference_module(path[:-2])
            for step in range(value.shape[0]):  # (n, in, r) -> loras.<step>.lora_A (r, in)
                put(f"{module}.{path[-2]}.loras.{step}.{path[-1]}", value[step].T)
        else:
            name, value = _plain_leaf(path, value)
            if _leaf(_flax_path(name), value)[0] != path:  # the importer must map the name back here
                raise CheckpointError(f"parameter {'/'.join(path)} has no reference name (tried {name})")
            put(name, value)
    return state
