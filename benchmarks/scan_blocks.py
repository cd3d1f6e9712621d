"""Compile time, memory and step time of Aurora with ``scan_blocks`` off and on, in one process.

    python benchmarks/scan_blocks.py [--model small|aurora|tiny] [--grid H W] [--levels N] [--no-remat]
                                     [--rounds 3] [--depths 1,4,1]

``AuroraConfig.scan_blocks`` runs every Swin stage of four or more blocks as a ``lax.scan``
over (unshifted, shifted) block pairs, so that XLA compiles one pair per stage. This script
builds the loss-and-gradient computation of the named preset (batch 1, float32, LoRA off,
with per-block remat unless ``--no-remat``) both ways, and prints for each the trace + lower
time, the XLA compile time and the compiled temporaries (``memory_analysis``); with
``--rounds`` > 0 it also checks that both give the same loss and gradients and times them in
alternating rounds (medians). ``--depths`` overrides the encoder depths (the decoder mirrors
them), e.g. to give the tiny preset a stage deep enough to scan. The last line is
``scan_compile_over_unrolled=<r>``: trace, lower and compile with the scan over without
(below 1: faster to start).

The 1.3 B preset needs about 12 GB per side to run; ``--rounds 0`` compiles only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="Aurora preset")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (0: compile only)")
    parser.add_argument("--depths", help="encoder depths, e.g. 1,4,1 (the decoder's mirror them)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from aurora_loop.model import AuroraConfig, apply, init_params
    from aurora_loop.tasks.aurora import weighted_mae
    from benchmarks.step_time import LEVELS, make_inputs_and_target

    overrides = {}
    if args.depths:
        depths = tuple(int(d) for d in args.depths.split(","))
        overrides = dict(encoder_depths=depths, decoder_depths=depths[::-1])
    levels = LEVELS[: args.levels]
    print(f"# Aurora {args.model} {overrides or ''}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, batch 1, float32, "
          f"remat={not args.no_remat}; {jax.default_backend()}", flush=True)
    sides, start_s = {}, {}
    for scan in (False, True):
        config = AuroraConfig.preset(args.model, use_lora=False, remat=not args.no_remat, scan_blocks=scan, **overrides)
        inputs, target = make_inputs_and_target(config, tuple(args.grid), levels)
        params = init_params(config, jax.random.key(0), inputs)

        def loss(p, config=config, inputs=inputs, target=target):
            return jnp.mean(weighted_mae(apply(config, p, inputs), target))

        t0 = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        temp = compiled.memory_analysis().temp_size_in_bytes
        start_s[scan] = t2 - t0
        print(f"scan_blocks={scan}: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, temp {temp / 2**30:.3f} GiB", flush=True)
        sides[scan] = (compiled, params) if args.rounds > 0 else None
        del lowered, compiled
    if args.rounds > 0:
        (loss_a, grads_a), (loss_b, grads_b) = (sides[s][0](sides[s][1]) for s in (False, True))
        np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for scan in (False, True):
                t0 = time.perf_counter()
                jax.block_until_ready(sides[scan][0](sides[scan][1]))
                times[scan].append(time.perf_counter() - t0)
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"step_s unrolled={median[False]:.4f} scan={median[True]:.4f} (same loss and gradients); "
              f"scan_step_over_unrolled={median[True] / median[False]:.3f}")
    print(f"scan_compile_over_unrolled={start_s[True] / start_s[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
