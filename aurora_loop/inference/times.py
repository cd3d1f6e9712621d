"""Times of a forecast: initial times, the model step, lead times.

All times are numpy ``datetime64[ns]`` / ``timedelta64[ns]``; hours are float hours. A
store's times are ``store.times`` ((n,) datetime64, ``store.time_step`` apart); the model
step T (:func:`model_step_hours`) is a whole number of store steps (:func:`store_stride`),
and the inputs of an initial time t0 are the store times t0 - (history - 1) T, .., t0. The
lead times of a roll-out of N steps are ``k * T`` (k = 1..N), or with sub-steps
``fine_lead_times`` (l1, .., ln = T) ``(k - 1) * T + l_j`` (:func:`forecast_leads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aurora_loop.errors import UsageError


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
            raise UsageError(
                f"--init {text!r} selects no store time with {history - 1} earlier step(s){_apart(stride)}; the store runs {times[0]} to {times[-1]}"
            )
        return pick.astype(np.int64)
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        t = _datetime(part)
        hit = np.nonzero(times == t)[0]
        if hit.size == 0:
            raise UsageError(
                f"--init {part} is not a time of the store (it runs {times[0]} to {times[-1]} every {timedelta_hours(times[1] - times[0]):g} h); pick one of its times"
            )
        if hit[0] < first_ok:
            raise UsageError(
                f"--init {part} needs {history - 1} earlier step(s) of history in the store{_apart(stride)}; the earliest possible init is "
                f"{times[first_ok] if first_ok < times.size else 'past its end'}"
            )
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


def timedelta_hours(delta: np.timedelta64) -> float:
    """A time step in (float) hours."""
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
    return timedelta_hours(store.time_step)


def store_stride(step_hours: float, store: Any) -> int:
    """Store time steps per model step ``step_hours``; a UsageError unless a whole number >= 1."""
    dt = timedelta_hours(store.time_step)
    ratio = float(step_hours) / dt
    whole = int(round(ratio))
    if whole < 1 or abs(ratio - whole) > 1e-6 * max(1.0, ratio):
        raise UsageError(
            f"the model step {step_hours:g} h is not a whole multiple of the store's {dt:g} h time step; "
            f"forecast from a store whose step divides {step_hours:g} h, or pass --timestep_hours"
        )
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
        raise UsageError(
            f"--fine_lead_times must be positive hours in increasing order ending at the model step, e.g. 1,2,3,4,5,6; got {text!r}"
        )
    return values


def forecast_leads(steps: int, step_hours: float, fine_lead_times: Sequence[float] | None = None) -> np.ndarray:
    """(N,) timedelta64[ns] lead times of a roll-out of ``steps`` model steps of ``step_hours``:
    ``k * T`` (k = 1..steps), or with ``fine_lead_times`` ``(k - 1) * T + l`` for every l."""
    subs = [float(step_hours)] if not fine_lead_times else [float(v) for v in fine_lead_times]
    hours = np.asarray([k * float(step_hours) + lead for k in range(int(steps)) for lead in subs], np.float64)
    return np.round(hours * 3600e9).astype("int64").astype("timedelta64[ns]")
