"""Training Aurora 1.5: sampled lead times, output-only targets, input clipping in the
roll-out, and the ensemble task's fair-CRPS loss and validation scores.

The end-to-end runs use the tiny 1.5 model (the parity fixtures' size) on an hourly sample
store with every 1.5 variable, through ``aurora-train`` itself.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.cli.train import main
from aurora_loop.model.batch import Batch, Metadata, Sample
from aurora_loop.weather.losses import WeightedCRPS, WeightedMAE
from aurora_loop.weather.rollout import rollout_loss, rollout_scan
from tests.test_multiprocess import LAUNCHER_VARS
from tests.xla_flags import FAST_COMPILE


def _batch(b: int, t: int, value: float | np.ndarray = 0.0, time: float = 0.0) -> Batch:
    field = np.broadcast_to(np.asarray(value, np.float32), (b, t, 4, 8)).copy()
    return Batch({"2t": field, "tcc": field.copy()}, {}, {"t": field[:, :, None].copy()},
                 Metadata(lat=np.linspace(60, -60, 4), lon=np.linspace(0, 315, 8), time=np.full(b, time), atmos_levels=(500,)))


def test_sampled_lead_time_sets_the_last_steps_valid_time_in_every_mode() -> None:
    """Targets k < R are one model step apart; the last is ``lead_hours`` after the one before."""
    sample = Sample(_batch(2, 2, time=100.0), _batch(2, 3, time=106.0), np.array([1.0, 3.0], np.float32))

    def predict(inputs: Batch, step: jax.Array) -> Batch:
        return inputs.time_slice(1, 2)

    times = rollout_scan(predict, sample, lambda p, t: jnp.asarray(t.metadata.time), use_scan=False)
    np.testing.assert_allclose(np.asarray(times), [[106, 106], [112, 112], [113, 115]])

    seen = []
    rollout_loss(predict, lambda p, t: (seen.append(t.metadata.time), 0.0)[1], sample, mode="pushforward", use_scan=False)
    np.testing.assert_allclose(np.asarray(seen[-1]), [113, 115])


def test_fed_back_predictions_are_clipped_but_scored_unclipped() -> None:
    sample = Sample(_batch(1, 2), _batch(1, 2, time=6.0))

    def predict(inputs: Batch, step: jax.Array) -> Batch:
        newest = inputs.time_slice(1, 2)
        return newest.replace(surf_vars={k: v - 1.0 for k, v in newest.surf_vars.items()})

    clip = lambda p: p.replace(surf_vars={k: jnp.maximum(v, 0.0) if k == "tcc" else v for k, v in p.surf_vars.items()})  # noqa: E731
    scored = rollout_scan(predict, sample, lambda p, t: p.surf_vars["tcc"].min(), use_scan=False, feed_back=clip)
    unclipped = rollout_scan(predict, sample, lambda p, t: p.surf_vars["2t"].min(), use_scan=False, feed_back=clip)
    assert list(np.asarray(scored)) == [-1.0, -1.0]  # tcc re-enters at 0 and is predicted at -1 again
    assert list(np.asarray(unclipped)) == [-1.0, -2.0]  # 2t is not clipped: the errors compound


def test_crps_loss_of_a_degenerate_ensemble_is_the_weighted_mae() -> None:
    rng = np.random.default_rng(0)
    target = _batch(3, 1, rng.normal(280, 5, (3, 1, 4, 8)))
    prediction = _batch(3, 1, rng.normal(280, 5, (3, 1, 4, 8)))
    members = 4
    repeated = prediction.replace(surf_vars={k: np.repeat(v, members, 0) for k, v in prediction.surf_vars.items()},
                                  atmos_vars={k: np.repeat(v, members, 0) for k, v in prediction.atmos_vars.items()})
    for lat_weighted in (False, True):
        mae = WeightedMAE(latitude_weighted=lat_weighted)(prediction, target)
        crps = WeightedCRPS(latitude_weighted=lat_weighted, members=members)(repeated, target)
        np.testing.assert_allclose(np.asarray(crps), np.asarray(mae), rtol=1e-6)
    # Spread lowers the score of an ensemble centred on the forecast only through the spread term.
    spread = repeated.replace(surf_vars={k: v + rng.normal(0, 1, v.shape).astype(np.float32) for k, v in repeated.surf_vars.items()})
    assert not np.allclose(np.asarray(WeightedCRPS(members=members)(spread, target)), np.asarray(WeightedMAE()(prediction, target)))


@pytest.fixture(scope="module")
def hourly_store(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    path = str(tmp_path_factory.mktemp("v1p5") / "store.zarr")
    write_sample_store(path, times=60, step_hours=1, variables="v1p5", levels=(250, 500, 850, 1000))
    return path


def _scalars(run: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(os.path.join(run, "tensorboard*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_ensemble_trains_with_crps_on_sampled_lead_times_over_two_devices(hourly_store, tmp_path, capsys) -> None:
    """aurora-train --model v1p5_ensemble_tiny: two members per example, lead times drawn
    from 1, 3, 6 h for the last of two roll-out steps, the batch (and so the members) split
    over two devices; validation reports CRPS and spread/skill per variable."""
    out = str(tmp_path / "run")
    # A subprocess, so that XLA's slow optimisations can be turned off (as the scenario matrix does).
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", XLA_FLAGS=FAST_COMPILE)
    proc = subprocess.run([sys.executable, "-m", "aurora_loop.cli.train", "--model", "v1p5_ensemble_tiny", "--dataset_path", hourly_store,
                           "--output_dir", out, "--lead_times", "1,3,6", "--ensemble_members", "2", "--rollout_steps", "2",
                           "--batch_size", "2", "--num_gpus", "2", "--max_steps", "3", "--val_every_n_steps", "3",
                           "--log_every_n_steps", "1", "--learning_rate", "1e-3"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CRPS" in proc.stdout and "spread/skill" in proc.stdout  # the console shows the ensemble scores
    scalars = _scalars(out)
    for var in ("2t", "scaled_tp_1h", "z500", "blh"):  # output-only variables are scored as targets
        assert np.isfinite(scalars[f"val/crps/{var}"][-1]) and np.isfinite(scalars[f"val/spread_skill/{var}"][-1]), var
        assert scalars[f"val/crps/{var}"][-1] <= scalars[f"val/mae/{var}"][-1] + 1e-6 * abs(scalars[f"val/mae/{var}"][-1])
    assert scalars["val/mae/insolation"][-1] < 1e-5  # prescribed, not predicted
    assert all(np.isfinite(scalars["train/loss"]))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["lead_times"] == [1.0, 3.0, 6.0] and len(config["surf_vars"]) == 26 and config["ensemble_members"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny", "--lead_times", "1,6"], "--lead_times needs a model with per-sample lead times"),
    (["--model", "conv", "--lead_times", "1,6"], "--lead_times needs a model with per-sample lead times"),
    (["--model", "v1p5_tiny", "--ensemble_members", "2"], "--ensemble_members 2 needs an ensemble model"),
    (["--model", "v1p5_ensemble_tiny"], "pass --ensemble_members M with M >= 2"),
    (["--model", "v1p5_tiny", "--lead_times", "1,6", "--rollout_mode", "replay", "--rollout_steps", "2"], "does not combine with --rollout_mode replay"),
    (["--model", "v1p5_ensemble_tiny", "--ensemble_members", "2", "--rollout_mode", "replay", "--rollout_steps", "2"],
     "the ensemble task does not train in --rollout_mode replay"),
])
def test_lead_times_and_members_the_model_cannot_take_are_one_line_errors(hourly_store, tmp_path, capsys, flags, message) -> None:
    code = main(["--dataset_path", hourly_store, "--output_dir", str(tmp_path / "run"), "--batch_size", "2", "--num_gpus", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run" / "config.json")
