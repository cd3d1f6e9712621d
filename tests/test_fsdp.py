"""FSDP: parameters and optimizer state split over the ``data`` axis train exactly as
replicated ones do."""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec

from aurora_loop.config import TrainingConfig
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.optim import learning_rate_schedule, make_optimizer
from aurora_loop.parallel import make_mesh
from aurora_loop.step import TrainState, state_shardings
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples
from tests.test_step import LossLog


def _train(fsdp: bool):
    loader = ArrayLoader(make_samples(12), 4, stack_samples, seed=3)
    log = LossLog()
    trainer = Trainer([log], optimizer=make_optimizer(learning_rate_schedule(3e-3, 3, 1)), max_steps=3,
                      mesh=make_mesh(4), seed=1, fsdp=fsdp)
    state = trainer.fit(ConvTask(features=16, depth=2), loader)
    return [float(x) for x in log.losses], state


def test_fsdp_matches_replicated_and_shards():
    losses, state = _train(fsdp=False)
    losses_fsdp, state_fsdp = _train(fsdp=True)
    assert len(losses) == 3
    np.testing.assert_allclose(losses_fsdp, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state_fsdp.params, state.params)

    specs = [x.sharding.spec for x in jax.tree.leaves(state_fsdp.params)]
    assert any("data" in tuple(s) for s in specs), specs
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(state_fsdp.params) if "kernel" in jax.tree_util.keystr(p)]
    for k in kernels:  # conv kernels (3, 3, c_in, 16) and dense (16, c_out): split on the 16
        assert tuple(k.sharding.spec)[list(k.shape).index(16)] == "data", (k.shape, k.sharding.spec)
        assert k.addressable_shards[0].data.size == k.size // 4
    adam_mu = [x for x in jax.tree.leaves(state_fsdp.opt_state) if x.ndim >= 1]
    assert any("data" in tuple(x.sharding.spec) for x in adam_mu)
    assert all(tuple(x.sharding.spec) == () or x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))


def test_state_shardings_rule():
    mesh = make_mesh(4)
    sds = jax.ShapeDtypeStruct
    abstract = TrainState(step=sds((), np.int32), rng=sds((2,), np.uint32),
                          params={"a": sds((3, 8, 12), np.float32), "b": sds((5,), np.float32), "c": sds((), np.float32)},
                          opt_state=(sds((), np.int32), {"a": sds((3, 8, 12), np.float32)}))
    out = state_shardings(abstract, mesh, fsdp=True)
    assert out.params["a"].spec == PartitionSpec(None, None, "data")  # 12 > 8, both divisible
    assert out.params["b"].is_fully_replicated and out.params["c"].is_fully_replicated
    assert out.opt_state[1]["a"].spec == PartitionSpec(None, None, "data")
    assert out.rng.is_fully_replicated and out.step.is_fully_replicated
    assert all(s.is_fully_replicated for s in jax.tree.leaves(state_shardings(abstract, mesh)))


def test_config_field():
    assert TrainingConfig().fsdp is False
    assert TrainingConfig(fsdp=True).fsdp is True


def test_validation_maps_under_fsdp_are_the_replicated_forecast(tmp_path):
    """The forecast maps of a validation run under the parameters' FSDP shardings (before: one
    shard of each parameter was fed to the model) and equal the replicated model's forecast."""
    from aurora_loop.callbacks import TensorBoardLogger
    from aurora_loop.callbacks.maps import validation_forecast

    samples = make_samples(12)
    forecasts = {}
    for fsdp in (False, True):
        train = ArrayLoader(samples[:8], 4, stack_samples, seed=0)
        val = ArrayLoader(samples[8:], 4, stack_samples, shuffle=False)
        logger = TensorBoardLogger(str(tmp_path / f"tb-{fsdp}"), log_every_n_steps=1)
        trainer = Trainer([logger], optimizer=optax.adam(1e-3), max_steps=2, fsdp=fsdp, mesh=make_mesh(4), seed=0)
        trainer.fit(ConvTask(features=16, depth=2), train, val)
        if fsdp:
            assert any("data" in tuple(x.sharding.spec) for x in jax.tree.leaves(trainer.state.params))
        batch, prediction = validation_forecast(trainer, trainer.global_step)
        forecasts[fsdp] = prediction.surf_vars["2t"]
        assert forecasts[fsdp].shape == (1,) + batch.targets.surf_vars["2t"].shape[1:]
    np.testing.assert_allclose(forecasts[True], forecasts[False], rtol=1e-4, atol=1e-5)
