"""Roll a trained model out from chosen initial times and write a WeatherBench2 forecast store.

:func:`forecast_from_checkpoint` is ``aurora-loop forecast``: find the checkpoint and its
run's config (:mod:`.runs`), the initial times and model step (:mod:`.times`), build the
task and load its parameters (:func:`load_model`), then :func:`run_forecast`: read the
inputs (:mod:`.inputs`), roll out, and write the store (:mod:`.writer`, which describes its
layout).

The inputs of initial time t0 are the store's times t0 - (history - 1) T, .., t0: ``T`` apart,
so a model with a 6 h step forecasts from an hourly store (T must be a whole multiple of the
store's step). The store need not hold the valid times.

An Aurora model runs through the model's roll-out (:func:`aurora_loop.model.aurora.rollout`:
sub-steps, a stochastic model's noise, :mod:`.noise`), any other task through its
``predict(params, sample) -> Batch`` (the optional Task method), jitted once with the
parameters replicated; the initial times are split over every visible device. A stochastic
model's noise comes from ``jax.random.key(seed)`` folded with the member and the initial
time, so a forecast does not depend on the batching, and member 0 is what the same seed
gives without an ensemble.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from aurora_loop.datasets.storage import is_remote
from aurora_loop.errors import UsageError
from aurora_loop.inference.inputs import read_inputs
from aurora_loop.inference.noise import RowNoise, member_keys
from aurora_loop.inference.runs import read_weights, resolve_checkpoint
from aurora_loop.inference.times import (
    forecast_leads,
    model_step_hours,
    parse_fine_lead_times,
    parse_init_times,
    store_stride,
    timedelta_hours,
)
from aurora_loop.inference.writer import ForecastWriter
from aurora_loop.progress import Progress

# --- the model -------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A task and its trained parameters.

    Attributes:
      task: the Task (must have ``predict``).
      params: the parameter pytree (numpy or jax arrays).
      config: the run's TrainingConfig (variables, levels, history, data store).
      source: the checkpoint directory the parameters came from.
      step: the training step of the checkpoint (None when unknown, e.g. an export).
    """

    task: Any
    params: Any
    config: Any
    source: str
    step: int | None


def _fit_params(loaded: Any, expected: Any, where: str) -> Any:
    """Check ``loaded`` against the task's abstract params (same tree, same shapes)."""
    import jax

    if (
        isinstance(expected, dict)
        and set(expected) == {"params"}
        and not (isinstance(loaded, dict) and set(loaded) == {"params"})
    ):
        loaded = {"params": loaded}  # exports unwrap Flax's collection
    got, want = jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    got_map = {jax.tree_util.keystr(k): v for k, v in got}
    for key, leaf in want:
        name = jax.tree_util.keystr(key)
        if name not in got_map:
            raise UsageError(
                f"the checkpoint in {where} has no parameter {name}: it was trained for other variables, levels or model settings than --dataset_path gives; forecast with the run's variables"
            )
        if tuple(np.shape(got_map[name])) != tuple(leaf.shape):
            raise UsageError(
                f"parameter {name} in {where} has shape {tuple(np.shape(got_map[name]))}, the model for this data needs {tuple(leaf.shape)}; forecast with the run's variables and levels"
            )
    if len(got) != len(want):
        raise UsageError(
            f"the checkpoint in {where} has {len(got)} parameter arrays, the model for this data {len(want)}; forecast with the run's variables and model settings"
        )
    return jax.tree.unflatten(
        jax.tree.structure(expected), [np.asarray(got_map[jax.tree_util.keystr(k)], np.float32) for k, _ in want]
    )


def build_task(config: Any) -> Any:
    """The task of a TrainingConfig, checked to forecast: an Aurora task (its model's roll-out
    runs) or one with ``predict(params, sample)``."""
    from aurora_loop.task import available_tasks, make_task

    if config.model not in available_tasks():
        raise UsageError(
            f"model {config.model!r} of the checkpoint is not a known model; choose one of: {', '.join(available_tasks())}"
        )
    task = make_task(config.model, config)
    if aurora_config(task) is None and not callable(getattr(task, "predict", None)):
        raise UsageError(
            f"the {config.model!r} task has no predict(params, sample) method, so it cannot forecast; add one (see aurora_loop/task.py)"
        )
    return task


def aurora_config(task: Any) -> Any:
    """The AuroraConfig of an Aurora task (its ``model_config``), else None."""
    from aurora_loop.model.config import AuroraConfig

    cfg = getattr(task, "model_config", None)
    return cfg if isinstance(cfg, AuroraConfig) else None


def load_model(resolved: tuple[Any, str, str, int | None], example: Any, weights: str = "auto", task: Any = None) -> LoadedModel:
    """Build the task of a resolved checkpoint (:func:`aurora_loop.inference.runs.resolve_checkpoint`)
    and load its parameters (:func:`aurora_loop.inference.runs.read_weights`: of a training
    checkpoint the weights alone, not the optimizer state).

    ``example``: a Sample of the data to forecast (b >= 1), used to build the task's abstract
    parameters (``jax.eval_shape`` of ``task.init``), which the checkpoint must match.
    ``weights``: of a training checkpoint, the moving average or the trained weights
    (:mod:`aurora_loop.inference.runs`; an export holds the ones it was made with).
    ``task``: the task, when already built (:func:`build_task`); default: built from the
    resolved config.
    """
    import jax

    config, layout, where, step = resolved
    task = build_task(config) if task is None else task
    params = read_weights(where, layout, weights)[0]
    if getattr(task, "pretrained", None):
        task.pretrained = {}  # the weights are loaded here; init need not read them as well
    expected = jax.eval_shape(task.init, jax.random.PRNGKey(0), example)
    return LoadedModel(task=task, params=_fit_params(params, expected, where), config=config, source=where, step=step)


# --- the roll-out ----------------------------------------------------------------------------


def batches(indices: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """``indices`` in consecutive chunks of ``size``."""
    for i in range(0, len(indices), size):
        yield indices[i : i + size]


def check_forecast_options(
    task: Any, name: str, step_hours: float, fine_lead_times: Sequence[float] | None, members: int | None
) -> None:
    """One-line UsageErrors for sub-steps or an ensemble that the model cannot forecast."""
    cfg = aurora_config(task)
    if fine_lead_times is not None:
        if cfg is None or not cfg.variable_lead_time:
            raise UsageError(
                f"--fine_lead_times needs a model with variable lead times (v1p5, v1p5_tiny, v1p5_ensemble, ...); "
                f"{name} has a fixed step: leave the flag out"
            )
        if not np.isclose(float(fine_lead_times[-1]), float(step_hours)):
            listed = ",".join(f"{v:g}" for v in fine_lead_times)
            raise UsageError(
                f"--fine_lead_times {listed} must end at the model step, {step_hours:g} h: the last sub-step advances the roll-out; "
                f"e.g. --fine_lead_times {','.join(f'{v:g}' for v in np.arange(1, step_hours + 0.5))}"
            )
    if members is not None:
        if members < 1:
            raise UsageError(f"--ensemble_members must be at least 1, got {members}")
        if cfg is None or not cfg.stochastic:
            raise UsageError(
                f"--ensemble_members {members} needs a stochastic model (v1p5_ensemble, v1p5_ensemble_tiny); "
                f"{name} is deterministic: leave the flag out"
            )


def aurora_rollout(
    cfg: Any,
    params: Any,
    inputs: Any,
    steps: int,
    fine_lead_times: Sequence[float] | None = None,
    noise: Any = None,
    known_grid: Any = None,
    space: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every prediction of an Aurora roll-out (:func:`aurora_loop.model.aurora.rollout`) as
    numpy: surf (b, N, h, w), atmos (b, N, c, h, w), N = steps (x the sub-steps)."""
    import jax

    from aurora_loop.model.aurora import rollout

    surf: dict[str, list[np.ndarray]] = {}
    atmos: dict[str, list[np.ndarray]] = {}
    for pred in rollout(cfg, params, inputs, steps, fine_lead_times=fine_lead_times, noise=noise, known_grid=known_grid,
                        space=space):
        got_surf, got_atmos = jax.device_get((pred.surf_vars, pred.atmos_vars))
        for out, got in ((surf, got_surf), (atmos, got_atmos)):
            for k, v in got.items():
                out.setdefault(k, []).append(np.asarray(v, np.float32))
    return ({k: np.concatenate(v, axis=1) for k, v in surf.items()}, {k: np.concatenate(v, axis=1) for k, v in atmos.items()})


def run_forecast(
    loaded: LoadedModel,
    store: Any,
    init_indices: np.ndarray,
    steps: int,
    out: str,
    batch_size: int | None = None,
    num_devices: int | None = None,
    space: int = 1,
    member: int = 0,
    zarr_format: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    fine_lead_times: Sequence[float] | None = None,
    members: int | None = None,
    seed: int = 0,
) -> str:
    """Forecast ``steps`` model steps from every initial time ``store.times[init_indices]`` and
    write the WB2 forecast store ``out`` (see the module docstring). Returns its path.

    The initial times are processed ``batch_size`` at a time (default: one per device),
    split over a ``("data",)`` mesh of ``num_devices`` devices (default: all visible); the last
    batch is padded by repeating its final initial time, and the padding is dropped.
    ``fine_lead_times``: every sub-step's prediction (hours, the last the model step; models
    with variable lead times). ``members``: a stochastic model's ensemble of that many
    forecasts along ``number`` (None: one forecast, no member dim); ``seed``: their noise.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from aurora_loop.model.aurora import noise_shape
    from aurora_loop.model.batch import Batch, Metadata
    from aurora_loop.model.posenc import KnownGrid
    from aurora_loop.parallel import DATA_AXIS, batch_shardings, data_size, make_mesh, place_batch, replicated

    mesh = make_mesh(num_devices, space)
    groups = data_size(mesh)  # examples at a time: the devices, or their groups of --space_parallel
    batch_size = batch_size or groups
    if batch_size % groups:
        where = f"{groups} devices" if space == 1 else f"{groups} groups of --space_parallel {space}"
        raise UsageError(f"--batch_size {batch_size} is not divisible by the {where}; use a multiple of {groups}")
    cfg = aurora_config(loaded.task)
    plan = None
    if space > 1:
        from aurora_loop.model.bands import SpacePlan, space_problem

        if cfg is None:
            raise UsageError(f"--space_parallel splits an Aurora model's grid over devices; model {loaded.config.model} cannot be split: drop it")
        h, w = store.shape
        problem = space_problem(cfg, (h - h % cfg.patch_size, w), space)
        if problem:
            raise UsageError(problem)
        plan = SpacePlan(mesh)
    step_hours = float(cfg.timestep_hours) if cfg is not None else model_step_hours(loaded.config, store)
    fine_lead_times = None if fine_lead_times is None else tuple(float(v) for v in fine_lead_times)
    check_forecast_options(loaded.task, loaded.config.model, step_hours, fine_lead_times, members)
    stride = store_stride(step_hours, store)
    history = int(loaded.config.history)
    stochastic = bool(cfg is not None and cfg.stochastic)
    skip = tuple(cfg.output_only_surf_vars) + tuple(cfg.output_only_atmos_vars) if cfg is not None else ()
    leads = forecast_leads(steps, step_hours, fine_lead_times)
    attrs = {
        "title": f"aurora_loop forecast ({loaded.config.model})",
        "model": loaded.config.model,
        "checkpoint": loaded.source,
        "checkpoint_step": -1 if loaded.step is None else int(loaded.step),
        "dataset_path": store.path if is_remote(store.path) else os.path.abspath(store.path),
        "member": int(member),
        "input_steps": history,
        "time_step_hours": step_hours,
        "store_time_step_hours": timedelta_hours(store.time_step),
        "comment": "time = initialization time (the newest input); valid time = time + prediction_timedelta",
    }
    if fine_lead_times is not None:
        attrs["fine_lead_times_hours"] = list(fine_lead_times)
    if stochastic:
        attrs["stochastic"] = 1
        attrs["noise_seed"] = int(seed)
        attrs["ensemble_members"] = int(members or 1)
    writer = ForecastWriter(out, store, leads, attrs, zarr_format=zarr_format, overwrite=overwrite, members=members)
    params = jax.device_put(loaded.params, replicated(mesh))
    rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    predict = None
    known_grid = None
    bar = Progress(len(init_indices), "forecast", unit="init times") if progress else None
    done = 0
    try:
        for chunk in batches(np.asarray(init_indices), batch_size):
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk))])
            n = len(chunk)
            if cfg is None:  # the task's own roll-out
                sample = read_inputs(store, padded, steps, history, member, stride)
                shardings = batch_shardings(sample, mesh)
                if predict is None:
                    predict = jax.jit(loaded.task.predict, in_shardings=(replicated(mesh), shardings))
                prediction = jax.device_get(predict(params, place_batch(sample, shardings)))
                prediction = prediction.replace(
                    surf_vars={k: np.asarray(v)[:n] for k, v in prediction.surf_vars.items()},
                    atmos_vars={k: np.asarray(v)[:n] for k, v in prediction.atmos_vars.items()},
                )
            else:
                inputs = read_inputs(store, padded, 1, history, member, stride, skip).inputs
                try:
                    grid = inputs.crop(cfg.patch_size).metadata
                except ValueError as err:
                    raise UsageError(
                        f"the store's {store.shape[0]} x {store.shape[1]} grid does not fit the model: {err}; regrid the store"
                    ) from None
                if known_grid is None:  # the patch areas become constants of the compiled step
                    known_grid = KnownGrid(np.asarray(grid.lat), np.asarray(grid.lon))
                placed = place_batch(inputs, batch_shardings(inputs, mesh))
                runs = []
                for m in range(members or 1):
                    noise = None
                    if stochastic:
                        noise = RowNoise(
                            member_keys(seed, m, store.hours[padded]),
                            noise_shape(cfg, inputs)[1:],
                            accumulate=len(fine_lead_times) if fine_lead_times else 0,
                            sharding=rows,
                        )
                    runs.append(aurora_rollout(cfg, params, placed, steps, fine_lead_times, noise, known_grid, plan))
                stack = (lambda vs: np.stack(vs, axis=1)) if members is not None else (lambda vs: vs[0])  # noqa: E731
                prediction = Batch(
                    surf_vars={k: stack([r[0][k] for r in runs])[:n] for k in runs[0][0]},
                    static_vars={},
                    atmos_vars={k: stack([r[1][k] for r in runs])[:n] for k in runs[0][1]},
                    metadata=Metadata(
                        lat=np.asarray(grid.lat), lon=np.asarray(grid.lon), time=store.hours[chunk], atmos_levels=store.levels
                    ),
                )
            writer.write(store.times[chunk], prediction)
            done += len(chunk)
            if bar:
                bar.update(done)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


@dataclasses.dataclass
class ForecastResult:
    """What :func:`forecast_from_checkpoint` wrote (unpacks as ``path, count``).

    Attributes:
      path: the forecast store.
      count: initial times forecast.
      step_hours: the model step T.
      leads: (N,) timedelta64 lead times written.
      members: the ensemble size along ``number`` (None: no member dim).
      stochastic: whether the model draws noise (then ``seed`` seeded it).
      seed: the noise seed.
    """

    path: str
    count: int
    step_hours: float
    leads: np.ndarray
    members: int | None
    stochastic: bool
    seed: int

    def __iter__(self) -> Iterable[Any]:
        return iter((self.path, self.count))


def _stochastic_preset(name: str) -> bool:
    """Whether task ``name`` is an Aurora preset of a stochastic model (the ensemble tasks)."""
    from aurora_loop.model.config import PRESETS

    return bool(PRESETS.get(name, {}).get("stochastic"))


def forecast_from_checkpoint(
    checkpoint: str,
    init: str,
    steps: int,
    out: str,
    dataset_path: str | None = None,
    static_path: str | None = None,
    model: str | None = None,
    member: int = 0,
    batch_size: int | None = None,
    num_devices: int | None = None,
    space: int = 1,
    zarr_format: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    overrides: dict[str, str] | None = None,
    weights: str = "auto",
    fine_lead_times: str | Sequence[float] | None = None,
    ensemble_members: int | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> ForecastResult:
    """``aurora-loop forecast`` as a function: load, check, roll out, write.

    ``init`` as in :func:`parse_init_times`. The variables, levels, history and model step are
    the run's (``overrides``: TrainingConfig fields as flag strings, e.g. ``{"levels":
    "500,850"}`` or ``{"timestep_hours": "6"}``; the step: :func:`model_step_hours`);
    ``dataset_path`` / ``static_path`` default to the run's stores. ``fine_lead_times``,
    ``ensemble_members``, ``seed``: as :func:`run_forecast`'s ``fine_lead_times``,
    ``members``, ``seed``. ``storage_options`` (None: the run's) and ``cache_dir``: for a
    store in object storage. Every input is checked before anything is written.
    """
    from aurora_loop.config import config_from_mapping
    from aurora_loop.datasets import WeatherStore, selection_from_config
    from aurora_loop.datasets.build import storage_kwargs

    fine = parse_fine_lead_times(fine_lead_times)
    if ensemble_members is not None and ensemble_members < 1:
        raise UsageError(f"--ensemble_members must be at least 1, got {ensemble_members}")
    if seed < 0:
        raise UsageError(f"--seed must be at least 0, got {seed}")
    config, layout, where, step = resolve_checkpoint(checkpoint, model)
    if overrides:
        config = config_from_mapping(overrides, source="flag", base=config)
    if dataset_path:
        config = config.replace(dataset_path=dataset_path)
    if static_path:
        config = config.replace(static_path=static_path)
    if not config.dataset_path:
        raise UsageError("the checkpoint's run names no dataset_path; pass --dataset_path STORE")
    if storage_options is not None:
        config = config.replace(storage_options=storage_options)
    if cache_dir:
        config = config.replace(cache_dir=cache_dir)
    # Output-only variables (Aurora 1.5's) are predicted, never read: a store may lack them.
    from aurora_loop.model.config import PRESETS

    preset = PRESETS.get(config.model, {})
    optional = (*preset.get("output_only_surf_vars", ()), *preset.get("output_only_atmos_vars", ()))
    store = WeatherStore(config.dataset_path, selection_from_config(config), static_path=config.static_path, optional=optional,
                         **storage_kwargs(config))
    if not 0 <= member < store.members:
        raise UsageError(f"--member {member} is out of range: {config.dataset_path} holds {store.members} member(s)")
    step_hours = model_step_hours(config, store)
    stride = store_stride(step_hours, store)
    config = config.replace(timestep_hours=step_hours)  # the model steps as it trained (aurora-train fills it in the same way)
    if int(config.ensemble_members or 1) < 2 and _stochastic_preset(config.model):
        config = config.replace(ensemble_members=2)  # the ensemble task's training size; the forecast draws its own members
    task = build_task(config)
    check_forecast_options(task, config.model, step_hours, fine, ensemble_members)
    cfg = aurora_config(task)
    skip = tuple(cfg.output_only_surf_vars) + tuple(cfg.output_only_atmos_vars) if cfg is not None else ()
    history = int(config.history)
    indices = parse_init_times(init, store.times, history, stride)
    example = read_inputs(store, indices[:1], 1, history, member, stride, skip)
    loaded = load_model((config, layout, where, step), example, weights=weights, task=task)
    path = run_forecast(
        loaded,
        store,
        indices,
        steps,
        out,
        batch_size=batch_size,
        num_devices=num_devices,
        space=space,
        member=member,
        zarr_format=zarr_format,
        overwrite=overwrite,
        progress=progress,
        fine_lead_times=fine,
        members=ensemble_members,
        seed=seed,
    )
    return ForecastResult(
        path=path,
        count=len(indices),
        step_hours=step_hours,
        leads=forecast_leads(steps, step_hours, fine),
        members=ensemble_members,
        stochastic=bool(cfg is not None and cfg.stochastic),
        seed=seed,
    )
