"""WandbLogger: the run's scalars, config and forecast maps in Weights & Biases (optional extra).

Install with ``pip install aurora_loop[wandb]``. Logs the same tags as TensorBoardLogger
(``train/<name>`` every ``log_every_n_steps`` steps, ``val/<name>`` at each validation, and
whatever other callbacks hand to loggers, e.g. ``perf/steps_per_sec``), the config, and
validation maps (``val/maps/<field>``) when the task has ``predict``. With a
LearningRateMonitor in the run, ``train/learning_rate`` is left to it (so it is logged once
per step). The W&B run id is part of the checkpoint, so a resumed training run continues the
same W&B run. Offline use: ``WANDB_MODE=offline`` (then ``wandb sync`` later). Only process 0
logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.sinks import learning_rate_left_to_monitor
from aurora_loop.errors import UsageError


class WandbLogger(Callback):
    """Log to Weights & Biases.

    Args:
      project: W&B project name.
      save_dir: directory for W&B's local files (``output_dir``; W&B adds ``wandb/``).
      config: the run's hyperparameters (e.g. ``TrainingConfig.to_json_dict()``).
      name: the run's display name.
      log_every_n_steps: training scalars cadence.
      image_fields: fields to draw at each validation (see TensorBoardLogger); ``()``: none.
      lead_time_fields: fields of the ``val/rmse_by_lead`` image (RMSE against lead time,
        drawn when validation scores two or more leads; see TensorBoardLogger); ``None``: the
        headline fields; ``()``: none.
      mode: ``online``, ``offline`` or ``disabled`` (default: W&B's own, e.g. ``WANDB_MODE``).
      init_kwargs: more keyword arguments for ``wandb.init``.
    """

    def __init__(
        self,
        project: str | None = None,
        save_dir: str = ".",
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        log_every_n_steps: int = 10,
        image_fields: Sequence[str] | None = (),
        mode: str | None = None,
        lead_time_fields: Sequence[str] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.project = project
        self.save_dir = os.path.abspath(save_dir)
        self.config = dict(config or {})
        self.name = name
        self.log_every_n_steps = log_every_n_steps
        self.image_fields = image_fields
        self.lead_time_fields = lead_time_fields
        self.mode = mode
        self.init_kwargs = dict(init_kwargs or {})
        self.run_id: str | None = None
        self._run = None
        self._lr_from_monitor = False

    @staticmethod
    def _wandb() -> Any:
        try:
            import wandb
        except ImportError:
            raise UsageError("WandbLogger needs wandb: pip install 'aurora_loop[wandb]' (or drop --use_wandb)") from None
        return wandb

    def run(self, trainer: Any) -> Any:
        """The W&B run on process 0 (started on first use), ``None`` elsewhere."""
        if self._run is None and trainer.is_main_process:
            wandb = self._wandb()
            os.makedirs(self.save_dir, exist_ok=True)
            kwargs = dict(project=self.project, dir=self.save_dir, config=self.config, name=self.name,
                          id=self.run_id, resume="allow" if self.run_id else None)
            if self.mode is not None:
                kwargs["mode"] = self.mode
            kwargs.update(self.init_kwargs)
            self._run = wandb.init(**kwargs)
            self.run_id = self._run.id
        return self._run

    def on_fit_start(self, trainer: Any) -> None:
        self._lr_from_monitor = learning_rate_left_to_monitor(trainer)
        self.run(trainer)

    def log_metrics(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        """Logger protocol (see ``aurora_loop.callbacks.sinks``): scalars by full tag."""
        run = self.run(trainer)
        if run is not None:
            run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return trainer.is_main_process and step % self.log_every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        scalars = {f"train/{k}": metrics[k] for k in metrics}
        if not self._lr_from_monitor:  # else the monitor hands it to this logger (log_metrics)
            lr = trainer.learning_rate(step)
            if lr is not None:
                scalars["train/learning_rate"] = lr
        self.log_metrics(trainer, step, scalars)

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        images = self._maps(trainer, step)  # on every process: the forecast is a collective
        run = self.run(trainer)
        if run is None:
            return
        payload: dict[str, Any] = {f"val/{k}": float(v) for k, v in metrics.items()}
        payload.update(images)
        by_lead = self._rmse_by_lead(metrics, step)
        if by_lead is not None:
            payload["val/rmse_by_lead"] = self._wandb().Image(by_lead)
        run.log(payload, step=step)

    def _rmse_by_lead(self, metrics: Mapping[str, float], step: int) -> Any:
        """RMSE against lead time as an (H, W, 3) image, or ``None`` (see TensorBoardLogger)."""
        if self.lead_time_fields is not None and not self.lead_time_fields:
            return None
        from aurora_loop.callbacks.lead_time import lead_curves, render_lead_curves

        curves = lead_curves(metrics, self.lead_time_fields)
        return render_lead_curves(curves, title=f"validation RMSE by lead time, step {step}") if curves else None

    def _maps(self, trainer: Any, step: int) -> dict[str, Any]:
        if self.image_fields is not None and not self.image_fields:
            return {}
        from aurora_loop.callbacks.maps import forecast_maps, render_maps, validation_forecast

        forecast = validation_forecast(trainer, step)
        if forecast is None or not trainer.is_main_process:
            return {}
        batch, prediction = forecast
        wandb = self._wandb()
        out = {}
        for name, (pred, true) in forecast_maps(prediction, batch.targets, self.image_fields).items():
            image = render_maps(name, pred, true, batch.targets.metadata.lat, batch.targets.metadata.lon, title=f"step {step}")
            out[f"val/maps/{name}"] = wandb.Image(image)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self.close(exit_code=1)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (writes its files)."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
