"""The classic training script, written as a run script that composes callbacks in Python.

    python examples/aurora_train.py --dataset_path era5.zarr --output_dir runs/a --epochs 5

It does what ``aurora-train`` does, but every piece is in view to change: the data, the
task, the optimizer and the callbacks. Without ``--dataset_path`` it trains on the built-in
synthetic sample. Add your own callbacks to the list below.
"""

from __future__ import annotations

import argparse
import os

from aurora_loop.callbacks import Callback, ModelCheckpoint, ProgressBar, TensorBoardLogger
from aurora_loop.config import TrainingConfig
from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.sample_data import write_sample_store
from aurora_loop.optim import learning_rate_schedule, make_optimizer
from aurora_loop.task import make_task
from aurora_loop.trainer import Trainer


class PrintBestValidationLoss(Callback):
    """A tiny custom callback: remember the best validation loss and say when it improves."""

    def __init__(self) -> None:
        self.best = float("inf")

    def on_validate(self, trainer, step, metrics):
        if metrics["loss"] < self.best and trainer.is_main_process:
            self.best = metrics["loss"]
            print(f"new best validation loss {self.best:.4f} at step {step}")

    def state_dict(self):  # survives a resume
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_path")
    parser.add_argument("--output_dir", default="outputs/example")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    args = parser.parse_args()

    out = os.path.abspath(args.output_dir)
    dataset_path = args.dataset_path
    if dataset_path is None:
        dataset_path = os.path.join(out, "sample_data.zarr")
        if not os.path.exists(dataset_path):
            os.makedirs(out, exist_ok=True)
            write_sample_store(dataset_path)
    config = TrainingConfig(dataset_path=dataset_path, output_dir=out, model=args.model, epochs=args.epochs,
                            batch_size=args.batch_size, learning_rate=args.learning_rate, num_gpus=1)

    train_data, val_data = build_loaders(config)
    schedule = learning_rate_schedule(config.learning_rate, len(train_data) * config.epochs, warmup_steps=20)
    trainer = Trainer(
        callbacks=[
            ProgressBar(every_n_steps=10),
            TensorBoardLogger(os.path.join(out, "tensorboard"), log_every_n_steps=10),
            ModelCheckpoint(os.path.join(out, "checkpoints"), every_n_steps=100, max_to_keep=2),
            PrintBestValidationLoss(),
        ],
        optimizer=make_optimizer(schedule, grad_clip_norm=1.0),
        log_learning_rate=schedule,
        max_epochs=config.epochs,
        num_devices=config.num_gpus,
        seed=config.seed,
    )
    trainer.fit(make_task(config.model, config), train_data, val_data)
    print(f"tensorboard --logdir {os.path.join(out, 'tensorboard')}")


if __name__ == "__main__":
    main()
