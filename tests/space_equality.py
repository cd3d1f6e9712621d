"""Training on bands against training on one device, for a preset too slow to compile in
every test run (``tests/test_space.py`` checks ``tiny`` in CI and ``small``'s forward and
gradients):

    python -m tests.space_equality small

Three AdamW steps (remat, batch 2, learning rate 1e-3) on the smallest grid the preset splits
in 4 bands, on 1 device, on 4 devices in 4 bands with FSDP, and on 2 examples x 2 bands.
Prints the losses of each and, per mesh, the largest parameter difference from the one-device
run, absolute and relative to the leaf's largest value plus the learning rate.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

from tests.xla_flags import FAST_COMPILE  # noqa: E402

os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)

GRIDS = {"tiny": (208, 64), "small": (304, 32)}
LEARNING_RATE = 1e-3


def train(preset: str, devices: int, space: int, fsdp: bool):
    from aurora_loop.data import ArrayLoader
    from aurora_loop.model import AuroraConfig, stack_samples
    from aurora_loop.optim import learning_rate_schedule, make_optimizer
    from aurora_loop.parallel import make_mesh
    from aurora_loop.tasks.aurora import AuroraTask
    from aurora_loop.trainer import Trainer
    from tests.synthetic import make_samples
    from tests.test_step import LossLog

    loader = ArrayLoader(make_samples(6, grid=GRIDS[preset], rollout_steps=1), 2, stack_samples, seed=3)
    log = LossLog()
    trainer = Trainer([log], optimizer=make_optimizer(learning_rate_schedule(LEARNING_RATE, 3, 1)), max_steps=3,
                      mesh=make_mesh(devices, space), seed=1, fsdp=fsdp)
    state = trainer.fit(AuroraTask(AuroraConfig.preset(preset, remat=True), name=preset), loader)
    return [float(x) for x in log.losses], state.params


def main(preset: str) -> None:
    import jax
    import numpy as np

    losses, params = train(preset, 1, 1, False)
    print(f"{preset} on {GRIDS[preset][0]} x {GRIDS[preset][1]}: 1 device: losses {losses}")
    for devices, space, fsdp in ((4, 4, True), (4, 2, False)):
        losses_s, params_s = train(preset, devices, space, fsdp)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses_s, losses))
        worst_abs = worst_rel = 0.0
        for a, b in zip(jax.tree.leaves(params_s), jax.tree.leaves(params)):
            diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / (float(np.abs(np.asarray(b)).max()) + LEARNING_RATE))
        print(f"{devices} devices, space {space}{', fsdp' if fsdp else ''}: losses {losses_s} (largest relative "
              f"difference {loss_diff:.2e}); parameters after 3 steps: largest difference {worst_abs:.2e} "
              f"absolute, {worst_rel:.2e} of the leaf's scale + lr")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small")
