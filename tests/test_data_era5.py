"""Real ERA5 end to end: convert the NetCDF sample, load it, train the conv baseline, validate."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from aurora_loop.callbacks import Callback
from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.convert import convert
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer

ERA5 = Path(__file__).parent / "data" / "era5-levels-members.nc"


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def wants_sync(self, trainer, step):
        return True

    def on_step(self, trainer, step, metrics):
        self.losses.append(float(metrics["loss"]))


def test_real_era5_trains_and_validates(tmp_path):
    store = tmp_path / "era5.zarr"
    convert([ERA5], store)
    # 4 times 12 h apart x 10 members: train on the first start, validate on the second
    config = SimpleNamespace(
        dataset_path=str(store), batch_size=2, num_workers=2, rollout_steps=1, seed=0,
        surf_vars=(), static_vars=(), atmos_vars=("z", "t"), levels=(500, 850),
        train_start="2017-01-01T00", train_end="2017-01-02T00", val_start="2017-01-01T12", val_end="2017-01-02T12",
    )
    train, val = build_loaders(config)
    assert len(train) == 5 and len(val) == 5  # 10 members per start, 2 per batch
    batch = next(iter(train))
    assert batch.inputs.atmos_vars["z"].shape == (2, 2, 2, 61, 120)
    assert batch.inputs.metadata.atmos_levels == (500, 850)
    assert batch.inputs.metadata.datetimes[0].isoformat() == "2017-01-01T12:00:00"
    train.set_epoch(0)

    recorder = LossRecorder()
    trainer = Trainer(callbacks=[recorder], max_epochs=3, num_devices=1, seed=0)
    trainer.fit(ConvTask(features=8, depth=2), train, val)
    assert len(recorder.losses) == 15
    assert np.mean(recorder.losses[-5:]) < np.mean(recorder.losses[:5])  # it learns from real fields
    metrics = trainer.last_val_metrics
    for key in ("loss", "rmse/z500", "rmse/t850", "mae/z850"):
        assert math.isfinite(metrics[key]), key
    assert 10 < metrics["rmse/z500"] < 2000  # m2 s-2 after 12 h: a forecast, not noise
