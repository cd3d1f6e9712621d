"""Fine-tune the tiny Aurora the way people fine-tune the real one, as a run script.

    python examples/fine_tune.py --output_dir runs/finetune [--dataset_path era5.zarr]
                                 [--checkpoint_dir pretrained/] [--max_time 00:02:30]

Every piece a fine-tuning run usually needs, composed in Python:

- gradient accumulation: 2 micro-batches of 2 per optimizer step (4 examples per update);
- a frozen encoder, except its patch embeddings, which learn at 20x the base rate (the
  usual recipe for new or re-purposed variables);
- an exponential moving average of the weights (validation and the forecast maps use it);
- a wall-clock limit that ends the run cleanly, with a checkpoint, before it is reached;
- validation rolled out 3 steps, scored per lead time (``val/rmse/<var>/<lead>h``) with an
  RMSE-against-lead image in TensorBoard.

Without ``--dataset_path`` it trains on the built-in synthetic sample; without
``--checkpoint_dir`` it starts from freshly initialised weights. Rerun the same command to
resume.
"""

from __future__ import annotations

import argparse
import os

from aurora_loop.callbacks import ModelCheckpoint, ProgressBar, TensorBoardLogger, TimeLimit
from aurora_loop.config import TrainingConfig, parse_duration
from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.sample_data import write_sample_store
from aurora_loop.optim import ParamGroups, learning_rate_schedule, make_optimizer
from aurora_loop.task import make_task
from aurora_loop.trainer import Trainer

# Parameter paths as `aurora-train --print_param_groups` lists them. The freeze pattern skips
# the embeddings (a frozen parameter ignores its learning-rate factor).
FREEZE = (r"encoder\.(?!surf_token_embeds|atmos_token_embeds).*",)
LR_MULTIPLIERS = {"encoder.surf_token_embeds": 20.0, "encoder.atmos_token_embeds": 20.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_path")
    parser.add_argument("--checkpoint_dir", help="pretrained encoder/, backbone/, decoder/ (aurora-loop import-checkpoint)")
    parser.add_argument("--output_dir", default="outputs/fine_tune")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_time", default="00:02:30", help="[DD:]HH:MM:SS")
    args = parser.parse_args()

    out = os.path.abspath(args.output_dir)
    dataset_path = args.dataset_path
    if dataset_path is None:
        dataset_path = os.path.join(out, "sample_data.zarr")
        if not os.path.exists(dataset_path):
            os.makedirs(out, exist_ok=True)
            write_sample_store(dataset_path)
    config = TrainingConfig(dataset_path=dataset_path, checkpoint_dir=args.checkpoint_dir, output_dir=out, model="tiny",
                            batch_size=2, accumulate_grad_batches=2, rollout_steps=1, val_rollout_steps=3, num_workers=2, num_gpus=1)
    train_data, val_data = build_loaders(config)
    updates_per_epoch = len(train_data) // config.accumulate_grad_batches
    schedule = learning_rate_schedule(args.learning_rate, updates_per_epoch * args.epochs, warmup_steps=5)
    groups = ParamGroups(freeze=FREEZE, lr_multipliers=LR_MULTIPLIERS)

    trainer = Trainer(
        callbacks=[
            ProgressBar(every_n_steps=5),
            TensorBoardLogger(os.path.join(out, "tensorboard"), log_every_n_steps=5),
            TimeLimit(parse_duration(args.max_time), label=f"--max_time {args.max_time}"),
            ModelCheckpoint(os.path.join(out, "checkpoints"), every_n_steps=10, max_to_keep=2),
        ],
        optimizer=make_optimizer(schedule, grad_clip_norm=1.0, groups=groups),
        log_learning_rate=schedule,
        max_epochs=args.epochs,
        val_every_n_steps=10,
        num_devices=config.num_gpus,
        seed=config.seed,
        trainable=groups.is_trainable,
        accumulate_grad_batches=config.accumulate_grad_batches,
        ema_decay=0.99,
    )
    trainer.fit(make_task(config.model, config), train_data, val_data)
    scores = trainer.last_val_metrics
    leads = sorted((k for k in scores if k.startswith("rmse/2t/")), key=lambda k: float(k.rsplit("/", 1)[1][:-1]))
    print("2t RMSE by lead time (EMA weights): " + ", ".join(f"{k.rsplit('/', 1)[1]} {scores[k]:.3g} K" for k in leads))
    print(f"tensorboard --logdir {os.path.join(out, 'tensorboard')}")


if __name__ == "__main__":
    main()
