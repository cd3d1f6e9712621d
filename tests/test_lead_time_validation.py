"""Per-lead-time validation of roll-outs: ``rmse/<field>/<lead>h`` scores (WeatherBench2's
RMSE at each lead), the same on 1 and 4 devices, the ``val/rmse_by_lead`` TensorBoard image,
and ``--val_rollout_steps`` validation samples from ``build_loaders``."""

from __future__ import annotations

import io
import types

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from aurora_loop.callbacks import TensorBoardLogger
from aurora_loop.callbacks.lead_time import lead_curves
from aurora_loop.errors import UsageError
from aurora_loop.model import AuroraConfig
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.aurora import AuroraTask
from aurora_loop.trainer import Trainer
from aurora_loop.weather.metrics import latitude_weights, lead_label, split_lead_key
from tests.synthetic import make_samples

STEPS = 3  # validation roll-out: leads 6 h, 12 h, 18 h
LEADS = ("6h", "12h", "18h")


def _micro() -> AuroraConfig:
    """A two-stage Aurora small enough to compile three unrolled steps quickly on CPU."""
    return AuroraConfig(
        encoder_depths=(1, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 1), decoder_num_heads=(4, 2),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2, timestep_hours=6.0,
        surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One validation on a 4-device mesh through the Trainer (scores and TensorBoard events),
    and the same parameters' scores and forecast on one device."""
    out = tmp_path_factory.mktemp("lead")
    batch = stack_samples(make_samples(4, grid=(16, 32), rollout_steps=STEPS, seed=2))
    task = AuroraTask(_micro(), name="micro")
    logger = TensorBoardLogger(str(out / "tb"), image_fields=())  # no maps: one compile less
    trainer = Trainer([logger], max_steps=0, mesh=make_mesh(4), seed=0)
    trainer.fit(task, [batch], [batch])  # no training step: sets up state and the eval step
    four = trainer.validate(1)
    logger.close()
    params = jax.device_get(trainer.state.params)
    one = jax.jit(task.evaluate)(params, batch).compute()
    prediction = jax.device_get(jax.jit(task.predict)(params, batch))
    acc = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    return dict(batch=batch, four=four, one=one, prediction=prediction, acc=acc)


def test_per_lead_scores_follow_weatherbench2(run):
    """``rmse/2t/12h`` = sqrt(mean over examples of the area-weighted MSE at the second step),
    from the task's own forecast; the averaged keys stay the mean over leads."""
    scores, prediction, targets = run["one"], run["prediction"], run["batch"].targets
    fields = ("2t", "msl", "z500", "z850", "t500", "t850")
    for kind in ("mae", "rmse"):
        for field in fields:
            assert f"{kind}/{field}" in scores
            for lead in LEADS:
                assert f"{kind}/{field}/{lead}" in scores
    assert "loss" in scores and not any(k.startswith("loss/") for k in scores)

    pred, true = np.asarray(prediction.surf_vars["2t"], np.float64), np.asarray(targets.surf_vars["2t"], np.float64)
    assert pred.shape == true.shape == (4, STEPS, 16, 32)
    weights = np.asarray(latitude_weights(prediction.metadata.lat), np.float64)[:, None]
    for k, lead in enumerate(LEADS):
        error = pred[:, k] - true[:, k]  # (b, h, w)
        mse = np.mean(error**2 * weights, axis=(1, 2))  # per example
        np.testing.assert_allclose(scores[f"rmse/2t/{lead}"], np.sqrt(np.mean(mse)), rtol=1e-5)
        np.testing.assert_allclose(scores[f"mae/2t/{lead}"], np.mean(np.abs(error) * weights), rtol=1e-5)
    assert scores["rmse/2t/12h"] > 0
    for field in fields:
        np.testing.assert_allclose(scores[f"mae/{field}"], np.mean([scores[f"mae/{field}/{lead}"] for lead in LEADS]), rtol=1e-5)


def test_per_lead_scores_equal_on_one_and_four_devices(run):
    one, four = run["one"], run["four"]
    assert set(one) == set(four)
    for name in one:
        assert four[name] == pytest.approx(one[name], rel=1e-5), name


def test_tensorboard_has_per_lead_scalars_and_the_rmse_by_lead_image(run):
    acc = run["acc"]
    tags = set(acc.Tags()["scalars"])
    for lead in LEADS:
        for name in (f"val/rmse/2t/{lead}", f"val/rmse/z500/{lead}", f"val/mae/t850/{lead}"):
            assert name in tags
            (event,) = acc.Scalars(name)
            assert event.step == 1 and np.isfinite(event.value)
    assert acc.Scalars("val/rmse/2t/12h")[0].value == pytest.approx(run["four"]["rmse/2t/12h"], rel=1e-6)
    assert set(acc.Tags()["images"]) == {"val/rmse_by_lead"}
    (image,) = acc.Images("val/rmse_by_lead")
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(image.encoded_image_string), format="png")
    # Three panels side by side (z500, t850, 2t; the data has no 10u), not a blank canvas.
    assert pixels.shape[1] > 2 * pixels.shape[0]
    assert len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20


def test_lead_keys_and_curves():
    assert [lead_label(h) for h in (6, 12.0, 1.5, 240)] == ["6h", "12h", "1.5h", "240h"]
    assert split_lead_key("rmse/z500/12h") == ("rmse", "z500", 12.0)
    assert split_lead_key("mae/2t/1.5h") == ("mae", "2t", 1.5)
    for name in ("rmse/z500", "loss", "val/rmse/z500/12h", "rmse/z500/12", "loss/2t/6h"):
        assert split_lead_key(name) is None, name
    metrics = {"rmse/z500/12h": 2.0, "rmse/z500/6h": 1.0, "rmse/q700/6h": 3.0, "rmse/q700/12h": 4.0, "rmse/2t/6h": 0.5, "mae/z500/6h": 9.0}
    curves = lead_curves(metrics)  # 2t has one lead only: no curve
    assert list(curves) == ["z500"]
    np.testing.assert_array_equal(curves["z500"][0], [6.0, 12.0])
    np.testing.assert_array_equal(curves["z500"][1], [1.0, 2.0])
    assert list(lead_curves({k: v for k, v in metrics.items() if "z500" not in k})) == ["q700"]  # no headline field: the first
    assert list(lead_curves(metrics, fields=("q700", "10u"))) == ["q700"]


def test_no_rmse_by_lead_image_for_one_lead_or_when_switched_off(tmp_path):
    trainer = types.SimpleNamespace(is_main_process=True)
    two_leads = {"loss": 1.0, "rmse/2t/6h": 1.0, "rmse/2t/12h": 1.5}
    one_lead = {"loss": 1.0, "rmse/2t": 1.0, "rmse/2t/6h": 1.0}
    for name, fields, metrics, expected in (("a", None, two_leads, True), ("b", None, one_lead, False), ("c", (), two_leads, False)):
        logger = TensorBoardLogger(str(tmp_path / name), image_fields=(), lead_time_fields=fields)
        logger.on_validate(trainer, 3, metrics)
        logger.close()
        acc = event_accumulator.EventAccumulator(str(tmp_path / name))
        acc.Reload()
        assert ("val/rmse_by_lead" in acc.Tags()["images"]) == expected, name
        assert "val/rmse/2t/6h" in acc.Tags()["scalars"]


# --- --val_rollout_steps in build_loaders -----------------------------------------------------
def _config(path, **changes) -> types.SimpleNamespace:
    base = dict(dataset_path=str(path), static_path=None, batch_size=2, num_workers=0, rollout_steps=1, val_rollout_steps=3, seed=0,
                surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"), levels=(500, 850), history=2,
                train_start=None, train_end=None, val_start=None, val_end=None, variable_map=None)
    return types.SimpleNamespace(**{**base, **changes})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    return write_sample_store(tmp_path_factory.mktemp("data") / "s.zarr", grid=(8, 16), times=24, levels=(500, 850))


def test_validation_loader_rolls_out_val_rollout_steps(store):
    from aurora_loop.datasets import build_loaders

    train, val = build_loaders(_config(store))
    train_batches, val_batches = list(train), list(val)  # one pass each (the loaders are resumable)
    assert all(b.targets.surf_vars["2t"].shape[:2] == (2, 1) for b in train_batches)
    assert all(b.targets.surf_vars["2t"].shape[:2] == (2, STEPS) for b in val_batches)
    assert val_batches[0].targets.atmos_vars["z"].shape[:2] == (2, STEPS)
    # No training target reaches a validation input (the default split: the last ~20%).
    last_train_target = max(np.asarray(b.targets.metadata.time).max() for b in train_batches)  # the only target (t = 1)
    first_val_input = min(np.asarray(b.inputs.metadata.time).min() - 6 for b in val_batches)  # hours; the older history step
    assert last_train_target < first_val_input
    # Unset, validation samples are shaped like training's.
    _, same = build_loaders(_config(store, val_rollout_steps=None, rollout_steps=2))
    assert next(iter(same)).targets.surf_vars["2t"].shape[:2] == (2, 2)


def test_too_short_validation_split_names_the_flag(store):
    from aurora_loop.datasets import build_loaders

    # 2020-01-06 00..18 is 4 times: no sample of 2 + 3 steps fits.
    short = _config(store, train_end="2020-01-05T18", val_start="2020-01-06T00", val_end="2020-01-06T18")
    with pytest.raises(UsageError) as err:
        build_loaders(short)
    message = str(err.value)
    assert "\n" not in message and "validation" in message and "--val_rollout_steps" in message and "5 steps" in message
    build_loaders(_config(store, train_end="2020-01-05T18", val_start="2020-01-06T00", val_end="2020-01-06T18", val_rollout_steps=1))
    with pytest.raises(UsageError, match="val_rollout_steps must be at least 1"):
        build_loaders(_config(store, val_rollout_steps=0))
