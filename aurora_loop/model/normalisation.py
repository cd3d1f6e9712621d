"""Normalisation statistics of Aurora's standard variables and the transforms that use them.

Aurora sees every variable as ``(x - location) / scale``. The numbers below are the
published training statistics of the base model (ERA5, 0.25 degrees): one pair per surface
or static variable, and one pair per atmospheric variable *per pressure level* for the 13
standard levels (hPa). Units are those of the raw fields: K (``2t``, ``t``), m s-1 (``10u``,
``10v``, ``u``, ``v``), Pa (``msl``), m2 s-2 (``z``, static ``z``), kg kg-1 (``q``), Pa s-1
(``w``), and dimensionless for ``lsm`` / ``slt``.

``surf_stats`` (a mapping ``name -> (location, scale)``) overrides the surface and static
entries, as the reference's ``surf_stats`` argument does. Atmospheric overrides use the
reference's per-level keys ``f"{name}_{level_to_str(level)}"`` (``"z_500"``, ``"t_850"``), as
its ``locations`` / ``scales`` dicts do; one mapping may hold both kinds (a model config's
``surf_stats_dict``). ``aurora-loop stats`` computes such statistics for new variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Array = Any

STANDARD_LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)

SURFACE_STATS: dict[str, tuple[float, float]] = {
    "2t": (278.514, 21.22036),
    "10u": (-0.05135059, 5.547512),
    "10v": (0.189158, 4.765339),
    "msl": (100957.8, 1332.246),
    "lsm": (0.0, 1.0),
    "z": (-1386.496, 58844.67),
    "slt": (0.0, 7.0),
}

# Aurora 1.5's additional surface variables (``aurora.AuroraV1p5``), copied from the
# reference's statistics table (``aurora/normalisation.py``, microsoft-aurora 2.0.1).
# ``scaled_*`` entries describe the log-transformed field (``log(x + 1e-3) - log(1e-3)``), ``*_1h``
# fields are one-hour accumulations (J m-2, m). The 1.5 static fields arrive normalised
# already (location 0, scale 1).
V1P5_SURFACE_STATS: dict[str, tuple[float, float]] = {
    "2d": (273.876923, 20.7733974),
    "tcwv": (18.2695427, 16.429491),
    "tcc": (0.67472446, 0.365822792),
    "100u": (0.02712852507829666, 6.970843315124512),
    "100v": (0.19762367010116577, 6.088253498077393),
    "sp": (96647.375, 9586.69140625),
    "lcc": (0.4616926610469818, 0.3931414783000946),
    "mcc": (0.2986297309398651, 0.3729339838027954),
    "hcc": (0.32651442289352417, 0.4131758511066437),
    "skt": (278.8576354980469, 22.333234786987305),
    "stl1": (279.56781005859375, 21.44609832763672),
    "swvl1": (0.08593245595693588, 0.14150479435920715),
    "ci": (0.11092530190944672, 0.29736775159835815),
    "scaled_sd": (1.3165518045425415, 3.0272440910339355),
    "i10fg": (9.003422737121582, 4.655707359313965),
    "blh": (629.0673217773438, 470.48150634765625),
    "uvb_1h": (69617.6, 106110.3),
    "ssrd_1h": (588904.6, 891503.2),
    "ttr_1h": (-814438.7, 177100.2),
    "scaled_tp_1h": (0.0703631192445755, 0.18630525469779968),
    "scaled_sf_1h": (0.013227290473878384, 0.05945565551519394),
    "insolation": (0.0, 1.0),
}
V1P5_STATIC_STATS: dict[str, tuple[float, float]] = {name: (0.0, 1.0) for name in (
    "anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "slt_0", "slt_1", "slt_2", "slt_3", "slt_4",
    "slt_5", "slt_6", "slt_7", "sdfor", "sdor", "tvh_0", "tvh_18", "tvh_19", "tvh_3", "tvh_4",
    "tvh_5", "tvh_6", "tvl_0", "tvl_1", "tvl_10", "tvl_11", "tvl_13", "tvl_16", "tvl_17", "tvl_2",
    "tvl_7", "tvl_9"
)}
SURFACE_STATS.update(V1P5_SURFACE_STATS)
SURFACE_STATS.update(V1P5_STATIC_STATS)

ATMOS_STATS: dict[str, dict[int, tuple[float, float]]] = {
    "z": {
        50: (199373.0, 5875.553),
        100: (157642.1, 5510.64),
        150: (133141.4, 5823.912),
        200: (115330.0, 5820.169),
        250: (101223.1, 5536.585),
        300: (89414.15, 5091.916),
        400: (69980.38, 4150.851),
        500: (54115.37, 3353.187),
        600: (40648.33, 2695.808),
        700: (28928.82, 2136.436),
        850: (13749.78, 1470.321),
        925: (7015.005, 1228.997),
        1000: (738.1545, 1072.307),
    },
    "u": {
        50: (5.653076, 15.29281),
        100: (10.27951, 13.52611),
        150: (13.54061, 16.04335),
        200: (14.20915, 17.6763),
        250: (13.34584, 17.9671),
        300: (11.80173, 17.11917),
        400: (8.817291, 14.34276),
        500: (6.563273, 11.98419),
        600: (4.814521, 10.33421),
        700: (3.345237, 9.168821),
        850: (1.418379, 8.188043),
        925: (0.6172657, 7.940808),
        1000: (-0.03328723, 6.141778),
    },
    "v": {
        50: (0.004226111, 7.058931),
        100: (0.01411897, 7.47931),
        150: (-0.03697671, 9.57199),
        200: (-0.04507801, 11.88069),
        250: (-0.02980338, 13.38039),
        300: (-0.0229477, 13.34044),
        400: (-0.01771003, 11.22955),
        500: (-0.02387986, 9.181708),
        600: (-0.02716674, 7.803569),
        700: (0.02153583, 6.87104),
        850: (0.142815, 6.264443),
        925: (0.205348, 6.470644),
        1000: (0.1867637, 5.308203),
    },
    "t": {
        50: (212.4864, 10.26284),
        100: (208.4042, 12.52901),
        150: (213.3201, 8.928709),
        200: (218.0615, 7.189547),
        250: (222.771, 8.529282),
        300: (228.8696, 10.71679),
        400: (242.1368, 12.69102),
        500: (252.9492, 13.06447),
        600: (261.1347, 13.42046),
        700: (267.401, 14.76523),
        850: (274.56, 15.5888),
        925: (277.3572, 16.08798),
        1000: (281.013, 17.13983),
    },
    "q": {
        50: (2.67818e-06, 3.571687e-07),
        100: (2.633677e-06, 5.703754e-07),
        150: (5.254625e-06, 3.794077e-06),
        200: (1.940632e-05, 2.267534e-05),
        250: (5.773618e-05, 7.446644e-05),
        300: (0.0001273861, 0.0001684361),
        400: (0.0003855659, 0.0005078644),
        500: (0.0008529599, 0.001079294),
        600: (0.001541429, 0.001769722),
        700: (0.002431637, 0.002549169),
        850: (0.004575618, 0.004112368),
        925: (0.006033134, 0.005071058),
        1000: (0.007030342, 0.005913548),
    },
    "w": {
        50: (-4.83183e-05, 0.02031102),
        100: (-1.158353e-05, 0.03982386),
        150: (2.323354e-05, 0.07233442),
        200: (2.460374e-05, 0.106973),
        250: (3.384949e-05, 0.1431527),
        300: (0.0001310551, 0.179584),
        400: (0.0003637421, 0.2365854),
        500: (0.0004369851, 0.2639899),
        600: (0.0005889935, 0.2768904),
        700: (0.003267191, 0.2871598),
        850: (0.01430376, 0.2900477),
        925: (0.02180887, 0.2518952),
        1000: (0.02735809, 0.1737641),
    },
}


def level_key(level: float) -> float:
    """A pressure level rounded to 1e-3 hPa, the key used to look up per-level statistics."""
    level = round(float(level), 3)
    return int(level) if level % 1 == 0 else level


def level_to_str(level: float) -> str:
    """A pressure level as the reference writes it in statistics keys: rounded to 1e-3 hPa,
    an integer when whole, ``_`` for the decimal point (500 -> ``"500"``, 2.5 -> ``"2_5"``)."""
    return str(level_key(level)).replace(".", "_")


def stats_key(name: str, level: float) -> str:
    """The reference's key of atmospheric variable ``name`` at ``level``: ``"z_500"``."""
    return f"{name}_{level_to_str(level)}"


def has_surface_stats(name: str) -> bool:
    """Whether the built-in table has statistics for surface/static variable ``name``."""
    return name in SURFACE_STATS


def has_atmos_stats(name: str, level: float) -> bool:
    """Whether the built-in table has statistics for atmospheric ``name`` at ``level``."""
    return level_key(level) in ATMOS_STATS.get(name, {})


def surface_stats(name: str, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    """``(location, scale)`` of a surface or static variable, honouring the override."""
    if surf_stats and name in surf_stats:
        loc, scale = surf_stats[name]
        return float(loc), float(scale)
    if name not in SURFACE_STATS:
        raise KeyError(f"no normalisation statistics for surface/static variable {name!r}; pass surf_stats={{{name!r}: (location, scale)}} (aurora-loop stats computes them)")
    return SURFACE_STATS[name]


def atmos_stats(name: str, levels: Sequence[float], overrides: Mapping[str, tuple[float, float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-level ``(locations, scales)``, each of shape ``(len(levels),)`` float64.

    ``overrides`` maps the reference's keys ``"name_level"`` (:func:`stats_key`) to
    ``(location, scale)``; a key present there wins over the built-in table.
    """
    table = ATMOS_STATS.get(name, {})
    pairs, missing = [], []
    for lv in levels:
        key = stats_key(name, lv)
        if overrides and key in overrides:
            pairs.append(overrides[key])
        elif level_key(lv) in table:
            pairs.append(table[level_key(lv)])
        else:
            missing.append(lv)
    if missing:
        if not table:
            raise KeyError(f"no normalisation statistics for atmospheric variable {name!r} (levels {list(missing)} hPa); "
                           "compute them with aurora-loop stats STORE --out stats.json and pass --stats stats.json")
        raise KeyError(f"no statistics for {name!r} at levels {missing} hPa; the standard levels are {STANDARD_LEVELS} "
                       "(compute others with aurora-loop stats STORE --out stats.json and pass --stats stats.json)")
    locs = np.array([float(p[0]) for p in pairs], dtype=np.float64)
    scales = np.array([float(p[1]) for p in pairs], dtype=np.float64)
    return locs, scales


def normalise_surface(x: Array, name: str, surf_stats: Mapping[str, tuple[float, float]] | None = None,
                      inverse: bool = False) -> Array:
    """Normalise (or, with ``inverse``, unnormalise) a surface/static field of any shape."""
    loc, scale = surface_stats(name, surf_stats)
    return x * scale + loc if inverse else (x - loc) / scale


def normalise_atmos(x: Array, name: str, levels: Sequence[float], inverse: bool = False,
                    overrides: Mapping[str, tuple[float, float]] | None = None) -> Array:
    """Normalise (or unnormalise) an atmospheric field of shape ``(..., c, h, w)``, c = levels;
    ``overrides``: per-level statistics by ``"name_level"`` key (see :func:`atmos_stats`)."""
    locs, scales = atmos_stats(name, levels, overrides)
    dtype = x.dtype
    loc = np.asarray(locs, dtype=dtype)[:, None, None] if np.dtype(dtype) != np.float64 else locs[:, None, None]
    scale = np.asarray(scales, dtype=dtype)[:, None, None] if np.dtype(dtype) != np.float64 else scales[:, None, None]
    return x * scale + loc if inverse else (x - loc) / scale


LOG_TRANSFORM_EPS = 1e-3
"""Offset of Aurora 1.5's log transform of ``scaled_*`` fields (m or m of water)."""


def log_transform(x: Array) -> Array:
    """``log(x + eps) - log(eps)``, eps = 1e-3: how Aurora 1.5 sees precipitation, snowfall and
    snow depth (``scaled_*`` variables) before normalising them."""
    import math

    return _xp(x).log(x + LOG_TRANSFORM_EPS) - math.log(LOG_TRANSFORM_EPS)


def log_untransform(x: Array) -> Array:
    """Inverse of :func:`log_transform`: ``eps * (exp(x) - 1)``."""
    return LOG_TRANSFORM_EPS * (_xp(x).exp(x) - 1)


def _xp(x: Array) -> Any:
    """numpy for host arrays, jax.numpy otherwise."""
    if isinstance(x, np.ndarray | np.generic):
        return np
    import jax.numpy as jnp

    return jnp
