"""Top-of-atmosphere insolation, the field Aurora 1.5 prescribes instead of predicting.

Aurora 1.5 takes ``insolation`` as a surface input and replaces its prediction with this
formula at the prediction's valid time (the reference's ``aurora/insolation.py``; orbital
elements of 1995 and the first-order orbit of Brian Rose's *Climate Laboratory*). The value
is dimensionless (``s0 = 1``): ``sin(lat) sin(dec) - cos(lat) cos(dec) cos(h)`` scaled by the
inverse squared Earth-Sun distance, negative at night.

Two implementations of one formula:

- :func:`insolation_numpy`: on the host, with the reference's float32 / float64 steps, so a
  roll-out whose times are known on the host feeds the next step what the reference feeds;
- :func:`insolation_jax`: traceable, for jitted training steps whose times are traced
  (hours since 1970 as an array). It agrees with the numpy version to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any

OBLIQUITY = 23.4441 * np.pi / 180.0  # radians
ECCENTRICITY = 0.016715
PERIHELION_LONGITUDE = 282.7 * np.pi / 180.0  # radians
_BETA = np.sqrt(1 - ECCENTRICITY**2.0)
_LAMBDA_M0 = ECCENTRICITY * (1.0 + _BETA) * np.sin(PERIHELION_LONGITUDE)


def _day_of_year_numpy(hours_since_epoch: np.ndarray) -> np.ndarray:
    """Days (float32) since 1 January 00:00 of each time's year."""
    hours = np.asarray(hours_since_epoch, dtype=np.float64)
    # Microseconds keep the datetime exact for any time a batch can carry.
    moments = np.datetime64("1970-01-01T00:00", "us") + np.round(hours * 3.6e9).astype("timedelta64[us]")
    years = moments.astype("datetime64[Y]")
    return ((moments - years) / np.timedelta64(1, "D")).astype(np.float32)


def insolation_numpy(hours_since_epoch: Any, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Insolation (t, h, w) float32 at times (t,) hours since 1970 on the grid lat (h,), lon
    (w,) in degrees, computed step for step as the reference computes it (its float32 casts
    and numpy's type promotion included)."""
    lat2 = np.asarray(lat).astype(np.float32)
    lon2 = np.asarray(lon).astype(np.float32)
    lon2, lat2 = np.meshgrid(lon2, lat2)
    days = _day_of_year_numpy(np.atleast_1d(hours_since_epoch))[:, None, None]
    lambda_m = _LAMBDA_M0 + 2.0 * np.pi * (days - 80.5) / 365.0
    lambda_ = lambda_m + 2.0 * ECCENTRICITY * np.sin(lambda_m - PERIHELION_LONGITUDE)
    dec = np.arcsin(np.sin(OBLIQUITY) * np.sin(lambda_)).astype("float32")
    hour_angle = (2 * np.pi * (days + lon2 / 360.0)).astype("float32", copy=False)
    rho = ((1.0 - ECCENTRICITY**2.0) / (1.0 + ECCENTRICITY * np.cos(lambda_ - PERIHELION_LONGITUDE))).astype("float32", copy=False)
    lat_rad = np.pi / 180.0 * lat2[None, ...]
    diff = np.sin(lat_rad) * np.sin(dec) - np.cos(lat_rad) * np.cos(dec) * np.cos(hour_angle)
    return (diff * rho**-2.0).astype(np.float32)


def _day_of_year_jax(hours_since_epoch: Array) -> Array:
    """Days since 1 January of each time's year, from hours since 1970 (traced).

    The civil year comes from whole days since the epoch with Hinnant's ``civil_from_days``
    (integer arithmetic), so it is exact for any date; the fraction of the day is kept.
    """
    hours = jnp.asarray(hours_since_epoch)
    whole_days = jnp.floor(hours / 24.0)
    # Whole hours are exact in float32 up to 2**24 h, and so is this remainder; dividing
    # the full count by 24 first would cost the fraction ~1e-3 days near 2020.
    remainder = hours - 24.0 * whole_days
    whole_days = whole_days + jnp.floor(remainder / 24.0)  # the floor above may be one off
    fraction = (hours - 24.0 * whole_days) / 24.0
    z = whole_days.astype(jnp.int32) + 719468
    era = jnp.floor_divide(z, 146097)
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy_march = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of the year starting 1 March
    mp = (5 * doy_march + 2) // 153
    month = jnp.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    # Days from 1970-01-01 to 1 January of ``year`` (Hinnant's days_from_civil with m = d = 1).
    y = year - 1
    era_y = jnp.floor_divide(y, 400)
    yoe_y = y - era_y * 400
    doe_jan1 = 365 * yoe_y + yoe_y // 4 - yoe_y // 100 + 306
    jan1 = era_y * 146097 + doe_jan1 - 719468
    return (whole_days - jan1.astype(whole_days.dtype)) + fraction


def insolation_jax(hours_since_epoch: Array, lat: Array, lon: Array) -> Array:
    """Traceable :func:`insolation_numpy`: times (b,) hours since 1970 -> (b, h, w) float32."""
    days = _day_of_year_jax(hours_since_epoch).astype(jnp.float32)[:, None, None]
    lat2 = jnp.asarray(lat, jnp.float32)[None, :, None]
    lon2 = jnp.asarray(lon, jnp.float32)[None, None, :]
    lambda_m = jnp.float32(_LAMBDA_M0) + jnp.float32(2.0 * np.pi / 365.0) * (days - 80.5)
    lambda_ = lambda_m + jnp.float32(2.0 * ECCENTRICITY) * jnp.sin(lambda_m - jnp.float32(PERIHELION_LONGITUDE))
    dec = jnp.arcsin(jnp.float32(np.sin(OBLIQUITY)) * jnp.sin(lambda_))
    hour_angle = jnp.float32(2 * np.pi) * (days + lon2 / 360.0)
    rho = jnp.float32(1.0 - ECCENTRICITY**2.0) / (1.0 + jnp.float32(ECCENTRICITY) * jnp.cos(lambda_ - jnp.float32(PERIHELION_LONGITUDE)))
    lat_rad = jnp.float32(np.pi / 180.0) * lat2
    diff = jnp.sin(lat_rad) * jnp.sin(dec) - jnp.cos(lat_rad) * jnp.cos(dec) * jnp.cos(hour_angle)
    return (diff / (rho * rho)).astype(jnp.float32)
