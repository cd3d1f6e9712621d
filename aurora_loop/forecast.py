"""Roll a trained model out from chosen initial times and write a WeatherBench2 forecast store.

The store follows WeatherBench2's forecast layout, so WB2 tools and ``xarray.open_zarr``
read it:

- dims ``time`` (the initialisation time: the newest input the model saw),
  ``prediction_timedelta`` (lead time, timedelta64; ``k * dt`` for roll-out step k = 1..N,
  ``dt`` the store's time step), ``level`` (hPa, atmospheric variables only), ``latitude``
  (degrees north, ascending -90 -> 90 as WB2 writes it), ``longitude`` (degrees east in
  [0, 360));
- variables under their WB2 names (``2m_temperature``, ``geopotential``, ...), float32,
  surface ones (time, prediction_timedelta, latitude, longitude), atmospheric ones (time,
  prediction_timedelta, level, latitude, longitude);
- CF attributes: ``units``, ``long_name``, ``standard_name`` on variables and coordinates,
  ``Conventions = "CF-1.8"`` and where the forecast came from on the dataset.

The model comes from a checkpoint (see :func:`load_model`) and is run through its task's
``predict(params, sample) -> Batch`` (the optional Task method), jitted once with the
parameters replicated and the initial times split over every visible device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from aurora_loop.datasets.variables import ATMOS, DEFAULT_MAP, SURF
from aurora_loop.errors import UsageError
from aurora_loop.progress import Progress

#: CF metadata of the WB2 variables: name -> (units, standard_name, long_name).
CF_VARIABLES: dict[str, tuple[str, str, str]] = {
    "2m_temperature": ("K", "air_temperature", "2 metre temperature"),
    "10m_u_component_of_wind": ("m s-1", "eastward_wind", "10 metre U wind component"),
    "10m_v_component_of_wind": ("m s-1", "northward_wind", "10 metre V wind component"),
    "mean_sea_level_pressure": ("Pa", "air_pressure_at_mean_sea_level", "mean sea level pressure"),
    "geopotential": ("m2 s-2", "geopotential", "geopotential"),
    "u_component_of_wind": ("m s-1", "eastward_wind", "U component of wind"),
    "v_component_of_wind": ("m s-1", "northward_wind", "V component of wind"),
    "temperature": ("K", "air_temperature", "temperature"),
    "specific_humidity": ("kg kg-1", "specific_humidity", "specific humidity"),
}

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


def load_model(resolved: tuple[Any, str, str, int | None], example: Any, weights: str = "auto") -> LoadedModel:
    """Build the task of a resolved checkpoint (:func:`resolve_checkpoint`) and load its parameters.

    ``example``: a Sample of the data to forecast (b >= 1), used to build the task's abstract
    parameters (``jax.eval_shape`` of ``task.init``), which the checkpoint must match.
    ``weights``: of a training checkpoint, the moving average or the trained weights
    (:mod:`aurora_loop.checkpoint_weights`; an export holds the ones it was made with).
    """
    import jax

    from aurora_loop.checkpoint_weights import restore_state_weights
    from aurora_loop.task import available_tasks, make_task

    config, layout, where, step = resolved
    if config.model not in available_tasks():
        raise UsageError(f"model {config.model!r} of the checkpoint is not a known model; choose one of: {', '.join(available_tasks())}")
    task = make_task(config.model, config)
    if not callable(getattr(task, "predict", None)):
        raise UsageError(f"the {config.model!r} task has no predict(params, sample) method, so it cannot forecast; add one (see aurora_loop/task.py)")
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

def parse_init_times(text: str, times: np.ndarray, history: int) -> np.ndarray:
    """Store time indices of the initial times named by ``text``.

    ``text``: a comma list of ISO times (``2020-01-20T00,2020-01-21T00``); ``all`` (every
    time with ``history - 1`` earlier steps); or ``START/END[/EVERY]`` (every store time in
    [START, END], every EVERY, e.g. ``2020-01-20/2020-01-25/12h``). ``times``: (n,)
    datetime64 of the store. Returns (m,) int64 indices into ``times``, ascending, no repeats.
    """
    text = text.strip()
    first_ok = history - 1
    if text == "all":
        if times.size <= first_ok:
            raise UsageError(f"the store holds {times.size} times; a forecast needs {history} input steps")
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
            raise UsageError(f"--init {text!r} selects no store time with {history - 1} earlier step(s); the store runs {times[0]} to {times[-1]}")
        return pick.astype(np.int64)
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        t = _datetime(part)
        hit = np.nonzero(times == t)[0]
        if hit.size == 0:
            raise UsageError(f"--init {part} is not a time of the store (it runs {times[0]} to {times[-1]} every {_hours(times[1] - times[0]):g} h); pick one of its times")
        if hit[0] < first_ok:
            raise UsageError(f"--init {part} needs {history - 1} earlier step(s) of history in the store; the earliest possible init is {times[first_ok]}")
        out.append(int(hit[0]))
    if not out:
        raise UsageError("--init is empty; pass ISO times like 2020-01-20T00, a range START/END, or all")
    return np.unique(np.asarray(out, dtype=np.int64))  # time order, each once (as WB2 stores them)


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


# --- reading inputs --------------------------------------------------------------------------

def read_inputs(store: Any, indices: Sequence[int], steps: int, history: int, member: int = 0) -> Any:
    """The model inputs for initial times ``store.times[indices]`` as a Sample.

    ``inputs``: surf (b, history, h, w), atmos (b, history, c, h, w) float32 read from the
    store, ``metadata.time`` = the initial times (hours since 1970). ``targets``: zeros of
    t = ``steps`` (the forecast does not need the truth, so it may run past the store's end)
    with ``metadata.time`` = the first lead's valid time; only their shapes and times are read.
    """
    from aurora_loop.model.batch import Batch, Metadata, Sample

    b = len(indices)
    h, w = store.shape
    c = len(store.levels)
    surf = {k: np.empty((b, history, h, w), np.float32) for k in store.fields[SURF]}
    atmos = {k: np.empty((b, history, c, h, w), np.float32) for k in store.fields[ATMOS]}
    for slot, index in enumerate(indices):
        store.read_into({k: v[slot] for k, v in surf.items()}, {k: v[slot] for k, v in atmos.items()}, int(index) - history + 1, member)
    for name, value in (*surf.items(), *atmos.items()):
        if np.isnan(value.min()):
            raise UsageError(f"the inputs of {name!r} hold NaNs at one of the initial times; choose initial times with complete data")
    init_hours = store.hours[np.asarray(indices)]
    step_hours = _hours(store.time_step)
    meta = dict(lat=store.lat, lon=store.lon, atmos_levels=store.levels)
    inputs = Batch(surf_vars=surf, static_vars=store.static, atmos_vars=atmos, metadata=Metadata(time=init_hours, **meta))
    targets = Batch(
        surf_vars={k: np.zeros((b, steps, h, w), np.float32) for k in surf},
        static_vars=store.static,
        atmos_vars={k: np.zeros((b, steps, c, h, w), np.float32) for k in atmos},
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
    """

    def __init__(self, path: str, store: Any, leads: np.ndarray, attrs: dict[str, Any], zarr_format: int = 2, overwrite: bool = False) -> None:
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise UsageError(f"--out {path} already exists; choose a new path or pass --overwrite")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise UsageError(f"the folder of --out {path} does not exist; create {parent} first")
        self.partial = f"{self.path}.partial-{os.getpid()}"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.store, self.leads, self.attrs, self.zarr_format = store, leads, attrs, zarr_format
        self._written = 0
        self.names = {
            kind: {name: wb2_name(kind, name, field.store_name) for name, field in store.fields[kind].items()} for kind in (SURF, ATMOS)
        }

    def _units(self, kind: str, name: str) -> str | None:
        field = self.store.fields[kind][name]
        ds = getattr(getattr(self.store, "_source", None), "ds", None)  # the store's xarray view, if it keeps one
        units = ds[field.store_name].attrs.get("units") if ds is not None and field.store_name in ds else None
        wb2 = self.names[kind][name]
        return units or (CF_VARIABLES[wb2][0] if wb2 in CF_VARIABLES else None)

    def dataset(self, init_times: np.ndarray, prediction: Any) -> xr.Dataset:
        """One batch as an xarray Dataset. ``prediction``: a Batch with surf (b, N, h, w) and
        atmos (b, N, c, h, w) in Aurora orientation; ``init_times``: (b,) datetime64."""
        lat = np.asarray(prediction.metadata.lat, np.float64)[::-1]  # WB2: ascending (a model may crop rows)
        lon = np.asarray(prediction.metadata.lon, np.float64)
        data = {}
        for kind, fields in ((SURF, prediction.surf_vars), (ATMOS, prediction.atmos_vars)):
            for name, value in fields.items():
                wb2 = self.names[kind][name]
                value = np.asarray(value, np.float32)[..., ::-1, :]  # latitudes ascending
                dims = ("time", "prediction_timedelta", "latitude", "longitude") if kind == SURF else ("time", "prediction_timedelta", "level", "latitude", "longitude")
                attrs = {}
                units = self._units(kind, name)
                if units:
                    attrs["units"] = units
                if wb2 in CF_VARIABLES:
                    attrs["standard_name"], attrs["long_name"] = CF_VARIABLES[wb2][1], CF_VARIABLES[wb2][2]
                attrs["source_name"] = self.store.fields[kind][name].store_name
                attrs["aurora_name"] = name
                data[wb2] = xr.Variable(dims, value, attrs)
        coords = {
            "time": xr.Variable("time", np.asarray(init_times, "datetime64[ns]"), {"standard_name": "forecast_reference_time", "long_name": "initialization time"}),
            "prediction_timedelta": xr.Variable("prediction_timedelta", self.leads, {"standard_name": "forecast_period", "long_name": "lead time"}),
            "latitude": xr.Variable("latitude", lat, {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude", "axis": "Y"}),
            "longitude": xr.Variable("longitude", lon, {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude", "axis": "X"}),
        }
        if prediction.atmos_vars:
            coords["level"] = xr.Variable("level", np.asarray(self.store.levels, np.int64), {"units": "hPa", "standard_name": "air_pressure", "long_name": "pressure level", "positive": "down", "axis": "Z"})
        return xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.8", **self.attrs})

    def write(self, init_times: np.ndarray, prediction: Any) -> None:
        """Append one batch of forecasts along ``time``."""
        ds = self.dataset(init_times, prediction)
        if self._written == 0:
            encoding = {name: {"chunks": (1,) + var.shape[1:]} for name, var in ds.data_vars.items()}
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
) -> str:
    """Forecast ``steps`` steps from every initial time ``store.times[init_indices]`` and write
    the WB2 forecast store ``out`` (see the module docstring). Returns its path.

    The initial times are processed ``batch_size`` at a time (default: one per device),
    split over a ``("data",)`` mesh of ``num_devices`` devices (default: all visible); the last
    batch is padded by repeating its final initial time, and the padding is dropped.
    """
    import jax

    from aurora_loop.parallel import batch_shardings, make_mesh, place_batch, replicated

    mesh = make_mesh(num_devices)
    batch_size = batch_size or mesh.size
    if batch_size % mesh.size:
        raise UsageError(f"--batch_size {batch_size} is not divisible by the {mesh.size} devices; use a multiple of {mesh.size}")
    history = int(loaded.config.history)
    leads = (np.arange(1, steps + 1) * store.time_step).astype("timedelta64[ns]")
    attrs = {
        "title": f"aurora_loop forecast ({loaded.config.model})",
        "model": loaded.config.model,
        "checkpoint": loaded.source,
        "checkpoint_step": -1 if loaded.step is None else int(loaded.step),
        "dataset_path": os.path.abspath(store.path),
        "member": int(member),
        "input_steps": history,
        "time_step_hours": _hours(store.time_step),
        "comment": "time = initialization time (the newest input); valid time = time + prediction_timedelta",
    }
    writer = ForecastWriter(out, store, leads, attrs, zarr_format=zarr_format, overwrite=overwrite)
    params = jax.device_put(loaded.params, replicated(mesh))
    predict = None
    bar = Progress(len(init_indices), "forecast", unit="init times") if progress else None
    done = 0
    try:
        for chunk in batches(np.asarray(init_indices), batch_size):
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk))])
            sample = read_inputs(store, padded, steps, history, member)
            shardings = batch_shardings(sample, mesh)
            if predict is None:
                predict = jax.jit(loaded.task.predict, in_shardings=(replicated(mesh), shardings))
            prediction = jax.device_get(predict(params, place_batch(sample, shardings)))
            n = len(chunk)
            prediction = prediction.replace(
                surf_vars={k: np.asarray(v)[:n] for k, v in prediction.surf_vars.items()},
                atmos_vars={k: np.asarray(v)[:n] for k, v in prediction.atmos_vars.items()},
            )
            writer.write(store.times[chunk], prediction)
            done += len(chunk)
            if bar:
                bar.update(done)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


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
) -> tuple[str, int]:
    """``aurora-loop forecast`` as a function: load, check, roll out, write.

    ``init`` as in :func:`parse_init_times`. The variables, levels and history are the run's
    (``overrides``: TrainingConfig fields as flag strings, e.g. ``{"levels": "500,850"}``);
    ``dataset_path`` / ``static_path`` default to the run's stores. Every input is checked
    before anything is written. Returns (path of the store, number of initial times).
    """
    from aurora_loop.config import config_from_mapping
    from aurora_loop.datasets import WeatherStore, selection_from_config

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
    history = int(config.history)
    indices = parse_init_times(init, store.times, history)
    example = read_inputs(store, indices[:1], 1, history, member)
    loaded = load_model((config, layout, where, step), example, weights=weights)
    path = run_forecast(loaded, store, indices, steps, out, batch_size=batch_size, num_devices=num_devices, member=member,
                        zarr_format=zarr_format, overwrite=overwrite, progress=progress)
    return path, len(indices)
