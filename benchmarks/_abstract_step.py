"""Shared by the benchmarks that compile Aurora's train step without its parameters
(compile_time.py, gpu_report.py, scaling.py): a random sample of the right shapes, and the
trainer's train step compiled on abstract state on a 1-D ``data`` mesh."""

from __future__ import annotations

import time


def make_sample(config, grid: tuple[int, int], levels: tuple[int, ...], batch: int):
    import numpy as np

    from aurora_loop.model import Batch, Metadata, Sample, stack_samples

    h, w = grid
    rng = np.random.default_rng(0)

    def one(t: int, time_h: float) -> Batch:
        return Batch(
            surf_vars={k: rng.standard_normal((1, t, h, w)).astype(np.float32) for k in config.surf_vars},
            static_vars={k: rng.standard_normal((h, w)).astype(np.float32) for k in config.static_vars},
            atmos_vars={k: rng.standard_normal((1, t, len(levels), h, w)).astype(np.float32) for k in config.atmos_vars},
            metadata=Metadata(lat=np.linspace(90, -90, h), lon=np.linspace(0, 360, w, endpoint=False),
                              time=np.array([time_h]), atmos_levels=levels),
        )

    return stack_samples([Sample(one(2, 438300.0), one(1, 438306.0)) for _ in range(batch)])


def compile_step(task, config, grid, levels, num_devices: int, fsdp: bool, precision: str) -> tuple:
    """The trainer's train step compiled on abstract state (no parameter is materialised),
    1 example per device: ``(compiled, abstract state, compile seconds)``."""
    import jax
    import optax
    from jax.sharding import NamedSharding

    from aurora_loop.parallel import make_mesh
    from aurora_loop.step import PRECISION_COMPUTE_DTYPES, StepOptions, make_init_fn, make_train_step, state_shardings

    mesh = make_mesh(num_devices)
    sample = make_sample(config, tuple(grid), levels, batch=num_devices)
    optimizer = optax.adamw(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, sample)  # shapes only: no parameter is materialised
    shardings = state_shardings(abstract, mesh, fsdp=fsdp)
    batch_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sample.partition_specs("data"))
    options = StepOptions(compute_dtype=PRECISION_COMPUTE_DTYPES[precision])
    step = make_train_step(task, optimizer, shardings, batch_sharding, mesh, options=options)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sample, batch_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    return compiled, abstract, time.perf_counter() - t0


