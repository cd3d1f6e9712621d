"""CLU validation metrics: the same numbers on 1 and 4 devices, and WeatherBench2's definitions."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import batch_shardings, make_mesh, place_batch, replicated
from aurora_loop.step import make_eval_step
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.weather.metrics import MeanMetrics
from tests.synthetic import make_samples

ROLLOUT = 2


@pytest.fixture(scope="module")
def setup():
    samples = make_samples(8, grid=(8, 16), rollout_steps=ROLLOUT, seed=3)
    batches = [stack_samples(samples[i : i + 4]) for i in (0, 4)]
    task = ConvTask(features=8, depth=2)
    params = task.init(jax.random.PRNGKey(1), batches[0])
    # Perturb the zero-initialised output layer so predictions differ from persistence.
    params = jax.tree.map(lambda x: x + 0.01 * np.cos(np.arange(x.size).reshape(x.shape)), params)
    return task, params, batches


@pytest.fixture(scope="module")
def scores(setup):
    """Per-batch metrics and the merged scores on 1 and on 4 devices (one compile each)."""
    task, params, batches = setup
    out = {}
    for n in (1, 4):
        parts = validation_parts(task, params, batches, n)
        out[n] = (parts, parts[0].merge(parts[1]).compute())
    return out


def validation_parts(task, params, batches, num_devices: int) -> list[MeanMetrics]:
    """The trainer's validation step on a mesh of ``num_devices`` devices, per batch."""
    mesh = make_mesh(num_devices)
    eval_step = make_eval_step(task, replicated(mesh), None, mesh)
    params = jax.device_put(params, replicated(mesh))
    parts = [eval_step(params, place_batch(batch, batch_shardings(batch, mesh))) for batch in batches]
    assert all(isinstance(part, MeanMetrics) for part in parts)
    return parts


def reference_scores(task, params, batches) -> dict[str, float]:
    """WeatherBench2 in numpy: area-weighted errors per example (averaged over lead times),
    then MAE = mean over examples, RMSE = sqrt(mean over examples of the weighted MSE)."""
    predict = jax.jit(task.predict)
    abs_err, sq_err = {}, {}
    for batch in batches:
        prediction = jax.device_get(predict(params, batch))
        lat = np.deg2rad(np.asarray(batch.targets.metadata.lat, np.float64))
        half = (lat[1] - lat[0]) / 2
        edges = np.clip(np.concatenate([[lat[0] - half], (lat[:-1] + lat[1:]) / 2, [lat[-1] + half]]), -np.pi / 2, np.pi / 2)
        weights = np.abs(np.sin(edges[1:]) - np.sin(edges[:-1]))
        weights = (weights / weights.mean())[:, None]
        fields = {name: (prediction.surf_vars[name], batch.targets.surf_vars[name]) for name in batch.targets.surf_vars}
        for name, value in batch.targets.atmos_vars.items():
            for i, level in enumerate(batch.targets.metadata.atmos_levels):
                fields[f"{name}{level}"] = (prediction.atmos_vars[name][:, :, i], value[:, :, i])
        for name, (pred, true) in fields.items():
            error = np.asarray(pred, np.float64) - np.asarray(true, np.float64)  # (b, t, h, w)
            abs_err.setdefault(name, []).extend(np.mean(np.abs(error) * weights, axis=(1, 2, 3)))
            sq_err.setdefault(name, []).extend(np.mean(error**2 * weights, axis=(1, 2, 3)))
    out = {f"mae/{k}": float(np.mean(v)) for k, v in abs_err.items()}
    out.update({f"rmse/{k}": float(np.sqrt(np.mean(v))) for k, v in sq_err.items()})
    return out


def test_same_numbers_on_one_and_four_devices(scores):
    one, four = scores[1][1], scores[4][1]
    assert set(one) == set(four)
    assert {"loss", "mae/2t", "rmse/2t", "mae/z500", "rmse/z500", "rmse/t850", "mae/msl"} <= set(one)
    for name in one:
        assert four[name] == pytest.approx(one[name], rel=1e-5), name


def test_scores_follow_weatherbench2(setup, scores):
    task, params, batches = setup
    computed = scores[4][1]
    reference = reference_scores(task, params, batches)
    assert set(reference) == {k for k in computed if k != "loss"}
    for name, value in reference.items():
        assert computed[name] == pytest.approx(value, rel=1e-4), name
    # RMSE >= MAE for every field, and the errors are in physical units (z500 in m2/s2).
    for name in (k[4:] for k in reference if k.startswith("mae/")):
        assert computed[f"rmse/{name}"] >= computed[f"mae/{name}"]
    assert computed["rmse/z500"] > 10 * computed["rmse/2t"]


def test_merge_order_does_not_matter(scores):
    parts, forward = scores[4]
    backward = MeanMetrics.empty().merge(parts[1]).merge(parts[0]).compute()
    for name in forward:
        assert backward[name] == pytest.approx(forward[name], rel=1e-6)
