"""Attention through ``jax.nn.dot_product_attention`` against the einsum form, interleaved.

    python benchmarks/attention.py [--model small] [--grid 64 128] [--levels 13] [--rounds 5]

Builds AuroraSmall's forward + backward twice in one process, once with every attention
(Swin windows, Perceiver level aggregation) through the einsum form of
``aurora_loop.model.layers.attention`` and once through ``fused_attention``
(``jax.nn.dot_product_attention``: cuDNN's fused kernels on a GPU, XLA's own lowering
elsewhere), checks that both give the same loss and gradients to float32 rounding, then
times them in alternating rounds. Prints the medians and ``fused_over_einsum=<r>`` last
(< 1: the fused path is faster). ``aurora_loop`` takes the fused path on GPUs only; this
script is how that choice was checked on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each times both sides once)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import aurora_loop.model.layers as layers
    import aurora_loop.model.perceiver as perceiver
    import aurora_loop.model.swin as swin
    from aurora_loop.model import AuroraConfig, apply, init_params
    from aurora_loop.tasks.aurora import weighted_mae
    from benchmarks.step_time import LEVELS, make_inputs_and_target

    config = AuroraConfig.preset(args.model, use_lora=False)
    inputs, target = make_inputs_and_target(config, tuple(args.grid), LEVELS[: args.levels])
    params = init_params(config, jax.random.key(0), inputs)

    def compiled_grad(impl):
        swin.attention = perceiver.attention = impl

        def loss_fn(p):
            return jnp.mean(weighted_mae(apply(config, p, inputs), target))

        fn = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()  # traced now, with ``impl``
        return fn

    einsum, fused = layers.einsum_attention, layers.fused_attention
    sides = {"einsum": compiled_grad(einsum), "fused": compiled_grad(fused)}
    swin.attention = perceiver.attention = layers.attention
    (loss_a, grad_a), (loss_b, grad_b) = (sides[k](params) for k in ("einsum", "fused"))
    worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
                for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)))
    print(f"loss einsum {float(loss_a):.7g} fused {float(loss_b):.7g}; worst relative gradient difference {worst:.2e}")
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)

    times = {k: [] for k in sides}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, fn in sides.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{args.model} {args.grid[0]}x{args.grid[1]}, {args.levels} levels, forward + backward on {jax.default_backend()}: "
          + ", ".join(f"{k} median {v:.3f} s" for k, v in medians.items()))
    print(f"fused_over_einsum={medians['fused'] / medians['einsum']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
