"""``tiny`` / ``small`` / ``aurora`` / ``v1p5`` / ``v1p5_tiny``: the Aurora model as a trainable task.

Aurora 1.5 (``v1p5``): the data's output-only variables are targets only (dropped from the
inputs), a sample's sampled lead time (``--lead_times``, ``Sample.lead_hours``) is the last
roll-out step's lead, and predictions are clipped (``rollout_input_clipping``) before they
are fed back. The ensemble model trains as its own task (:mod:`aurora_loop.tasks.aurora_ensemble`).

The loss is the Aurora paper's weighted mean absolute error on *normalised* variables
(:mod:`aurora_loop.weather.losses`; its weights, ``gamma`` and latitude weighting are settings).
Validation reports that loss as ``loss`` plus latitude-weighted ``mae/<var>`` and
``rmse/<var>`` in physical units.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_loop.errors import UsageError
from aurora_loop.model.aurora import apply, clip_rollout_inputs, init_params
from aurora_loop.model.batch import Batch, Sample
from aurora_loop.model.checkpoint import CheckpointError, load_config
from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.extend import extended_variables
from aurora_loop.model.posenc import KnownGrid
from aurora_loop.task import register_task
from aurora_loop.weather.losses import WeightedMAE
from aurora_loop.weather.metrics import MeanMetrics, weather_errors
from aurora_loop.weather.replay import ReplayConfig, ReplayTraining, replay_config
from aurora_loop.weather.rollout import rollout_loss, rollout_scan


def _overlay(fresh: Any, loaded: Any) -> Any:
    """``fresh`` with every leaf that ``loaded`` has replaced (nested dicts, merged leaf by leaf)."""
    if not isinstance(loaded, Mapping):
        return loaded
    return {**fresh, **{k: _overlay(fresh[k], v) if k in fresh else v for k, v in loaded.items()}}


def _dotted_leaves(tree: Any) -> list[str]:
    """The dotted paths of a tree's leaves (``aurora_loop.optim.param_path``)."""
    from aurora_loop.optim import param_path

    return [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _load_report(parts: Mapping[str, str], expected: Any, loaded: int, notes: Mapping[str, str]) -> dict[str, Any]:
    """:meth:`AuroraTask.pretrained_report` from the model's parameter shapes ``expected``, the
    count of values read and the notes on new parameters (dotted path -> note)."""
    from aurora_loop.optim import param_path

    sizes = {param_path(p): int(np.prod(v.shape)) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    total = sum(sizes.values())
    lora = sum(sizes.get(k, 0) for k, v in notes.items() if v == "new: LoRA adapter")
    no_part = sum(sizes.get(k, 0) for k, v in notes.items() if v.startswith("new: no pretrained"))
    new = {"LoRA adapters": lora, "new variables and history slots": max(total - loaded - lora - no_part, 0),
           "parts without pretrained weights": no_part}
    return {"parts": dict(parts), "parameters": total, "loaded": loaded, "new": {k: v for k, v in new.items() if v}}


def weighted_mae(prediction: Batch, target: Batch, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> jax.Array:
    """The paper's loss with its default weights, per example (b,) (:class:`WeightedMAE`)."""
    return WeightedMAE()(prediction, target, surf_stats)


class AuroraTask(ReplayTraining):
    """Aurora on ``Sample`` batches (inputs: t = history steps; targets: t = roll-out steps).

    Args:
      config: the architecture (its variables must include the data's).
      name: the registered name.
      rollout_average: average the loss over roll-out steps (else the last step's).
      pretrained: part name -> orbax directory (``encoder`` / ``backbone`` / ``decoder``)
        to start from; parts not given are freshly initialised.
      loss: the training loss (default: the paper's weights, :class:`WeightedMAE`).
      rollout_mode: ``full`` or ``pushforward`` (:func:`aurora_loop.weather.rollout.rollout_loss`;
        with ``config.remat`` and several steps, ``full`` also keeps only each step's input
        for the backward pass; one step relies on the per-block remat alone, since an outer
        checkpoint would only add a forward pass), or ``replay`` (:mod:`aurora_loop.weather.replay`, with ``replay``).
      new_weights_init: ``zero`` or ``default``: what the slices of variables the pretrained
        model lacks start from (:func:`aurora_loop.model.extend.adapt_pretrained`).
      pretrained_config: the pretrained model's config (default: the ``config.json`` beside
        the part directories, else ``config``): its variable order and history size.
    """

    def __init__(self, config: AuroraConfig, name: str = "aurora", rollout_average: bool = True,
                 pretrained: Mapping[str, str] | None = None, rollout_mode: str = "full",
                 replay: ReplayConfig | None = None, loss: WeightedMAE | None = None,
                 new_weights_init: str = "zero", pretrained_config: AuroraConfig | None = None) -> None:
        self.config = config
        self.loss_fn = loss or WeightedMAE()
        self.name = name
        self.rollout_average = rollout_average
        self._set_rollout_mode(rollout_mode, replay)
        self.pretrained = dict(pretrained or {})
        if new_weights_init not in ("zero", "default"):
            raise UsageError(f"new_weights_init must be zero or default, got {new_weights_init!r}")
        self.new_weights_init = new_weights_init
        self.pretrained_config = pretrained_config  # None: the config.json beside the parts, else ``config``
        self._new_notes: dict[str, str] = {}
        self._pretrained_report: dict[str, Any] | None = None
        self._fresh_masks: dict[tuple[str, ...], np.ndarray] = {}
        self._known_grid: KnownGrid | None = None  # set by setup()
        self._space: Any = None  # a bands.SpacePlan, set by bind_mesh() on a mesh with a space axis
        self._host_parts = self._read_pretrained() if self.pretrained else {}

    @property
    def model_config(self) -> AuroraConfig:
        """The model's configuration (``export-checkpoint`` writes it as ``config.json``)."""
        return self.config

    # -- helpers -----------------------------------------------------------------------------
    def _crop(self, sample: Sample) -> Sample:
        """Crop to the patch size; output-only variables (Aurora 1.5) leave the inputs."""
        p = self.config.patch_size
        inputs = sample.inputs.crop(p)
        if self.config.output_only_surf_vars or self.config.output_only_atmos_vars:
            inputs = inputs.replace(
                surf_vars={k: v for k, v in inputs.surf_vars.items() if k not in self.config.output_only_surf_vars},
                atmos_vars={k: v for k, v in inputs.atmos_vars.items() if k not in self.config.output_only_atmos_vars},
            )
        return Sample(inputs, sample.targets.crop(p), sample.lead_hours)

    _prepare = _crop  # what the replay buffer stores

    def bind_mesh(self, mesh: Any, fsdp: bool = False) -> None:
        """The trainer's mesh: with a ``space`` axis of more than one device, every example's
        grid is split in bands of rows over it (:mod:`aurora_loop.model.bands`); ``fsdp``:
        the parameters are split over all its devices, and each part of the model gathers
        its own."""
        from aurora_loop.model.bands import SpacePlan
        from aurora_loop.parallel import space_size

        self._space = SpacePlan(mesh, fsdp=fsdp) if space_size(mesh) > 1 else None

    def setup(self, example_batch: Sample) -> None:
        """Learn the data's grid from a host example batch before anything is traced, so the
        patch areas are constants of the compiled steps (:class:`KnownGrid`)."""
        meta = self._crop(example_batch).inputs.metadata
        if isinstance(meta.lat, np.ndarray) and isinstance(meta.lon, np.ndarray):
            self._known_grid = KnownGrid(meta.lat, meta.lon)
        if self._space is not None:
            from aurora_loop.model.bands import space_problem

            problem = space_problem(self.config, self._crop(example_batch).inputs.spatial_shape, self._space.devices)
            if problem:
                raise UsageError(problem)

    def _predict_fn(self, params: Any, sample: Sample | None = None, rng: jax.Array | None = None):
        """``predict(inputs, step)`` for the roll-out helpers. ``sample``'s sampled lead times
        (``lead_hours``) apply to its last step; ``rng``: a stochastic model's noise, fresh
        for every step (without it, a fixed key: evaluation stays reproducible)."""
        cfg = self.config
        lead_hours = None if sample is None or not cfg.variable_lead_time else sample.lead_hours
        last_step = None if sample is None else sample.targets.num_steps - 1
        if cfg.stochastic and rng is None:
            rng = jax.random.key(0)

        def predict(inputs: Batch, step: jax.Array) -> Batch:
            lead = None
            if lead_hours is not None:
                lead = jnp.where(step == last_step, jnp.asarray(lead_hours), cfg.timestep_hours)
            key = None if rng is None else jax.random.fold_in(rng, step)
            return apply(cfg, params, inputs, rollout_step=step, known_grid=self._known_grid, lead_times=lead, rng=key,
                         space=self._space)

        return predict

    def _feed_back(self, prediction: Batch) -> Batch:
        """A prediction as the next input: clipped to ``rollout_input_clipping`` (Aurora 1.5)."""
        return clip_rollout_inputs(self.config, prediction)

    def _step_loss(self, prediction: Batch, target: Batch) -> jax.Array:
        return jnp.mean(self.loss_fn(prediction, target, self.config.surf_stats_dict))

    # -- the Task protocol --------------------------------------------------------------------
    def init(self, rng: jax.Array, example_batch: Sample) -> Any:
        """Fresh parameters, with the pretrained parts swapped in. Traceable: the trainer
        calls it under ``jit``; the pretrained arrays (read on the host when the task was
        made) enter through a host callback rather than as compiled-in constants."""
        fresh = init_params(self.config, rng, self._crop(example_batch).inputs)
        params = fresh
        if self._host_parts:
            from aurora_loop.model.extend import apply_fresh

            host = self._host_parts
            shapes = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32), host)
            loaded = jax.pure_callback(lambda: host, shapes)
            params = _overlay(fresh, loaded)
            # --new_weights_init default: new variables' slices from the fresh initialisation
            # (the host parts hold zeros there).
            params = apply_fresh(params, fresh, self._fresh_masks, jnp.where)
        return params

    def _read_pretrained(self) -> dict[str, Any]:
        """The pretrained parts as float32 numpy trees shaped for the config.

        The pretrained model may have fewer variables or a shorter history than ``config``:
        its weights are then mapped by variable name, and the new slices start from zeros
        (``new_weights_init``; :func:`aurora_loop.model.extend.adapt_pretrained`). Anything
        else that does not fit is a UsageError naming the parameter.
        """
        from aurora_loop.model.checkpoint import PARTS, param_shapes, restore_on_host
        from aurora_loop.model.extend import ExtendError, adapt_pretrained, describe_extension, new_slice_masks, new_variables
        from aurora_loop.model.normalisation import surface_stats

        for part, path in self.pretrained.items():
            if part not in PARTS:
                raise UsageError(f"unknown model part {part!r}; parts are {', '.join(PARTS)}")
            if not os.path.isdir(path):
                raise UsageError(f"no {part} checkpoint at {path}; write one with aurora-loop import-checkpoint")
        old, source = self._pretrained_model_config()
        added = new_variables(old, self.config)
        for name in added.get("surf_vars", ()) + added.get("static_vars", ()):
            try:
                surface_stats(name, self.config.surf_stats_dict)
            except KeyError as err:
                raise UsageError(f"new variable {name!r}: {str(err).strip(chr(34) + chr(39))}") from None
        expected = param_shapes(self.config)
        out, notes = {}, {}
        loaded = 0
        for part, path in self.pretrained.items():
            restored = restore_on_host(path)
            loaded += sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(restored))
            try:
                # LoRA adapters added to a model pretrained without them start fresh (B = 0,
                # so the model still computes what it was pretrained to), as the reference's
                # load_checkpoint(strict=False) leaves them; so do new variables' slices.
                adapted, new = adapt_pretrained({part: restored}, old, self.config, {part: expected[part]}, init="zero")
            except ExtendError as err:
                raise UsageError(f"{err} (pretrained config: {source})") from None
            except CheckpointError as err:
                raise UsageError(f"the pretrained {part} checkpoint {path} does not fit the model: {err}") from err
            out[part] = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), adapted[part])
            notes.update(new)
        notes.update({f"{part}.{k}": f"new: no pretrained {part}" for part in expected if part not in out
                      for k in _dotted_leaves(expected[part])})
        self._new_notes = notes
        if self.new_weights_init == "default":
            self._fresh_masks = {p: m for p, m in new_slice_masks(old, self.config).items() if p[0] in out}
        self._pretrained_report = _load_report(self.pretrained, expected, loaded, notes)
        extension = describe_extension(old, self.config)
        if jax.process_index() == 0 and extension:
            start = "zeros" if self.new_weights_init == "zero" else "the fresh initialisation"
            init = f"; new variables' slices start from {start} (--new_weights_init {self.new_weights_init})" if added else ""
            print(f"Extending the pretrained model ({source}): {extension}{init}; every other pretrained weight is loaded", flush=True)
        return out

    def _pretrained_model_config(self) -> tuple[AuroraConfig, str]:
        """The pretrained model's config and where it came from: ``pretrained_config``, else the
        ``config.json`` beside a part directory (the import/export layout), else ``config``."""
        if self.pretrained_config is not None:
            return self.pretrained_config, "pretrained_config"
        for path in self.pretrained.values():
            candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
            if os.path.isfile(candidate):
                try:
                    return load_config(os.path.dirname(candidate)), candidate
                except (TypeError, ValueError, KeyError) as err:
                    first = (str(err).splitlines() or [type(err).__name__])[0][:160]
                    raise UsageError(f"{candidate} is not an Aurora model configuration ({first})") from None
        return self.config, "the model's own config"

    def pretrained_report(self) -> dict[str, Any] | None:
        """What the pretrained weights supplied (``None`` without them): ``parts`` (part ->
        checkpoint path), ``parameters`` (the model's parameter count), ``loaded`` (values read
        from the checkpoints) and ``new`` (kind -> count of values that start fresh: ``LoRA
        adapters``, ``new variables and history slots``, ``parts without pretrained weights``;
        only kinds that occur). For the run's header (``aurora-train``)."""
        return None if self._pretrained_report is None else dict(self._pretrained_report)

    def new_parameters(self) -> dict[str, str]:
        """Dotted parameter path (as ``--print_param_groups`` prints it) -> a note, for every
        parameter that is new or partly new next to the pretrained weights: ``"new: tp"``
        (a new variable's slice), ``"history slot 3 new"``, ``"new: LoRA adapter"``, ``"new:
        no pretrained backbone"``. Empty without pretrained weights (everything is fresh)."""
        return dict(self._new_notes)

    def _training_sample(self, batch: Sample) -> Sample:
        """What the training loss rolls out: the cropped batch (the ensemble repeats it per member)."""
        return self._crop(batch)

    def loss(self, params: Any, batch: Sample, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch = self._training_sample(batch)
        mode = self._stateless_mode
        loss, per_step = rollout_loss(self._predict_fn(params, batch, rng), self._step_loss, batch, average=self.rollout_average,
                                      remat=self.config.remat and mode == "full" and batch.targets.num_steps > 1, mode=mode,
                                      feed_back=self._feed_back)
        return loss, {"rollout_loss_last": per_step[-1]}

    def evaluate(self, params: Any, batch: Sample) -> MeanMetrics:
        """Scores of one batch, rolled out over its target steps: ``loss``, ``mae/<field>``
        and ``rmse/<field>`` averaged over the steps, and per lead time
        ``mae/<field>/<lead>h`` / ``rmse/<field>/<lead>h``, lead = (k + 1) * the model step
        (latitude-weighted, physical units; :meth:`MeanMetrics.from_rollout`)."""
        batch = self._crop(batch)

        def per_step(prediction: Batch, target: Batch) -> dict[str, jax.Array]:
            return {"loss": self.loss_fn(prediction, target, self.config.surf_stats_dict), **weather_errors(prediction, target)}

        scores = rollout_scan(self._predict_fn(params, batch), batch, per_step, feed_back=self._feed_back)  # each (steps, b)
        return MeanMetrics.from_rollout(scores, self.config.timestep_hours)

    def predict(self, params: Any, sample: Sample) -> Batch:
        """The forecast for every target step: a Batch shaped like the (cropped) targets."""
        sample = self._crop(sample)

        def per_step(prediction: Batch, target: Batch) -> tuple[dict, dict]:
            return dict(prediction.surf_vars), dict(prediction.atmos_vars)

        surf, atmos = rollout_scan(self._predict_fn(params, sample), sample, per_step, feed_back=self._feed_back)
        return sample.targets.replace(
            surf_vars={k: jnp.moveaxis(v[:, :, 0], 0, 1) for k, v in surf.items()},
            atmos_vars={k: jnp.moveaxis(v[:, :, 0], 0, 1) for k, v in atmos.items()},
        )


# Reference keywords that have their own aurora-train flag; --model_kwargs may not set them.
_OWN_FLAGS = {"surf_vars": "--surf_vars", "static_vars": "--static_vars", "atmos_vars": "--atmos_vars",
              "autocast": "--bf16", "bf16_mode": "--bf16", "remat": "--remat", "remat_policy": "--remat_policy", "timestep": "--timestep_hours",
              "timestep_hours": "--timestep_hours"}


def checked_model_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``--model_kwargs`` as AuroraConfig keywords, or a UsageError naming the bad key.

    Every keyword of the reference's ``aurora.Aurora`` constructor that this port implements
    is accepted (``AuroraConfig`` checks names and values); those with their own flag are not.
    """
    kwargs = dict(kwargs or {})
    for key in sorted(kwargs):
        if key in _OWN_FLAGS:
            raise UsageError(f"--model_kwargs sets {key!r}, which has its own flag: use {_OWN_FLAGS[key]} instead")
    try:
        AuroraConfig.preset("tiny", **kwargs)
    except TypeError as err:
        unknown = str(err).rsplit(":", 1)[-1].strip()
        known = ", ".join(f.name for f in dataclasses.fields(AuroraConfig) if f.name not in _OWN_FLAGS)
        raise UsageError(f"--model_kwargs: unknown Aurora keyword {unknown}; known keywords: {known}") from None
    except ValueError as err:
        raise UsageError(f"--model_kwargs: {err}") from None
    return kwargs


def model_config(preset: str, config: Any) -> AuroraConfig:
    """The AuroraConfig for a TrainingConfig: a checkpoint's ``config.json`` when
    ``checkpoint_dir`` has one, else the preset on the data's variables; then
    ``model_kwargs`` (reference keywords) and the flags' bf16 / remat / time step on top.
    Normalisation statistics: built-in ones stay; ``stats`` (a file of ``aurora-loop stats``)
    fills the gaps (variables, or levels, the table lacks); a variable left without any is a
    UsageError naming it."""

    def with_stats(model: AuroraConfig) -> AuroraConfig:
        from aurora_loop.datasets.storage import parse_storage_options
        from aurora_loop.weather.stats import fill_model_stats, store_levels

        levels = getattr(config, "levels", None) or ()
        levels = tuple(v for v in (levels.split(",") if isinstance(levels, str) else levels) if str(v).strip())
        levels = tuple(float(v) for v in levels) or store_levels(getattr(config, "dataset_path", None), parse_storage_options(getattr(config, "storage_options", None)))
        return fill_model_stats(model, getattr(config, "stats", None), levels)

    overrides = checked_model_kwargs(getattr(config, "model_kwargs", None))
    compute_bf16 = bool(getattr(config, "bf16", False)) or getattr(config, "precision", "fp32") != "fp32"
    overrides.update(autocast=compute_bf16, remat=bool(getattr(config, "remat", False)),
                     remat_policy=getattr(config, "remat_policy", "inputs"))
    if getattr(config, "timestep_hours", None):  # the data's step (aurora-train fills it in)
        overrides["timestep_hours"] = float(config.timestep_hours)
    directory = getattr(config, "checkpoint_dir", None)
    if directory and os.path.isfile(os.path.join(directory, "config.json")):
        try:
            loaded = load_config(directory)
        except (TypeError, ValueError, KeyError) as err:
            first = (str(err).splitlines() or [type(err).__name__])[0][:160]
            raise UsageError(
                f"{os.path.join(directory, 'config.json')} is not an Aurora model configuration ({first}); "
                "point --checkpoint_dir at a directory written by aurora-loop import-checkpoint or export-checkpoint"
            ) from None
        overrides.update(extended_variables(loaded, config))  # flags naming variables the checkpoint lacks extend it
        return with_stats(loaded.replace(**overrides))
    for name in ("surf_vars", "static_vars", "atmos_vars"):
        value = getattr(config, name, None)
        if value is not None:
            overrides[name] = tuple(value)
    return with_stats(AuroraConfig.preset(preset, **overrides))


def loss_config(config: Any) -> WeightedMAE:
    """The training loss of a TrainingConfig-like object (the paper's when nothing is set)."""
    return WeightedMAE(
        surf_weights=dict(getattr(config, "loss_surf_weights", None) or {}),
        atmos_weights=dict(getattr(config, "loss_atmos_weights", None) or {}),
        gamma=float(getattr(config, "loss_gamma", 1.0)),
        latitude_weighted=bool(getattr(config, "latitude_weighted_loss", False)),
    )


def check_lead_and_members(preset: str, model: AuroraConfig, config: Any, ensemble: bool = False) -> None:
    """One-line UsageErrors for ``--lead_times`` / ``--ensemble_members`` that the model
    cannot take."""
    lead_times = tuple(getattr(config, "lead_times", None) or ())
    members = int(getattr(config, "ensemble_members", 1) or 1)
    if lead_times and not model.variable_lead_time:
        raise UsageError(f"--lead_times needs a model with per-sample lead times (v1p5, v1p5_tiny, v1p5_ensemble, ...); "
                         f"{preset} has a fixed step: leave --lead_times out")
    if lead_times and getattr(config, "rollout_mode", "full") == "replay":
        raise UsageError("--lead_times does not combine with --rollout_mode replay (its buffer re-rolls samples step by step); "
                         "use --rollout_mode full or pushforward")
    if members > 1 and not ensemble:
        raise UsageError(f"--ensemble_members {members} needs an ensemble model (v1p5_ensemble, v1p5_ensemble_tiny); "
                         f"{preset} is deterministic: leave the flag out")


def build_aurora_task(preset: str, config: Any, task_class: type = None, **extra: Any) -> AuroraTask:
    """The task ``preset`` for a TrainingConfig-like ``config``: its model config, the
    pretrained parts beside ``checkpoint_dir``, the loss and roll-out settings.
    ``task_class`` (default :class:`AuroraTask`) gets ``extra`` keyword arguments too."""
    task_class = task_class or AuroraTask
    try:
        model = model_config(preset, config)
    except (ValueError, KeyError) as err:
        raise UsageError(f"cannot build the {preset} Aurora model: {err}") from err
    check_lead_and_members(preset, model, config, ensemble=task_class is not AuroraTask)
    paths = getattr(config, "pretrained_paths", None)
    if paths is None:
        directory = getattr(config, "checkpoint_dir", None)
        paths = {p: os.path.join(directory, p) for p in ("encoder", "backbone", "decoder")} if directory else {}
    return task_class(model, name=preset, rollout_average=getattr(config, "average_rollout_loss", True), pretrained=paths,
                      rollout_mode=getattr(config, "rollout_mode", "full"), replay=replay_config(config),
                      loss=loss_config(config), new_weights_init=getattr(config, "new_weights_init", "zero"), **extra)


def _factory(preset: str):
    def make(config: Any) -> AuroraTask:
        return build_aurora_task(preset, config)

    return make


for _preset in ("tiny", "small", "aurora", "v1p5", "v1p5_tiny"):
    register_task(_preset)(_factory(_preset))
