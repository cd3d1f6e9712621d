"""Roll a trained model out from chosen initial times and write a WeatherBench2 forecast store.

The store follows WeatherBench2's forecast layout, so WB2 tools and ``xarray.open_zarr``
read it:

- dims ``time`` (the initialisation time: the newest input the model saw),
  ``prediction_timedelta`` (lead time, timedelta64; ``k * T`` for roll-out step k = 1..N,
  ``T`` the model step, :func:`model_step_hours`; with ``fine_lead_times`` ``(l1, .., ln = T)``
  every step adds one entry per sub-step: ``(k - 1) * T + l_j``), ``level`` (hPa, atmospheric
  variables only), ``latitude`` (degrees north, ascending -90 -> 90 as WB2 writes it),
  ``longitude`` (degrees east in [0, 360)); an ensemble (``members``) adds ``number`` (the
  member, 0..M-1, as WB2's and ERA5's ensembles name it) after ``time``;
- variables under their WB2 names (``2m_temperature``, ``geopotential``, ...), float32,
  surface ones (time, [number,] prediction_timedelta, latitude, longitude), atmospheric ones
  (time, [number,] prediction_timedelta, level, latitude, longitude); every variable the model
  predicts, Aurora 1.5's output-only ones included;
- CF attributes: ``units``, ``long_name``, ``standard_name`` on variables and coordinates
  (:data:`aurora_loop.datasets.variables.CF_METADATA`; the store's own units win),
  ``Conventions = "CF-1.8"`` and where the forecast came from on the dataset.

The inputs of initial time t0 are the store's times t0 - (history - 1) T, .., t0: ``T`` apart,
so a model with a 6 h step forecasts from an hourly store (T must be a whole multiple of the
store's step). The store need not hold the valid times.

The model comes from a checkpoint (see :func:`load_model`). An Aurora model runs through the
model's roll-out (:func:`aurora_loop.model.aurora.rollout`: sub-steps, a stochastic model's
noise), any other task through its ``predict(params, sample) -> Batch`` (the optional Task
method), jitted once with the parameters replicated; the initial times are split over every
visible device. A stochastic model's noise comes from ``jax.random.key(seed)`` folded with the
member and the initial time, so a forecast does not depend on the batching, and member 0 is
what the same seed gives without an ensemble.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from aurora_loop.datasets.variables import ATMOS, CF_METADATA, DEFAULT_MAP, SURF
from aurora_loop.errors import UsageError
from aurora_loop.model.aurora import AccumulatedNoise
from aurora_loop.progress import Progress

#: CF metadata of the WB2 variables: name -> (units, standard_name or "", long_name).
CF_VARIABLES: dict[str, tuple[str, str, str]] = CF_METADATA

#: The forecast store's ensemble dim (WB2's and ERA5's name; the store reader and
#: ``aurora-loop evaluate`` know it, :data:`aurora_loop.datasets.layout.MEMBER_DIMS`).
MEMBER_DIM = "number"

_WB2_NAME = {kind: {aurora: wb2 for wb2, aurora in DEFAULT_MAP[kind].items()} for kind in (SURF, ATMOS)}


def wb2_name(kind: str, aurora_name: str, store_name: str) -> str:
    """The WeatherBench2 name of Aurora variable ``aurora_name`` of ``kind`` ("surf"/"atmos");
    the store's own name when it has no standard WB2 name."""
    return _WB2_NAME.get(kind, {}).get(aurora_name, store_name)


# --- checkpoints -----------------------------------------------------------------------------

PARTS = ("encoder", "backbone", "decoder")


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


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} cannot be read as JSON ({err}); restore or remove it") from None
    return data if isinstance(data, dict) else None


def _training_config(values: dict[str, Any] | None, model: str | None, where: str) -> Any:
    from aurora_loop.config import TrainingConfig, config_from_mapping

    if values is None or "model" not in values:
        if model is None:
            raise UsageError(f"{where} holds no training config (config.json of an aurora-train run); pass --model NAME and the variables with --surf_vars/--static_vars/--atmos_vars/--levels")
        # e.g. weights from `aurora-loop import-checkpoint`: the task reads its model config there
        return TrainingConfig(model=model, checkpoint_dir=where)
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    config = config_from_mapping({k: v for k, v in values.items() if k in known}, source=f"{where}")
    return config.replace(model=model) if model else config


def _run_config(run_dir: str, model: str | None) -> Any:
    """A run's config; a run trained on the built-in sample (no dataset_path) points at it."""
    config = _training_config(_read_json(os.path.join(run_dir, "config.json")), model, run_dir)
    sample = os.path.join(run_dir, "sample_data.zarr")
    if not config.dataset_path and os.path.isdir(sample):
        config = config.replace(dataset_path=sample)
    return config


def _restore_tree(path: str) -> Any:
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def _newest_step_dir(run_dir: str) -> str:
    checkpoints = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit() and _is_step_dir(os.path.join(checkpoints, n)))
    if not steps:
        raise UsageError(f"{checkpoints} holds no complete checkpoint; train longer or pass a run that saved one")
    return os.path.join(checkpoints, str(steps[-1]))


def resolve_checkpoint(path: str, model: str | None = None) -> tuple[Any, str, str, int | None]:
    """Find the parameters and the training config behind ``path``.

    ``path`` is a run dir (``--output_dir`` of aurora-train: its newest step is used), a step
    dir (``run/checkpoints/<step>``), or an exported / imported checkpoint dir
    (``encoder/ backbone/ decoder/`` or ``model/``, with ``training_config.json`` or
    ``config.json``; see ``aurora-loop export-checkpoint``).
    Returns ``(config, layout, params_dir, step)``; ``layout`` is "state" (a TrainState
    checkpoint), "model" (one params tree) or "parts" (encoder/backbone/decoder trees).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"--checkpoint {path} does not exist; pass a run dir, run/checkpoints/<step> or an exported checkpoint dir")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        step_dir = _newest_step_dir(path)
        return _run_config(path, model), "state", step_dir, int(os.path.basename(step_dir))
    if _is_step_dir(path):
        step = int(os.path.basename(path)) if os.path.basename(path).isdigit() else None
        return _run_config(os.path.dirname(os.path.dirname(path)), model), "state", path, step
    values = _read_json(os.path.join(path, "training_config.json")) or _read_json(os.path.join(path, "config.json"))
    record = _read_json(os.path.join(path, "export.json")) or {}
    if os.path.isdir(os.path.join(path, "model")):
        return _training_config(values, model, path), "model", path, record.get("step")
    if all(os.path.isdir(os.path.join(path, p)) for p in PARTS):
        return _training_config(values, model, path), "parts", path, record.get("step")
    raise UsageError(f"--checkpoint {path} is neither a run dir (with checkpoints/), a step dir (with state/ and meta/) nor an exported checkpoint (with model/ or encoder/ backbone/ decoder/)")


def _fit_params(loaded: Any, expected: Any, where: str) -> Any:
    """Check ``loaded`` against the task's abstract params (same tree, same shapes)."""
    import jax

    if isinstance(expected, dict) and set(expected) == {"params"} and not (isinstance(loaded, dict) and set(loaded) == {"params"}):
        loaded = {"params": loaded}  # exports unwrap Flax's collection
    got, want = jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    got_map = {jax.tree_util.keystr(k): v for k, v in got}
    for key, leaf in want:
        name = jax.tree_util.keystr(key)
        if name not in got_map:
            raise UsageError(f"the checkpoint in {where} has no parameter {name}: it was trained for other variables, levels or model settings than --dataset_path gives; forecast with the run's variables")
        if tuple(np.shape(got_map[name])) != tuple(leaf.shape):
            raise UsageError(f"parameter {name} in {where} has shape {tuple(np.shape(got_map[name]))}, the model for this data needs {tuple(leaf.shape)}; forecast with the run's variables and levels")
    if len(got) != len(want):
        raise UsageError(f"the checkpoint in {where} has {len(got)} parameter arrays, the model for this data {len(want)}; forecast with the run's variables and model settings")
    return jax.tree.unflatten(jax.tree.structure(expected), [np.asarray(got_map[jax.tree_util.keystr(k)], np.float32) for k, _ in want])


def build_task(config: Any) -> Any:
    """The task of a TrainingConfig, checked to forecast: an Aurora task (its model's roll-out
    runs) or one with ``predict(params, sample)``."""
    from aurora_loop.task import available_tasks, make_task

    if config.model not in available_tasks():
        raise UsageError(f"model {config.model!r} of the checkpoint is not a known model; choose one of: {', '.join(available_tasks())}")
    task = make_task(config.model, config)
    if aurora_config(task) is None and not callable(getattr(task, "predict", None)):
        raise UsageError(f"the {config.model!r} task has no predict(params, sample) method, so it cannot forecast; add one (see aurora_loop/task.py)")
    return task


def aurora_config(task: Any) -> Any:
    """The AuroraConfig of an Aurora task (its ``model_config``), else None."""
    from aurora_loop.model.config import AuroraConfig

    cfg = getattr(task, "model_config", None)
    return cfg if isinstance(cfg, AuroraConfig) else None


def load_model(resolved: tuple[Any, str, str, int | None], example: Any, weights: str = "auto", task: Any = None) -> LoadedModel:
    """Build the task of a resolved checkpoint (:func:`resolve_checkpoint`) and load its parameters.

    ``example``: a Sample of the data to forecast (b >= 1), used to build the task's abstract
    parameters (``jax.eval_shape`` of ``task.init``), which the checkpoint must match.
    ``weights``: of a training checkpoint, the moving average or the trained weights
    (:mod:`aurora_loop.inference.runs`; an export holds the ones it was made with).
    ``task``: the task, when already built (:func:`build_task`); default: built from the
    resolved config.
    """
    import jax

    from aurora_loop.inference.runs import restore_state_weights

    config, layout, where, step = resolved
    task = build_task(config) if task is None else task
    if layout == "state":
        params = restore_state_weights(os.path.join(where, "state"), weights)[0]
    elif layout == "model":
        params = _restore_tree(os.path.join(where, "model"))
    else:
        params = {p: _restore_tree(os.path.join(where, p)) for p in PARTS}
        extra = [n for n in os.listdir(where) if os.path.isdir(os.path.join(where, n)) and n not in PARTS and not n.startswith(".")]
        for name in extra:  # e.g. LoRA adapters written next to the parts
            params[name] = _restore_tree(os.path.join(where, name))
    if getattr(task, "pretrained", None):
        task.pretrained = {}  # the weights are loaded here; init need not read them as well
    expected = jax.eval_shape(task.init, jax.random.PRNGKey(0), example)
    return LoadedModel(task=task, params=_fit_params(params, expected, where), config=config, source=where, step=step)


# --- initial times ---------------------------------------------------------------------------

def parse_init_times(text: str, times: np.ndarray, history: int, stride: int = 1) -> np.ndarray:
    """Store time indices of the initial times named by ``text``.

    ``text``: a comma list of ISO times (``2020-01-20T00,2020-01-21T00``); ``all`` (every
    time with ``history - 1`` earlier steps); or ``START/END[/EVERY]`` (every store time in
    [START, END], every EVERY, e.g. ``2020-01-20/2020-01-25/12h``). ``times``: (n,)
    datetime64 of the store. ``stride``: store steps between inputs (the model step over the
    store's step). Returns (m,) int64 indices into ``times``, ascending, no repeats.
    """
    text = text.strip()
    first_ok = (history - 1) * int(stride)
    if text == "all":
        if times.size <= first_ok:
            raise UsageError(f"the store holds {times.size} times; a forecast needs {history} input steps{_apart(stride)}")
        return np.arange(first_ok, times.size, dtype=np.int64)
    if "/" in text:
        parts = text.split("/")
        if len(parts) not in (2, 3):
            raise UsageError(f"--init {text!r}: write a range as START/END or START/END/EVERY, e.g. 2020-01-20/2020-01-25/12h")
        lo, hi = _datetime(parts[0]), _datetime(parts[1])
        every = _timedelta(parts[2]) if len(parts) == 3 else None
        pick = np.nonzero((times >= lo) & (times <= hi))[0]
        if every is not None:
            pick = pick[((times[pick] - times[pick[0]]) % every) == np.timedelta64(0, "ns")] if pick.size else pick
        pick = pick[pick >= first_ok]
        if pick.size == 0:
            raise UsageError(f"--init {text!r} selects no store time with {history - 1} earlier step(s){_apart(stride)}; the store runs {times[0]} to {times[-1]}")
        return pick.astype(np.int64)
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        t = _datetime(part)
        hit = np.nonzero(times == t)[0]
        if hit.size == 0:
            raise UsageError(f"--init {part} is not a time of the store (it runs {times[0]} to {times[-1]} every {_hours(times[1] - times[0]):g} h); pick one of its times")
        if hit[0] < first_ok:
            raise UsageError(f"--init {part} needs {history - 1} earlier step(s) of history in the store{_apart(stride)}; the earliest possible init is "
                             f"{times[first_ok] if first_ok < times.size else 'past its end'}")
        out.append(int(hit[0]))
    if not out:
        raise UsageError("--init is empty; pass ISO times like 2020-01-20T00, a range START/END, or all")
    return np.unique(np.asarray(out, dtype=np.int64))  # time order, each once (as WB2 stores them)


def _apart(stride: int) -> str:
    return f" ({int(stride)} store steps apart)" if int(stride) > 1 else ""


def _datetime(text: str) -> np.datetime64:
    try:
        return np.datetime64(text.strip(), "ns")
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO date/time; write it like 2020-01-31 or 2020-01-31T18:00") from None


def _timedelta(text: str) -> np.timedelta64:
    text = text.strip().lower()
    units = {"h": "h", "d": "D", "m": "m"}
    if not text or text[-1] not in units or not text[:-1].isdigit():
        raise UsageError(f"{text!r} is not a time step; write it like 6h, 12h or 1d")
    return np.timedelta64(int(text[:-1]), units[text[-1]]).astype("timedelta64[ns]")


def _hours(delta: np.timedelta64) -> float:
    return float(delta / np.timedelta64(1, "s")) / 3600.0


# --- the model step --------------------------------------------------------------------------

def model_step_hours(config: Any, store: Any) -> float:
    """The model step T in hours, as aurora-train chose it: ``config.timestep_hours`` (the
    run's, or ``--timestep_hours``), else the largest of the run's ``lead_times``, else the
    store's time step."""
    if getattr(config, "timestep_hours", None):
        return float(config.timestep_hours)
    if getattr(config, "lead_times", None):
        return float(max(config.lead_times))
    return _hours(store.time_step)


def store_stride(step_hours: float, store: Any) -> int:
    """Store time steps per model step ``step_hours``; a UsageError unless a whole number >= 1."""
    dt = _hours(store.time_step)
    ratio = float(step_hours) / dt
    whole = int(round(ratio))
    if whole < 1 or abs(ratio - whole) > 1e-6 * max(1.0, ratio):
        raise UsageError(f"the model step {step_hours:g} h is not a whole multiple of the store's {dt:g} h time step; "
                         f"forecast from a store whose step divides {step_hours:g} h, or pass --timestep_hours")
    return whole


def parse_fine_lead_times(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``"1,2,3,4,5,6"`` -> (1.0, .., 6.0): positive hours, strictly increasing (the last must
    be the model step, checked against the model). None / "" -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip())
    except ValueError:
        raise UsageError(f"--fine_lead_times must be a comma list of hours, e.g. 1,2,3,4,5,6; got {text!r}") from None
    if not values or not all(np.isfinite(values)) or min(values) <= 0 or any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--fine_lead_times must be positive hours in increasing order ending at the model step, e.g. 1,2,3,4,5,6; got {text!r}")
    return values


def forecast_leads(steps: int, step_hours: float, fine_lead_times: Sequence[float] | None = None) -> np.ndarray:
    """(N,) timedelta64[ns] lead times of a roll-out of ``steps`` model steps of ``step_hours``:
    ``k * T`` (k = 1..steps), or with ``fine_lead_times`` ``(k - 1) * T + l`` for every l."""
    subs = [float(step_hours)] if not fine_lead_times else [float(v) for v in fine_lead_times]
    hours = np.asarray([k * float(step_hours) + lead for k in range(int(steps)) for lead in subs], np.float64)
    return np.round(hours * 3600e9).astype("int64").astype("timedelta64[ns]")


# --- reading inputs --------------------------------------------------------------------------

def read_inputs(store: Any, indices: Sequence[int], steps: int, history: int, member: int = 0, stride: int = 1,
                skip: Sequence[str] = ()) -> Any:
    """The model inputs for initial times ``store.times[indices]`` as a Sample.

    ``inputs``: surf (b, history, h, w), atmos (b, history, c, h, w) float32 read from the
    store at times ``index - (history - 1) * stride, .., index`` (``stride`` store steps apart:
    the model step), without the variables in ``skip`` (output-only ones: never inputs);
    ``metadata.time`` = the initial times (hours since 1970). ``targets``: zeros of
    t = ``steps`` (the forecast does not need the truth, so it may run past the store's end)
    with ``metadata.time`` = the first lead's valid time; only their shapes and times are read.
    """
    from aurora_loop.model.batch import Batch, Metadata, Sample

    b = len(indices)
    h, w = store.shape
    c = len(store.levels)
    stride = int(stride)
    surf = {k: np.empty((b, history, h, w), np.float32) for k in store.fields[SURF] if k not in skip}
    atmos = {k: np.empty((b, history, c, h, w), np.float32) for k in store.fields[ATMOS] if k not in skip}
    for slot, index in enumerate(indices):
        first = int(index) - (history - 1) * stride
        views = ({k: v[slot] for k, v in surf.items()}, {k: v[slot] for k, v in atmos.items()})
        if stride == 1:
            store.read_into(*views, first, member)
        else:
            store.read_into(*views, first, member, step=stride)
    for name, value in (*surf.items(), *atmos.items()):
        if np.isnan(value.min()):
            raise UsageError(f"the inputs of {name!r} hold NaNs at one of the initial times; choose initial times with complete data")
    init_hours = store.hours[np.asarray(indices)]
    step_hours = _hours(store.time_step) * stride
    meta = dict(lat=store.lat, lon=store.lon, atmos_levels=store.levels)
    inputs = Batch(surf_vars=surf, static_vars=store.static, atmos_vars=atmos, metadata=Metadata(time=init_hours, **meta))
    targets = Batch(
        surf_vars={k: np.zeros((b, steps, h, w), np.float32) for k in store.fields[SURF]},
        static_vars=store.static,
        atmos_vars={k: np.zeros((b, steps, c, h, w), np.float32) for k in store.fields[ATMOS]},
        metadata=Metadata(time=init_hours + step_hours, **meta),
    )
    return Sample(inputs=inputs, targets=targets)


# --- writing ---------------------------------------------------------------------------------

class ForecastWriter:
    """Appends forecast batches to a WB2-layout Zarr store written beside ``path`` and renamed
    into place by :meth:`close` (a failed run leaves nothing at ``path``).

    Args:
      path: the store to write (must not exist unless ``overwrite``).
      store: the WeatherStore the inputs came from (grid, levels, variable names and units).
      leads: (N,) timedelta64 lead times.
      attrs: global attributes to add.
      zarr_format: 2 (consolidated metadata, as WB2 publishes) or 3.
      members: the ensemble size M: the fields then have a ``number`` dim after ``time``
        (None: no member dim).
    """

    def __init__(self, path: str, store: Any, leads: np.ndarray, attrs: dict[str, Any], zarr_format: int = 2, overwrite: bool = False,
                 members: int | None = None) -> None:
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise UsageError(f"--out {path} already exists; choose a new path or pass --overwrite")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise UsageError(f"the folder of --out {path} does not exist; create {parent} first")
        self.partial = f"{self.path}.partial-{os.getpid()}"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.store, self.leads, self.attrs, self.zarr_format, self.members = store, leads, attrs, zarr_format, members
        self._written = 0
        self.names = {
            kind: {name: wb2_name(kind, name, field.store_name) for name, field in store.fields[kind].items()} for kind in (SURF, ATMOS)
        }

    def _name(self, kind: str, name: str) -> str:
        """The WB2 name of a predicted field (one the store lacks: its standard WB2 name)."""
        return self.names[kind].get(name) or wb2_name(kind, name, name)

    def _units(self, kind: str, name: str) -> str | None:
        field = self.store.fields[kind].get(name)
        ds = getattr(getattr(self.store, "_source", None), "ds", None)  # the store's xarray view, if it keeps one
        units = ds[field.store_name].attrs.get("units") if field is not None and ds is not None and field.store_name in ds else None
        wb2 = self._name(kind, name)
        return units or (CF_METADATA[wb2][0] if wb2 in CF_METADATA else None)

    def _attrs(self, kind: str, name: str) -> dict[str, Any]:
        """CF attributes of a field: units (the store's, else CF_METADATA's), standard_name
        (when CF has one), long_name, and the store's and Aurora's names."""
        wb2 = self._name(kind, name)
        attrs: dict[str, Any] = {}
        units = self._units(kind, name)
        if units:
            attrs["units"] = units
        if wb2 in CF_METADATA:
            _, standard_name, long_name = CF_METADATA[wb2]
            if standard_name:
                attrs["standard_name"] = standard_name
            if long_name:
                attrs["long_name"] = long_name
        field = self.store.fields[kind].get(name)
        if field is not None:
            attrs["source_name"] = field.store_name
        attrs["aurora_name"] = name
        return attrs

    def dataset(self, init_times: np.ndarray, prediction: Any) -> xr.Dataset:
        """One batch as an xarray Dataset. ``prediction``: a Batch with surf (b, [M,] N, h, w)
        and atmos (b, [M,] N, c, h, w) in Aurora orientation (M: with ``members``);
        ``init_times``: (b,) datetime64."""
        lat = np.asarray(prediction.metadata.lat, np.float64)[::-1]  # WB2: ascending (a model may crop rows)
        lon = np.asarray(prediction.metadata.lon, np.float64)
        lead_dims = ("time", MEMBER_DIM, "prediction_timedelta") if self.members is not None else ("time", "prediction_timedelta")
        data = {}
        for kind, fields in ((SURF, prediction.surf_vars), (ATMOS, prediction.atmos_vars)):
            for name, value in fields.items():
                value = np.asarray(value, np.float32)[..., ::-1, :]  # latitudes ascending
                dims = lead_dims + (("latitude", "longitude") if kind == SURF else ("level", "latitude", "longitude"))
                data[self._name(kind, name)] = xr.Variable(dims, value, self._attrs(kind, name))
        coords = {
            "time": xr.Variable("time", np.asarray(init_times, "datetime64[ns]"), {"standard_name": "forecast_reference_time", "long_name": "initialization time"}),
            "prediction_timedelta": xr.Variable("prediction_timedelta", self.leads, {"standard_name": "forecast_period", "long_name": "lead time"}),
            "latitude": xr.Variable("latitude", lat, {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude", "axis": "Y"}),
            "longitude": xr.Variable("longitude", lon, {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude", "axis": "X"}),
        }
        if self.members is not None:
            coords[MEMBER_DIM] = xr.Variable(MEMBER_DIM, np.arange(self.members, dtype=np.int64), {"standard_name": "realization", "long_name": "ensemble member"})
        if prediction.atmos_vars:
            coords["level"] = xr.Variable("level", np.asarray(self.store.levels, np.int64), {"units": "hPa", "standard_name": "air_pressure", "long_name": "pressure level", "positive": "down", "axis": "Z"})
        return xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.8", **self.attrs})

    def write(self, init_times: np.ndarray, prediction: Any) -> None:
        """Append one batch of forecasts along ``time``."""
        ds = self.dataset(init_times, prediction)
        if self._written == 0:
            lead = 2 if self.members is not None else 1  # one chunk per initial time (and member)
            encoding = {name: {"chunks": (1,) * lead + var.shape[lead:]} for name, var in ds.data_vars.items()}
            encoding["time"] = {"units": "hours since 1970-01-01", "dtype": "int64"}
            encoding["prediction_timedelta"] = {"units": "hours", "dtype": "int64"} if np.all(self.leads % np.timedelta64(1, "h") == np.timedelta64(0)) else {}
            ds.to_zarr(self.partial, mode="w", zarr_format=self.zarr_format, consolidated=self.zarr_format == 2, encoding=encoding)
        else:
            ds.to_zarr(self.partial, append_dim="time", zarr_format=self.zarr_format, consolidated=self.zarr_format == 2)
        self._written += len(init_times)

    def close(self) -> str:
        """Move the finished store into place; returns its path."""
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


# --- the roll-out ----------------------------------------------------------------------------

def batches(indices: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """``indices`` in consecutive chunks of ``size``."""
    for i in range(0, len(indices), size):
        yield indices[i : i + size]


def check_forecast_options(task: Any, name: str, step_hours: float, fine_lead_times: Sequence[float] | None,
                           members: int | None) -> None:
    """One-line UsageErrors for sub-steps or an ensemble that the model cannot forecast."""
    cfg = aurora_config(task)
    if fine_lead_times is not None:
        if cfg is None or not cfg.variable_lead_time:
            raise UsageError(f"--fine_lead_times needs a model with variable lead times (v1p5, v1p5_tiny, v1p5_ensemble, ...); "
                             f"{name} has a fixed step: leave the flag out")
        if not np.isclose(float(fine_lead_times[-1]), float(step_hours)):
            listed = ",".join(f"{v:g}" for v in fine_lead_times)
            raise UsageError(f"--fine_lead_times {listed} must end at the model step, {step_hours:g} h: the last sub-step advances the roll-out; "
                             f"e.g. --fine_lead_times {','.join(f'{v:g}' for v in np.arange(1, step_hours + 0.5))}")
    if members is not None:
        if members < 1:
            raise UsageError(f"--ensemble_members must be at least 1, got {members}")
        if cfg is None or not cfg.stochastic:
            raise UsageError(f"--ensemble_members {members} needs a stochastic model (v1p5_ensemble, v1p5_ensemble_tiny); "
                             f"{name} is deterministic: leave the flag out")


def member_keys(seed: int, member: int, init_hours: np.ndarray) -> Any:
    """(b,) PRNG keys of one member's forecasts from ``init_hours`` (hours since 1970):
    ``key(seed)`` folded with the member, then with each initial time (in minutes)."""
    import jax
    import jax.numpy as jnp

    minutes = (np.round(np.asarray(init_hours, np.float64) * 60.0).astype(np.int64) % (1 << 32)).astype(np.uint32)
    base = jax.random.fold_in(jax.random.key(int(seed)), int(member))
    return jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.asarray(minutes))


@functools.lru_cache(maxsize=8)
def _noise_draw(shape: tuple[int, ...], sharding: Any) -> Any:
    """Jitted ``keys (b,) -> (next keys, noise (b, *shape))``: one standard-normal draw per row."""
    import jax
    import jax.numpy as jnp

    def draw(keys: Any) -> tuple[Any, Any]:
        pairs = jax.vmap(jax.random.split)(keys)
        return pairs[:, 0], jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(pairs[:, 1])

    return jax.jit(draw, out_shardings=(sharding, sharding)) if sharding is not None else jax.jit(draw)


class RowNoise(AccumulatedNoise):
    """A stochastic Aurora's noise for a roll-out's forward passes, (b, L', D) each, every row
    (example) drawn from its own key (:func:`member_keys`); accumulated over ``accumulate``
    passes as :class:`aurora_loop.model.aurora.AccumulatedNoise` (the reference's noise
    accumulation over a main step's sub-steps)."""

    def __init__(self, keys: Any, shape: tuple[int, ...], accumulate: int = 0, sharding: Any = None) -> None:
        import jax

        super().__init__(accumulate)
        self.keys = keys if sharding is None else jax.device_put(keys, sharding)
        self._draw = _noise_draw(tuple(int(v) for v in shape), sharding)

    def _fresh(self) -> Any:
        self.keys, noise = self._draw(self.keys)
        return noise


def aurora_rollout(cfg: Any, params: Any, inputs: Any, steps: int, fine_lead_times: Sequence[float] | None = None,
                   noise: Any = None, known_grid: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every prediction of an Aurora roll-out (:func:`aurora_loop.model.aurora.rollout`) as
    numpy: surf (b, N, h, w), atmos (b, N, c, h, w), N = steps (x the sub-steps)."""
    import jax

    from aurora_loop.model.aurora import rollout

    surf: dict[str, list[np.ndarray]] = {}
    atmos: dict[str, list[np.ndarray]] = {}
    for pred in rollout(cfg, params, inputs, steps, fine_lead_times=fine_lead_times, noise=noise, known_grid=known_grid):
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
    from aurora_loop.parallel import DATA_AXIS, batch_shardings, make_mesh, place_batch, replicated

    mesh = make_mesh(num_devices)
    batch_size = batch_size or mesh.size
    if batch_size % mesh.size:
        raise UsageError(f"--batch_size {batch_size} is not divisible by the {mesh.size} devices; use a multiple of {mesh.size}")
    cfg = aurora_config(loaded.task)
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
        "dataset_path": os.path.abspath(store.path),
        "member": int(member),
        "input_steps": history,
        "time_step_hours": step_hours,
        "store_time_step_hours": _hours(store.time_step),
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
                    raise UsageError(f"the store's {store.shape[0]} x {store.shape[1]} grid does not fit the model: {err}; regrid the store") from None
                if known_grid is None:  # the patch areas become constants of the compiled step
                    known_grid = KnownGrid(np.asarray(grid.lat), np.asarray(grid.lon))
                placed = place_batch(inputs, batch_shardings(inputs, mesh))
                runs = []
                for m in range(members or 1):
                    noise = None
                    if stochastic:
                        noise = RowNoise(member_keys(seed, m, store.hours[padded]), noise_shape(cfg, inputs)[1:],
                                         accumulate=len(fine_lead_times) if fine_lead_times else 0, sharding=rows)
                    runs.append(aurora_rollout(cfg, params, placed, steps, fine_lead_times, noise, known_grid))
                stack = (lambda vs: np.stack(vs, axis=1)) if members is not None else (lambda vs: vs[0])  # noqa: E731
                prediction = Batch(
                    surf_vars={k: stack([r[0][k] for r in runs])[:n] for k in runs[0][0]},
                    static_vars={},
                    atmos_vars={k: stack([r[1][k] for r in runs])[:n] for k in runs[0][1]},
                    metadata=Metadata(lat=np.asarray(grid.lat), lon=np.asarray(grid.lon), time=store.hours[chunk], atmos_levels=store.levels),
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
    zarr_format: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    overrides: dict[str, str] | None = None,
    weights: str = "auto",
    fine_lead_times: str | Sequence[float] | None = None,
    ensemble_members: int | None = None,
    seed: int = 0,
) -> ForecastResult:
    """``aurora-loop forecast`` as a function: load, check, roll out, write.

    ``init`` as in :func:`parse_init_times`. The variables, levels, history and model step are
    the run's (``overrides``: TrainingConfig fields as flag strings, e.g. ``{"levels":
    "500,850"}`` or ``{"timestep_hours": "6"}``; the step: :func:`model_step_hours`);
    ``dataset_path`` / ``static_path`` default to the run's stores. ``fine_lead_times``,
    ``ensemble_members``, ``seed``: as :func:`run_forecast`'s ``fine_lead_times``,
    ``members``, ``seed``. Every input is checked before anything is written.
    """
    from aurora_loop.config import config_from_mapping
    from aurora_loop.datasets import WeatherStore, selection_from_config

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
    store = WeatherStore(config.dataset_path, selection_from_config(config), static_path=config.static_path)
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
    path = run_forecast(loaded, store, indices, steps, out, batch_size=batch_size, num_devices=num_devices, member=member,
                        zarr_format=zarr_format, overwrite=overwrite, progress=progress, fine_lead_times=fine,
                        members=ensemble_members, seed=seed)
    return ForecastResult(path=path, count=len(indices), step_hours=step_hours, leads=forecast_leads(steps, step_hours, fine),
                          members=ensemble_members, stochastic=bool(cfg is not None and cfg.stochastic), seed=seed)
