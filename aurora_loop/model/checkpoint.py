"""Reference (PyTorch) state dicts <-> this port's parameters, and the seed checkpoint layout.

Two reference layouts are read:

- the current, name-based one (``aurora.Aurora().state_dict()``): one patch-embedding kernel
  per variable (``encoder.surf_token_embeds.weights.2t``, shape (D, 1, T, p, p)) and one
  head per variable (``decoder.surf_heads.2t.weight``, shape (p*p, 2D));
- the published checkpoints' older one: keys prefixed ``net.``, fused embeddings
  ``encoder.{surf,atmos}_token_embeds.weight`` (D, V, T, p, p) in the fixed variable orders
  below, and fused heads ``decoder.{surf,atmos}_head.{weight,bias}`` whose rows are ordered
  (pixel, variable).

Flax parameters mirror the reference's module tree (``layers.0.1.net.0`` becomes
``layers_0/ff/fc1``, linear weights are transposed into ``kernel``); per-variable tensors
are stacked in the config's variable order, LoRA adapters over roll-out steps.

The seed layout written by ``aurora-loop import-checkpoint``: ``DIR/encoder``,
``DIR/backbone``, ``DIR/decoder`` (orbax PyTree checkpoints) and ``DIR/config.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_loop.model.batch import Batch, Metadata
from aurora_loop.model.config import AuroraConfig

Params = Any

LEGACY_SURF_ORDER = ("2t", "10u", "10v", "msl", "lsm", "z", "slt")
LEGACY_ATMOS_ORDER = ("z", "u", "v", "t", "q")
PARTS = ("encoder", "backbone", "decoder")


class CheckpointError(ValueError):
    """A state dict or checkpoint that does not fit the configuration (names the parameter)."""


# --- layouts -------------------------------------------------------------------------------

def from_legacy_layout(state: Mapping[str, np.ndarray], patch_size: int,
                       config: AuroraConfig | None = None) -> dict[str, np.ndarray]:
    """The published checkpoints' layout -> the name-based layout (other keys unchanged).

    The 1.0 checkpoints fuse the standard variables in a fixed order. The 1.5 ones
    (``aurora.model.compat._adapt_checkpoint_v1p5``) fuse the model's own variables in its
    order: surface then static in one embedding, the surface heads over every surface
    variable (output-only ones included). ``config`` gives those orders; a fused tensor
    whose size matches the 1.0 order is read in that order.
    """
    out = {(k[4:] if k.startswith("net.") else k): np.asarray(v) for k, v in state.items()}
    surf_order, atmos_order, head_order = LEGACY_SURF_ORDER, LEGACY_ATMOS_ORDER, LEGACY_SURF_ORDER[:4]
    if config is not None:
        fused = out.get("encoder.surf_token_embeds.weight")
        if fused is not None and fused.shape[1] != len(LEGACY_SURF_ORDER):
            surf_order, atmos_order, head_order = config.surf_vars + config.static_vars, config.atmos_vars, config.surf_vars
    for part, order in (("surf", surf_order), ("atmos", atmos_order)):
        key = f"encoder.{part}_token_embeds.weight"
        if key in out:
            fused = out.pop(key)
            if fused.shape[1] != len(order):
                raise CheckpointError(f"{key} has {fused.shape[1]} variables, expected {len(order)} ({', '.join(order)})")
            for i, name in enumerate(order):
                out[f"encoder.{part}_token_embeds.weights.{name}"] = fused[:, i : i + 1]
    for part, order in (("surf", head_order), ("atmos", atmos_order)):
        key = f"decoder.{part}_head"
        if f"{key}.weight" in out:
            weight, bias = out.pop(f"{key}.weight"), out.pop(f"{key}.bias")
            v = len(order)
            if weight.shape[0] != v * patch_size**2:
                raise CheckpointError(f"{key}.weight has {weight.shape[0]} rows, expected {v} x {patch_size}^2")
            weight = weight.reshape(patch_size**2, v, -1)
            bias = bias.reshape(patch_size**2, v)
            for i, name in enumerate(order):
                out[f"decoder.{part}_heads.{name}.weight"] = weight[:, i]
                out[f"decoder.{part}_heads.{name}.bias"] = bias[:, i]
    return out


def to_legacy_layout(state: Mapping[str, np.ndarray], patch_size: int) -> dict[str, np.ndarray]:
    """The name-based layout -> the published checkpoints' layout (standard variables only)."""
    state = {k: np.asarray(v) for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    for part, order in (("surf", LEGACY_SURF_ORDER), ("atmos", LEGACY_ATMOS_ORDER)):
        prefix = f"encoder.{part}_token_embeds.weights."
        out[f"net.encoder.{part}_token_embeds.weight"] = np.concatenate([state.pop(prefix + n) for n in order], axis=1)
    for part, order in (("surf", LEGACY_SURF_ORDER[:4]), ("atmos", LEGACY_ATMOS_ORDER)):
        weights = np.stack([state.pop(f"decoder.{part}_heads.{n}.weight") for n in order], axis=1)  # (p*p, V, 2D)
        biases = np.stack([state.pop(f"decoder.{part}_heads.{n}.bias") for n in order], axis=1)  # (p*p, V)
        out[f"net.decoder.{part}_head.weight"] = weights.reshape(-1, weights.shape[-1])
        out[f"net.decoder.{part}_head.bias"] = biases.reshape(-1)
    out.update({f"net.{k}": v for k, v in state.items()})
    return out


# --- name mapping ---------------------------------------------------------------------------

_PERCEIVER_PARTS = {"0": "attn", "1": "ff", "2": "ln1", "3": "ln2"}
_MLP_PARTS = {"0": "fc1", "2": "fc2"}


def _flax_path(name: str) -> tuple[str, ...]:
    """Flax path of an ordinary (linear / layer-norm / free) reference parameter."""
    parts = name.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):
        seg = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if seg in ("encoder_layers", "decoder_layers", "context_down_layers", "blocks") and nxt is not None and nxt.isdigit():
            path.append(f"{seg}_{nxt}")
            i += 2
        elif seg == "layers" and nxt is not None and nxt.isdigit():
            path.append(f"layers_{nxt}")
            path.append(_PERCEIVER_PARTS[parts[i + 2]])
            i += 3
        elif seg in ("net", "time_mlp", "noise_mlp") and nxt in _MLP_PARTS:
            if seg != "net":
                path.append(seg)
            path.append(_MLP_PARTS[nxt])
            i += 2
        elif seg == "ln_modulation" and nxt == "1":
            path.append("modulation")
            i += 2
        else:
            path.append(seg)
            i += 1
    return tuple(path)


def _leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    last = path[-1]
    if last == "weight":
        if value.ndim == 2:
            return path[:-1] + ("kernel",), value.T
        if value.ndim == 1:
            return path[:-1] + ("scale",), value
    return path, value


_EMBED = re.compile(r"^encoder\.(surf|atmos)_token_embeds\.weights\.(.+)$")
_HEAD = re.compile(r"^decoder\.(surf|atmos)_heads\.(.+)\.(weight|bias)$")
_LORA = re.compile(r"^(.*)\.(lora_qkv|lora_proj)\.loras\.(\d+)\.(lora_A|lora_B)$")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def state_dict_to_params(config: AuroraConfig, state: Mapping[str, Any], expected: Params) -> Params:
    """Map a name-based reference state dict onto the structure of ``expected`` (shapes).

    Raises :class:`CheckpointError` naming the first parameter that is missing, unexpected or
    of the wrong shape.
    """
    params: dict = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    surf_names = config.surf_vars + config.static_vars

    for name, value in state.items():
        value = np.asarray(value)
        if m := _EMBED.match(name):
            names = surf_names if m.group(1) == "surf" else config.atmos_vars
            if m.group(2) not in names:
                raise CheckpointError(f"unexpected parameter {name}: variable {m.group(2)!r} is not in the config")
            if value.ndim != 5 or value.shape[1] != 1:
                raise CheckpointError(f"{name} has shape {value.shape}, expected (D, 1, T, p, p)")
            path = ("encoder", f"{m.group(1)}_token_embeds", "weight")
            stacked.setdefault(path, {})[names.index(m.group(2))] = value[:, 0].transpose(1, 2, 3, 0)
        elif m := _HEAD.match(name):
            names = config.surf_vars if m.group(1) == "surf" else config.atmos_vars
            if m.group(2) not in names:
                raise CheckpointError(f"unexpected parameter {name}: variable {m.group(2)!r} is not in the config")
            leaf = "kernel" if m.group(3) == "weight" else "bias"
            path = ("decoder", f"{m.group(1)}_heads", leaf)
            stacked.setdefault(path, {})[names.index(m.group(2))] = value.T if leaf == "kernel" else value
        elif m := _LORA.match(name):
            path = _flax_path(m.group(1)) + (m.group(2), m.group(4))
            stacked.setdefault(path, {})[int(m.group(3))] = value.T
        else:
            path, value = _leaf(_flax_path(name), value)
            _set(params, path, value)

    for path, pieces in stacked.items():
        count = len(_get(expected, path)) if _has(expected, path) else len(pieces)
        missing = [i for i in range(count) if i not in pieces]
        if missing:
            raise CheckpointError(f"missing parameter for {'/'.join(path)} entry {missing[0]} (a variable or LoRA step)")
        _set(params, path, np.stack([pieces[i] for i in range(count)]))

    _check_against(params, expected)
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), params)


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_paths(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def is_lora_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter path (names) belongs to a LoRA adapter (``lora_qkv`` / ``lora_proj``)."""
    return any("lora" in name.lower() for name in path)


def _check_against(params: Mapping, expected: Mapping, allow_missing: Callable[[tuple[str, ...]], bool] | None = None) -> list[tuple[str, ...]]:
    """Raise CheckpointError unless ``params`` has exactly ``expected``'s paths and shapes;
    paths for which ``allow_missing`` is true may be absent. Returns the absent ones."""
    got, want = _paths(params), _paths(expected)
    absent = []
    for path in sorted(want):
        if path not in got:
            if allow_missing is not None and allow_missing(path):
                absent.append(path)
                continue
            raise CheckpointError(f"missing parameter {'/'.join(path)}")
    for path in sorted(got):
        if path not in want:
            raise CheckpointError(f"unexpected parameter {'/'.join(path)}")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise CheckpointError(
                f"parameter {'/'.join(path)} has shape {tuple(np.shape(got[path]))}, the config expects {tuple(want[path].shape)}"
            )
    return absent


def _pad_history(state: dict[str, np.ndarray], history: int) -> dict[str, np.ndarray]:
    """Zero-extend patch-embedding kernels trained on fewer history steps (the reference's
    ``adapt_checkpoint_max_history_size``); more steps than the config takes is an error."""
    for name, value in list(state.items()):
        if _EMBED.match(name) and value.ndim == 5:
            t = value.shape[2]
            if t > history:
                raise CheckpointError(f"{name} was trained with {t} history steps; the config allows max_history_size={history}")
            if t < history:
                pad = np.zeros(value.shape[:2] + (history - t,) + value.shape[3:], value.dtype)
                state[name] = np.concatenate([value, pad], axis=2)
    return state


def example_batch(config: AuroraConfig, batch_size: int = 1, levels: tuple[int, ...] = (500, 850)) -> Batch:
    """A zero batch with every configured variable on a small valid grid (for shapes)."""
    p = config.patch_size
    stages = len(config.encoder_depths)
    h, w = p * 2 ** stages, p * 2 ** (stages + 1)
    t = config.max_history_size
    return Batch(
        surf_vars={k: np.zeros((batch_size, t, h, w), np.float32) for k in config.surf_vars},
        static_vars={k: np.zeros((h, w), np.float32) for k in config.static_vars},
        atmos_vars={k: np.zeros((batch_size, t, len(levels), h, w), np.float32) for k in config.atmos_vars},
        metadata=Metadata(
            lat=np.linspace(90, -90, h, dtype=np.float64),
            lon=np.linspace(0, 360, w, endpoint=False, dtype=np.float64),
            time=np.zeros((batch_size,), np.float64),
            atmos_levels=levels,
        ),
    )


def param_shapes(config: AuroraConfig) -> Params:
    """The parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    from aurora_loop.model.aurora import AuroraModule, prepare

    batch = prepare(config, example_batch(config), jnp.float32)
    return jax.eval_shape(lambda: AuroraModule(config).init(jax.random.key(0), batch, 0))["params"]


def load_reference_params(config: AuroraConfig, state_dict: Mapping[str, Any]) -> Params:
    """Parameters from a reference state dict (name -> numpy array) in either layout.

    Accepts tensors too (anything ``numpy.asarray`` takes). Raises :class:`CheckpointError`
    with the offending parameter's name on a mismatch.
    """
    state = from_legacy_layout({k: np.asarray(v) for k, v in state_dict.items()}, config.patch_size, config)
    state = _pad_history(state, config.max_history_size)
    return state_dict_to_params(config, state, param_shapes(config))


# --- the seed checkpoint layout ------------------------------------------------------------

def save_params(directory: str, config: AuroraConfig, params: Params) -> None:
    """Write ``directory/{encoder,backbone,decoder}`` (orbax) and ``directory/config.json``."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.PyTreeCheckpointer()
    for part in PARTS:
        checkpointer.save(os.path.join(directory, part), params[part], force=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json() + "\n")


def restore_on_host(path: str) -> Params:
    """The PyTree checkpoint at ``path`` (one part: encoder, backbone, decoder) as numpy arrays.

    Restored with explicit arguments (numpy on the host: the caller places them, with the
    run's shardings), not orbax's default of the shardings saved beside the arrays, which
    would tie the read to the topology it was written on (orbax warns about that).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def load_config(directory: str) -> AuroraConfig:
    """The ``config.json`` written by :func:`save_params`."""
    with open(os.path.join(directory, "config.json")) as f:
        return AuroraConfig(**json.load(f))


def load_params(directory: str | None = None, config: AuroraConfig | None = None, *,
                encoder: str | None = None, backbone: str | None = None, decoder: str | None = None) -> Params:
    """Restore parameters written by :func:`save_params` and check them against ``config``.

    Each part comes from ``directory/<part>`` unless its own path is given. Raises
    :class:`CheckpointError` naming the first missing / unexpected / mis-shaped parameter.
    """
    if config is None:
        if directory is None:
            raise CheckpointError("load_params needs a config or a directory holding config.json")
        config = load_config(directory)
    paths = {"encoder": encoder, "backbone": backbone, "decoder": decoder}
    params = {}
    for part in PARTS:
        path = paths[part] or (os.path.join(directory, part) if directory else None)
        if path is None or not os.path.isdir(path):
            raise CheckpointError(f"no {part} checkpoint at {path!r}")
        params[part] = restore_on_host(path)
    _check_against(params, param_shapes(config))
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), params)
