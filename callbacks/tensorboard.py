"""TensorBoardLogger: scalars, hyperparameters and forecast maps under ``output_dir/tensorboard``.

Written with tensorboardX, read by TensorBoard:

- scalars: ``train/loss``, ``train/grad_norm``, ``train/learning_rate`` and any other
  training metric as ``train/<name>``; validation scores as ``val/<name>`` (``val/loss``,
  ``val/mae/<var>``, ``val/rmse/<var>``); anything other callbacks hand over through
  :meth:`log_metrics` (``perf/steps_per_sec`` from Throughput, ...) under its own tag;
- hyperparameters (HParams plugin), written into the *same* run as the scalars (the log
  directory itself, shown as run ``.``), with ``val/loss`` and ``train/loss`` as its metrics,
  so every run directory is one row of the HParams table however often it resumed;
- at each validation, for chosen fields (default ``2t`` and ``z500``, else the first field
  the data has), an image ``val/maps/<field>`` of the predicted, target and error maps of
  the first validation example, each with a colour bar. It needs the task's optional
  ``predict(params, batch)``; without one no images are written;
- at each validation whose scores hold per-lead-time RMSEs for at least two lead times
  (``rmse/<field>/<lead>h``, an Aurora roll-out of 2+ steps, ``--val_rollout_steps``), an
  image ``val/rmse_by_lead``: RMSE against lead time, one panel per headline field (z500,
  t850, 2t, 10u where present). The per-lead scores themselves are scalars like the others,
  ``val/rmse/<field>/<lead>h``.

Only process 0 writes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.sinks import learning_rate_left_to_monitor

log = logging.getLogger(__name__)


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class TensorBoardLogger(Callback):
    """Write training scalars every ``log_every_n_steps`` steps, validation scores and maps.

    Args:
      log_dir: directory for the event files (``output_dir/tensorboard``).
      log_every_n_steps: training scalars cadence; reading them is the only sync it causes.
      flush_secs: how often tensorboardX's writer thread flushes to disk.
      hparams: hyperparameters to record (e.g. ``TrainingConfig.to_json_dict()``); lists
        become comma-joined strings, ``None`` the string ``"None"``.
      image_fields: fields to draw at each validation (names as in the metrics: ``2t``,
        ``z500``); ``None``: ``2t`` and ``z500`` when present; ``()``: no images.
      image_lead: which roll-out step (0-based) of the forecast to draw.
      lead_time_fields: fields of the ``val/rmse_by_lead`` image; ``None``: z500, t850, 2t
        and 10u when present; ``()``: no such image.
    """

    def __init__(
        self,
        log_dir: str,
        log_every_n_steps: int = 10,
        flush_secs: int = 30,
        hparams: Mapping[str, Any] | None = None,
        image_fields: Sequence[str] | None = None,
        image_lead: int = 0,
        lead_time_fields: Sequence[str] | None = None,
    ) -> None:
        self.log_dir = os.path.abspath(log_dir)
        self.log_every_n_steps = log_every_n_steps
        self.flush_secs = flush_secs
        self.hparams = dict(hparams) if hparams else {}
        self.image_fields = image_fields
        self.image_lead = image_lead
        self.lead_time_fields = lead_time_fields
        self._writer = None
        self._lr_from_monitor = False

    def writer(self, trainer: Any):
        """The tensorboardX writer on process 0 (``None`` elsewhere)."""
        if self._writer is None and trainer.is_main_process:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    # --- hyperparameters -------------------------------------------------------------------
    def on_fit_start(self, trainer: Any) -> None:
        self._lr_from_monitor = learning_rate_left_to_monitor(trainer)
        writer = self.writer(trainer)
        if writer is None or not self.hparams:
            return
        from tensorboardX.summary import hparams as hparams_summary

        values = {k: _hparam_value(v) for k, v in self.hparams.items()}
        experiment, session_start, session_end = hparams_summary(values, {"val/loss": math.nan, "train/loss": math.nan})
        file_writer = writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary, trainer.global_step)
        writer.flush()

    # --- scalars ---------------------------------------------------------------------------
    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return trainer.is_main_process and step % self.log_every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        writer = self.writer(trainer)
        for name in metrics:
            writer.add_scalar(f"train/{name}", metrics[name], step)
        if not self._lr_from_monitor:
            lr = trainer.learning_rate(step)
            if lr is not None:
                writer.add_scalar("train/learning_rate", lr, step)

    def log_metrics(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        """Logger protocol (see ``aurora_loop.callbacks.sinks``): scalars by full tag."""
        writer = self.writer(trainer)
        if writer is None:
            return
        for tag, value in metrics.items():
            writer.add_scalar(tag, float(value), step)

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        images = self._maps(trainer, step)  # on every process: the forecast is a collective
        writer = self.writer(trainer)
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(f"val/{name}", value, step)
        for name, image in images.items():
            writer.add_image(f"val/maps/{name}", image, step, dataformats="HWC")
        by_lead = self._rmse_by_lead(metrics, step)
        if by_lead is not None:
            writer.add_image("val/rmse_by_lead", by_lead, step, dataformats="HWC")
        writer.flush()

    def _rmse_by_lead(self, metrics: Mapping[str, float], step: int) -> Any:
        """RMSE against lead time as an (H, W, 3) image, or ``None`` when switched off or
        no chosen field has scores at two or more lead times."""
        if self.lead_time_fields is not None and not self.lead_time_fields:
            return None
        from aurora_loop.callbacks.lead_time import lead_curves, render_lead_curves

        curves = lead_curves(metrics, self.lead_time_fields)
        return render_lead_curves(curves, title=f"validation RMSE by lead time, step {step}") if curves else None

    # --- forecast maps ---------------------------------------------------------------------
    def _maps(self, trainer: Any, step: int) -> dict[str, Any]:
        """field -> rendered (H, W, 3) image (process 0; other processes only join the forecast)."""
        if self.image_fields is not None and not self.image_fields:
            return {}
        from aurora_loop.callbacks.maps import forecast_maps, lead_step, render_maps, validation_forecast

        forecast = validation_forecast(trainer, step)
        if forecast is None or not trainer.is_main_process:
            return {}
        batch, prediction = forecast
        maps = forecast_maps(prediction, batch.targets, self.image_fields, self.image_lead)
        lat, lon = batch.targets.metadata.lat, batch.targets.metadata.lon
        title = f"step {step}, lead step {lead_step(batch.targets, self.image_lead) + 1}"
        return {name: render_maps(name, pred, true, lat, lon, title=title) for name, (pred, true) in maps.items()}

    # --- shutdown --------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
