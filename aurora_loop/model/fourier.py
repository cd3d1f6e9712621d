"""Fourier encodings of scalars (positions, areas, times, pressure levels).

A scalar ``x`` becomes ``[sin(2 pi x / l_1), ..., sin(2 pi x / l_n), cos(...)...]`` for
``n = d / 2`` wavelengths ``l_j`` spaced log-uniformly between ``lower`` and ``upper``.

The reference evaluates the phases in float64 and rounds the encoding to float32. Phases
get large (an absolute time of ~4.4e5 hours against a 1-hour wavelength, a patch size of
~1e3 km against a ~1e-4 wavelength), so in float32 a plain ``x * (2 pi / l)`` loses the
phase completely. Without x64 we therefore reduce the phase exactly: ``x`` and ``1 / l``
are split into 12-bit pieces whose products are exact in float32, and only the fractional
parts of those products (in cycles) are accumulated. The result agrees with the float64
evaluation to ~1e-6 radians.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = Any

# (lower, upper) wavelengths of each encoding, in the unit of the encoded quantity.
_DELTA = 0.01  # smallest latitude/longitude step considered (degrees)
RADIUS_EARTH_KM = 6378137 / 1000


def _polygon_area_km2(polygon: np.ndarray) -> float:
    """Area (km^2) of a lat/lon polygon (degrees), as the ``area`` package computes it."""
    polygon = np.concatenate([polygon, polygon[-1:]], axis=0)
    n = polygon.shape[0]
    total = 0.0
    for i in range(n):
        lon_lower = polygon[i, 1]
        lat_middle = polygon[(i + 1) % n, 0]
        lon_upper = polygon[(i + 2) % n, 1]
        total += (np.deg2rad(lon_upper) - np.deg2rad(lon_lower)) * np.sin(np.deg2rad(lat_middle))
    return abs(total * RADIUS_EARTH_KM * RADIUS_EARTH_KM / 2)


_MIN_PATCH_AREA = _polygon_area_km2(
    np.array([[90, 0], [90, _DELTA], [90 - _DELTA, _DELTA], [90 - _DELTA, 0]], dtype=np.float64)
)
_AREA_EARTH = 4 * np.pi * RADIUS_EARTH_KM * RADIUS_EARTH_KM

POSITION = (_DELTA, 720.0)  # degrees
SCALE = (_MIN_PATCH_AREA, _AREA_EARTH)  # the square root of a patch area, km
LEAD_TIME = (1 / 60, 24 * 7 * 3)  # hours
LEAD_TIME_UPDATED = (6.0, 24 * 7 * 3)  # hours: Aurora 1.5's smoother lead-time encoding
LEVELS = (0.01, 1e5)  # hPa
ABSOLUTE_TIME = (1.0, 24 * 365.25)  # hours


def wavelengths(bounds: tuple[float, float], d: int) -> np.ndarray:
    """The ``d / 2`` wavelengths (float64) of an encoding with the given bounds."""
    if d % 2:
        raise ValueError(f"the encoding width must be even, got {d}")
    lower, upper = bounds
    return np.logspace(math.log10(lower), math.log10(upper), d // 2, base=10.0, dtype=np.float64)


def _x64() -> bool:
    return bool(jax.config.jax_enable_x64)


def _split_hi(v: Array) -> Array:
    """The float32 ``v`` with its 12 low mantissa bits cleared (12 significant bits remain)."""
    bits = lax.bitcast_convert_type(v, jnp.int32)
    return lax.bitcast_convert_type(bits & jnp.int32(-4096), jnp.float32)


def _split_constant(g: np.ndarray, pieces: int = 4) -> list[np.ndarray]:
    """Float64 ``g`` as a sum of float32 arrays with 12 significant bits each."""
    out, rest = [], g.astype(np.float64)
    for _ in range(pieces):
        piece = rest.astype(np.float32)
        piece = (piece.view(np.int32) & np.int32(-4096)).view(np.float32)
        out.append(piece)
        rest = rest - piece.astype(np.float64)
    return out


def _cycles_float32(x: Array, freq: np.ndarray) -> Array:
    """``frac(x * freq)`` in [-0.5, 0.5) for float32 ``x`` (..., n) and float64 ``freq`` (m,).

    Every partial product has at most 24 significant bits, hence is exact in float32.
    Returns (..., n, m) float32.
    """
    x = x.astype(jnp.float32)[..., None]
    x_hi = _split_hi(x)
    x_lo = x - x_hi
    acc = jnp.zeros(jnp.broadcast_shapes(x.shape, freq.shape), jnp.float32)
    for g in _split_constant(freq):
        g = jnp.asarray(g)
        for part in (x_hi, x_lo):
            prod = part * g
            acc = acc + (prod - jnp.round(prod))
            acc = acc - jnp.round(acc)
    return acc


def fourier_expansion(x: Array, d: int, bounds: tuple[float, float]) -> Array:
    """Encode ``x`` (..., n) into (..., n, d): sines then cosines, float32.

    ``x`` is used at the precision it has (callers round it to float32 where the reference
    does). With x64 enabled the phases are evaluated in float64 exactly as the reference does.
    """
    lam = wavelengths(bounds, d)
    if _x64():
        prod = jnp.asarray(x, jnp.float64)[..., None] * jnp.asarray(2 * np.pi / lam)
        enc = jnp.concatenate([jnp.sin(prod), jnp.cos(prod)], axis=-1)
        return enc.astype(jnp.float32)
    phase = (2 * np.pi) * _cycles_float32(jnp.asarray(x), 1.0 / lam)
    return jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)


def static_expansion(values: Any, d: int, bounds: tuple[float, float]) -> np.ndarray:
    """:func:`fourier_expansion` of host values (float64 phases) -> (..., d) float32 numpy."""
    values = np.asarray(values, dtype=np.float64)
    prod = values[..., None] * (2 * np.pi / wavelengths(bounds, d))
    return np.concatenate([np.sin(prod), np.cos(prod)], axis=-1).astype(np.float32)


def lead_time_encoding(hours: float, d: int, updated: bool = False) -> np.ndarray:
    """A lead time in hours (static) -> (d,) float32. ``updated``: Aurora 1.5's encoding
    (:func:`lead_times_encoding`)."""
    if not updated:
        return static_expansion(hours, d, LEAD_TIME)
    enc = static_expansion(hours, d, LEAD_TIME_UPDATED)
    enc[..., d // 2 - 1] = np.float32(np.float64(hours) / LEAD_TIME_UPDATED[1])
    return enc


def lead_times_encoding(hours: Array, d: int, updated: bool = False) -> Array:
    """Lead times per example (b,) hours (traced) -> (b, d) float32.

    ``updated`` (Aurora 1.5's ``use_updated_lead_time_embedding``): wavelengths from 6 h
    to 3 weeks, and the sine of the longest wavelength (nearly linear over any lead time
    used) replaced by the exactly linear ``hours / (3 weeks)``.
    """
    enc = fourier_expansion(hours, d, LEAD_TIME_UPDATED if updated else LEAD_TIME)
    if updated:
        linear = (jnp.asarray(hours) / LEAD_TIME_UPDATED[1]).astype(jnp.float32)
        enc = enc.at[..., d // 2 - 1].set(linear)
    return enc


def absolute_time_encoding(hours_since_epoch: Array, d: int) -> Array:
    """Hours since 1970 (b,) -> (b, d) float32. The time is rounded to float32 first, as the
    reference does."""
    return fourier_expansion(jnp.asarray(hours_since_epoch).astype(jnp.float32), d, ABSOLUTE_TIME)


def levels_encoding(levels: tuple[float, ...], d: int) -> np.ndarray:
    """Pressure levels (hPa, static) -> (c, d) float32."""
    return static_expansion(np.asarray(levels, dtype=np.float64), d, LEVELS)
