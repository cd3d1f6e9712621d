"""``aurora-loop import-checkpoint``: a reference Aurora checkpoint -> this project's layout.

    aurora-loop import-checkpoint aurora-0.25-small-pretrained.ckpt --model small --out DIR
    aurora-loop import-checkpoint aurora-0.25-v1.5-ensemble.ckpt --model v1p5_ensemble --out DIR

Reads a PyTorch ``.ckpt`` (needs the optional ``torch`` extra), or a state dict saved as
``.npz`` or ``.safetensors``, in the current name-based or the published (``net.``-prefixed,
fused) layout, and writes ``DIR/encoder``, ``DIR/backbone``, ``DIR/decoder`` (orbax) and
``DIR/config.json``. ``aurora-train --checkpoint_dir DIR`` then starts from them.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from typing import Any

import numpy as np

from aurora_loop.errors import UsageError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="CHECKPOINT", help="reference checkpoint: .ckpt (torch), .npz or .safetensors state dict")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="the architecture: a preset (tiny, small, aurora, v1p5, v1p5_ensemble, ...) or a JSON file of the reference's keyword arguments")
    parser.add_argument("--out", required=True, metavar="DIR", help="new directory to write encoder/, backbone/, decoder/ and config.json to")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as name -> numpy array (bfloat16 widened to float32)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        raw = data[start:stop]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise UsageError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = array.reshape(info["shape"]).copy()
    return out


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A torch-pickled state dict as name -> float32 numpy array."""
    try:
        import torch
    except ImportError as err:
        raise UsageError(f"reading {os.path.basename(path)} needs PyTorch: pip install 'aurora_loop[torch]' (or convert it to .npz/.safetensors first)") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v.detach().cpu().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def read_npz(path: str) -> dict[str, np.ndarray]:
    """An ``.npz`` state dict; a parity fixture's ``param/<name>`` entries are taken alone."""
    data = np.load(path, allow_pickle=False)
    names = data.files
    if any(k.startswith("param/") for k in names):
        return {k[len("param/"):]: data[k] for k in names if k.startswith("param/")}
    return {k: data[k] for k in names}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint file at {path}")
    ext = os.path.splitext(path)[1].lower()
    readers = {".ckpt": read_torch, ".pt": read_torch, ".pth": read_torch, ".npz": read_npz, ".safetensors": read_safetensors}
    if ext not in readers:
        raise UsageError(f"{path}: unknown checkpoint type {ext or '(none)'}; give a .ckpt, .npz or .safetensors file")
    try:
        return readers[ext](path)
    except UsageError:
        raise
    except Exception as err:  # a corrupt or foreign file
        raise UsageError(f"cannot read {path}: {err}") from err


def model_config(spec: str) -> Any:
    from aurora_loop.model.config import PRESETS, AuroraConfig

    if spec in PRESETS:
        return AuroraConfig.preset(spec)
    if not os.path.isfile(spec):
        raise UsageError(f"--model {spec}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        with open(spec) as f:
            return AuroraConfig(**json.load(f))
    except (ValueError, TypeError) as err:
        raise UsageError(f"--model {spec}: {err}") from err


def run(args: argparse.Namespace) -> int:
    from aurora_loop.model.checkpoint import CheckpointError, load_reference_params, save_params

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out} already exists and is not empty; choose a new directory")
    config = model_config(args.model)
    state = read_state_dict(args.src)
    try:
        params = load_reference_params(config, state)
    except CheckpointError as err:
        raise UsageError(f"{os.path.basename(args.src)} does not fit --model {args.model}: {err}") from err
    save_params(args.out, config, params)
    count = sum(int(np.prod(v.shape)) for part in params.values() for v in _leaves(part))
    print(f"wrote {count:,} parameters to {args.out} (encoder/, backbone/, decoder/, config.json)")
    return 0


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(tree)
