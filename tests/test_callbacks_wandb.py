"""WandbLogger in offline mode: what it wrote to the run's .wandb file, read back."""

from __future__ import annotations

import glob
import json
import struct
import time
import types

import optax
import pytest
from wandb.sdk.wandb_run import Run  # wandb is in the [test] extra: missing fails, it does not skip

from aurora_loop.callbacks import LearningRateMonitor, WandbLogger
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


def wandb_records(path: str) -> list:
    """Records of a .wandb file (a LevelDB-style log of protobuf ``Record``s in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B"
    pos, block, raw, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            raw.append(pending + chunk)
            pending = b""
    records = []
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


def finished_records(path: str, wait_s: float = 120.0) -> list:
    """The file's records once W&B's service wrote the run's exit record (it writes the file
    in the background, sometimes after ``finish()`` returned)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(path: str) -> dict[int, dict]:
    rows = {}
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def test_offline_run_logs_scalars_maps_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    samples = make_samples(12, grid=(8, 16))
    train = ArrayLoader(samples[:8], 2, stack_samples, seed=0)
    val = ArrayLoader(samples[8:], 2, stack_samples, shuffle=False)
    logger = WandbLogger(project="aurora-test", save_dir=str(tmp_path), config={"learning_rate": 1e-3}, log_every_n_steps=2, image_fields=None)
    trainer = Trainer([logger], optimizer=optax.adam(1e-3), log_learning_rate=1e-3, max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(features=8, depth=2), train, val)
    run_id = logger.run_id
    assert run_id and logger.state_dict() == {"run_id": run_id}

    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    rows = history(files[0])
    assert sorted(rows) == [2, 4]
    assert rows[4]["val/loss"] == pytest.approx(trainer.last_val_metrics["loss"], rel=1e-6)
    assert rows[4]["val/rmse/z500"] == pytest.approx(trainer.last_val_metrics["rmse/z500"], rel=1e-6)
    assert rows[2]["train/learning_rate"] == pytest.approx(1e-3)
    assert "train/loss" in rows[2] and "train/grad_norm" in rows[4]
    for field in ("2t", "z500"):
        assert rows[4][f"val/maps/{field}/_type"] == "image-file"
        assert rows[4][f"val/maps/{field}/width"] > 2 * rows[4][f"val/maps/{field}/height"] > 0
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "val" / "maps" / "*.png"))

    # A resumed training run (callback state from the checkpoint) continues the same W&B run.
    resumed = WandbLogger(project="aurora-test", save_dir=str(tmp_path))
    resumed.load_state_dict(logger.state_dict())
    fake = types.SimpleNamespace(is_main_process=True, learning_rate=lambda step: None, task=None, val_data=None,
                                 callbacks=[resumed])
    resumed.on_fit_start(fake)
    resumed.log_metrics(fake, 6, {"perf/steps_per_sec": 3.0})
    # Scores at several lead times (an Aurora roll-out validation) also draw RMSE against lead.
    resumed.on_validate(fake, 8, {"loss": 1.0, "rmse/2t/6h": 1.0, "rmse/2t/12h": 1.5, "mae/2t/6h": 0.8, "mae/2t/12h": 1.2})
    resumed.close()
    assert resumed.run_id == run_id
    # (Offline run directories are named by the second they started, so the resumed run may
    # share the first one's directory.)
    resumed_rows = [history(f) for f in glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))]
    assert [rows[6]["perf/steps_per_sec"] for rows in resumed_rows if 6 in rows] == [3.0]
    (by_lead,) = [rows[8] for rows in resumed_rows if 8 in rows]
    assert by_lead["val/rmse/2t/12h"] == 1.5 and by_lead["val/rmse_by_lead/_type"] == "image-file"
    assert "val/rmse_by_lead/_type" not in rows[4]  # the conv task scores no lead times


@pytest.mark.parametrize("with_monitor", [True, False], ids=["with_lr_monitor", "without_lr_monitor"])
def test_learning_rate_is_logged_once_per_step(tmp_path, monkeypatch, with_monitor):
    """With a LearningRateMonitor the logger leaves train/learning_rate to it (else both log it)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls: list[tuple[int, dict]] = []
    real_log = Run.log

    def spy(self, data, step=None, commit=None):
        calls.append((step, dict(data)))
        return real_log(self, data, step=step, commit=commit)

    monkeypatch.setattr(Run, "log", spy)
    schedule = optax.linear_schedule(1e-3, 1e-4, transition_steps=4)
    samples = make_samples(8, grid=(8, 16))
    train = ArrayLoader(samples, 2, stack_samples, seed=0)
    logger = WandbLogger(project="aurora-test", save_dir=str(tmp_path), log_every_n_steps=2, image_fields=())
    callbacks = [LearningRateMonitor(every_n_steps=2), logger] if with_monitor else [logger]
    trainer = Trainer(callbacks, optimizer=optax.adam(schedule), log_learning_rate=schedule, max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(features=8, depth=2), train)

    expected = {2: float(schedule(1)), 4: float(schedule(3))}  # step s used schedule(s - 1)
    lr_calls = [(step, data["train/learning_rate"]) for step, data in calls if "train/learning_rate" in data]
    assert sorted(step for step, _ in lr_calls) == [2, 4]  # once per log step, not twice
    assert dict(lr_calls) == pytest.approx(expected)
    assert sorted(step for step, data in calls if "train/loss" in data) == [2, 4]
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{logger.run_id}.wandb"))
    rows = history(path)
    assert {step: rows[step]["train/learning_rate"] for step in expected} == pytest.approx(expected)


def test_missing_wandb_is_a_usage_error(monkeypatch):
    import builtins

    from aurora_loop.errors import UsageError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UsageError, match=r"pip install 'aurora_loop\[wandb\]'"):
        WandbLogger().run(types.SimpleNamespace(is_main_process=True))
