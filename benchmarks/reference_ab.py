"""Aurora's training step in JAX against the PyTorch reference, interleaved in one run.

    python benchmarks/reference_ab.py [--reference-python REFVENV/bin/python] [--variants default,windowed_qkv,remat,remat_dots]

Both sides do AuroraSmall's forward + backward on the same shapes (64 x 128 grid, 13
pressure levels, batch 1, float32). The JAX side is the jitted step of
``benchmarks/step_time.py`` (forward, backward, AdamW), in each of the named ``--variants``:

- ``default``: the model as it is;
- ``windowed_qkv``: the Swin attention's projections run on the window layout
  (``qkv`` straight into (3, windows, heads, tokens, head dim), ``proj`` straight out of
  it; padding tokens are projected too), instead of token-major with transposes around them;
- ``remat`` / ``remat_dots``: the model with ``--remat`` under ``--remat_policy inputs`` /
  ``dots`` (what rematerialisation costs in time; its memory is ``step_time.py``'s);
- ``before_26`` / ``remat_before_26``: ``default`` / ``remat`` as they were before the memory
  cuts of issue 26: the level aggregation and de-aggregation over all patches at once
  (``level_chunk_tokens=0``), a constant shifted-window mask and the attention's scale on
  the logits (not on q). ``--level-chunk-tokens N`` sets the other variants' chunks (at
  64 x 128 the default of 2048 patches leaves 512 patches in one chunk; 0.25° has 32).

The reference runs in its own interpreter (``--reference-python``, a venv with ``torch==2.14.1
torchvision==0.29.1 microsoft-aurora``), started once and driven over a pipe, so that the two
never run at the same time: each round times one step of every JAX variant, then one
reference forward + backward and one forward + backward + fused AdamW. The machine's drift
hits every side alike. Prints the medians, ``<variant>_over_default`` for each variant (and
``<variant>_over_default_paired``, the median of the rounds' own ratios),
``jax_over_torch_same_work`` (with AdamW on both sides) and, last, ``jax_over_torch=<r>``
(the default JAX step over the reference's forward + backward, as ``step_time.py`` defines it;
below 1 is faster). Without ``--reference-python`` the last line is the last variant's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from benchmarks.step_time import TORCH_SETUP  # noqa: E402 - after the path set-up

VARIANTS = ("default", "windowed_qkv", "remat", "remat_dots", "before_26", "remat_before_26")

# The reference, as a server: builds the model (step_time.py's set-up), prints "ready", then
# times one step per command line ("fb": forward + backward; "adamw": also the fused AdamW update).
TORCH_SERVER = TORCH_SETUP + r'''
print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    step(line.strip() == "adamw")
    print(time.perf_counter() - t0, flush=True)
'''


class Reference:
    """The PyTorch reference in its own interpreter, one timed step per request."""

    def __init__(self, python: str, grid: tuple[int, int], levels: tuple[int, ...]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(TORCH_SERVER)
            self.script = f.name
        payload = json.dumps({"h": grid[0], "w": grid[1], "levels": levels, "bf16": False, "remat": False})
        self.proc = subprocess.Popen([python, self.script, payload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        if self.info is None:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"the reference interpreter exited with status {self.proc.wait()} before it was ready")
            self.info = json.loads(line)
        return self.info

    def step(self, kind: str) -> float:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        os.unlink(self.script)


def windowed_qkv_attention(self, grid, mask, rollout_step, ws=(1, 1, 1), ss=(0, 0, 0)):
    """``WindowAttention.__call__`` with both projections on the window layout: the same
    parameters and maths (padding tokens are zero vectors whose ``qkv`` is its bias)."""
    import jax.numpy as jnp

    from aurora_loop.model.layers import attention
    from aurora_loop.model.windows import crop_3d, pad_3d, window_padding, window_partition, window_reverse

    if self.use_lora:
        raise ValueError("windowed_qkv is a benchmark variant without LoRA")
    b, cc, h, w, d = grid.shape
    heads, dh = self.num_heads, d // self.num_heads
    params = self.variables["params"]
    dtype = self.dtype or grid.dtype
    if any(ss):
        grid = jnp.roll(grid, shift=(-ss[0], -ss[1], -ss[2]), axis=(1, 2, 3))
    pad = window_padding((cc, h, w), ws)
    padded = pad_3d(grid, pad)
    _, cp, hp, wp, _ = padded.shape
    windows = window_partition(padded, ws).astype(dtype)  # (B * nW, N, D)
    kernel = params["qkv"]["kernel"].astype(dtype).reshape(d, 3, heads, dh)
    qkv = jnp.einsum("bnd,dthk->tbhnk", windows, kernel) + params["qkv"]["bias"].astype(dtype).reshape(3, 1, heads, 1, dh)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B * nW, H, N, Dh)
    bw, n = windows.shape[:2]
    if mask is not None:
        nw = mask.shape[0]
        shape = (bw // nw, nw, heads, n, dh)
        out = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), jnp.asarray(mask)[None, :, None])
        out = out.reshape(bw, heads, n, dh)
    else:
        out = attention(q, k, v)
    proj = params["proj"]["kernel"].astype(dtype).reshape(heads, dh, d)
    y = jnp.einsum("bhnk,hkd->bnd", out, proj) + params["proj"]["bias"].astype(dtype)
    y = crop_3d(window_reverse(y, ws, cp, hp, wp), pad)
    if any(ss):
        y = jnp.roll(y, shift=ss, axis=(1, 2, 3))
    return y


def logits_scaled_attention(q, k, v, bias=None):
    """``einsum_attention`` as it was before issue 26: the scale multiplies the logits."""
    import jax
    import jax.numpy as jnp

    logits = jnp.einsum("...qd,...kd->...qk", q, k)
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(acc) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.astype(acc)
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def compile_variant(name: str, args: argparse.Namespace, levels: tuple[int, ...]) -> tuple[Callable, list]:
    """(compiled step, [params, opt_state, inputs, target]) of one variant."""
    import jax.numpy as jnp

    import aurora_loop.model.layers as layers
    import aurora_loop.model.swin as swin
    from benchmarks.step_time import build

    remat = name in ("remat", "remat_dots", "remat_before_26")
    before = name.endswith("before_26")
    changes = {"level_chunk_tokens": 0} if before else ({} if args.level_chunk_tokens is None else {"level_chunk_tokens": args.level_chunk_tokens})
    step, _, params, opt_state, inputs, target = build(args, levels, remat, "dots" if name == "remat_dots" else "inputs", **changes)
    # Modules look these names up in their own modules when they run: swapped while tracing.
    originals = (swin.WindowAttention, swin.block_mask, layers.einsum_attention)
    if name == "windowed_qkv":
        swin.WindowAttention = type("WindowedQKVAttention", (originals[0],), {"__call__": windowed_qkv_attention})
    if before:
        swin.block_mask = lambda mask, grid: jnp.asarray(mask)
        layers.einsum_attention = logits_scaled_attention
    try:
        compiled = step.lower(params, opt_state, inputs, target).compile()  # traced here
    finally:
        swin.WindowAttention, swin.block_mask, layers.einsum_attention = originals
    return compiled, [params, opt_state, inputs, target]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="Python of a venv with the PyTorch reference installed")
    parser.add_argument("--variants", default="default,windowed_qkv", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--model", default="small", help="Aurora preset of the JAX side (the reference is AuroraSmall)")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of every side each)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--level-chunk-tokens", type=int, default=None,
                        help="AuroraConfig.level_chunk_tokens of every variant but the before_26 ones (default: the model's)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or variants[0] != "default" or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must start with default and name only {', '.join(VARIANTS)}")
    args.bf16 = False

    import jax
    import numpy as np

    from benchmarks.step_time import LEVELS

    levels = LEVELS[: args.levels]
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, batch 1, float32; "
          f"{jax.default_backend()} {jax.devices()[0]}; {os.cpu_count()} CPUs", flush=True)
    sides = {}
    for name in variants:
        t0 = time.perf_counter()
        sides[name] = compile_variant(name, args, levels)
        print(f"# {name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    # Started once JAX has compiled, so that its start-up does not slow the compiles down.
    reference = Reference(args.reference_python, tuple(args.grid), levels) if args.reference_python else None
    losses = {}
    for name, (compiled, state) in sides.items():
        for _ in range(max(args.warmup, 1)):
            state[0], state[1], loss = compiled(*state)
        losses[name] = float(loss)
    # Same parameters and inputs: the variants compute the same first steps (to rounding).
    np.testing.assert_allclose([losses[v] for v in variants], losses["default"], rtol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    if reference is not None:
        info = reference.wait_ready()
        print(f"# reference: torch {info['torch']}, {info['threads']} threads", flush=True)
        times.update(torch_fb=[], torch_adamw=[])
        for _ in range(args.warmup):
            reference.step("fb"), reference.step("adamw")
    for _ in range(args.rounds):
        for name, (compiled, state) in sides.items():
            t0 = time.perf_counter()
            state[0], state[1], loss = compiled(*state)
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - t0)
        if reference is not None:
            times["torch_fb"].append(reference.step("fb"))
            times["torch_adamw"].append(reference.step("adamw"))
    if reference is not None:
        reference.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}_step_s={median[name]:.4f} (steps {', '.join(f'{x:.3f}' for x in t)})")
    for name in variants[1:]:
        # The median of the rounds' own ratios: each round runs every variant back to back, so
        # this discounts drift between rounds (the machine's load) that the medians keep.
        paired = statistics.median(t / d for t, d in zip(times[name], times["default"]))
        print(f"{name}_over_default_paired={paired:.3f}")
        print(f"{name}_over_default={median[name] / median['default']:.3f}")
    if reference is not None:
        for name in variants[1:]:
            print(f"{name}_over_torch={median[name] / median['torch_fb']:.3f}")
        print(f"jax_over_torch_same_work={median['default'] / median['torch_adamw']:.3f}")
        print(f"jax_over_torch={median['default'] / median['torch_fb']:.3f}")
    elif len(variants) == 1:
        print(f"default_step_s={median['default']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
