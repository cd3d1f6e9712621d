"""Variable names: WeatherBench2 (the store's) <-> Aurora (the model's), per kind.

Aurora names its fields by kind: surface ``2t, 10u, 10v, msl`` (b, t, h, w), static
``lsm, z, slt`` (h, w) and atmospheric ``z, u, v, t, q`` (b, t, c, h, w). ``z`` appears twice
(surface geopotential is static, geopotential on pressure levels is atmospheric), so the map
is kept per kind. A user map (WB2 name -> Aurora name) overrides the defaults for every kind;
which store variable serves a requested Aurora name is then decided by the kind asked for and
the variable's dimensions (see :mod:`aurora_loop.datasets.store`).

Beyond Aurora's standard variables the map covers the WB2 ERA5 fields one would add when
extending a pretrained model (ECMWF short names): ``tp`` (``total_precipitation_6hr``, m
per 6 h; a store of another step needs ``variable_map``, e.g. ``total_precipitation_12hr=tp``),
``100u`` / ``100v``, ``tcc``, ``sp``, ``2d``, ``tcwv``, ``sst``, atmospheric ``w``
(``vertical_velocity``) and the orography / vegetation statics. Each Aurora name has one WB2
name (the forecast writer inverts the map).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

SURF, STATIC, ATMOS = "surf", "static", "atmos"
KINDS = (SURF, STATIC, ATMOS)

#: WeatherBench2 name -> Aurora name, per kind.
DEFAULT_MAP: dict[str, dict[str, str]] = {
    SURF: {
        "2m_temperature": "2t",
        "10m_u_component_of_wind": "10u",
        "10m_v_component_of_wind": "10v",
        "mean_sea_level_pressure": "msl",
        # Beyond Aurora's standard set (ECMWF short names; give them normalisation statistics).
        "total_precipitation_6hr": "tp",  # m accumulated over 6 h (WB2's derived ERA5 variable)
        "100m_u_component_of_wind": "100u",
        "100m_v_component_of_wind": "100v",
        "total_cloud_cover": "tcc",  # 0..1
        "surface_pressure": "sp",
        "2m_dewpoint_temperature": "2d",
        "total_column_water_vapour": "tcwv",
        "sea_surface_temperature": "sst",
    },
    STATIC: {
        "land_sea_mask": "lsm",
        "geopotential_at_surface": "z",
        "soil_type": "slt",
        "standard_deviation_of_orography": "sdor",
        "slope_of_sub_gridscale_orography": "slor",
        "angle_of_sub_gridscale_orography": "anor",
        "anisotropy_of_sub_gridscale_orography": "isor",
        "lake_cover": "cl",
        "high_vegetation_cover": "cvh",
        "low_vegetation_cover": "cvl",
    },
    ATMOS: {
        "geopotential": "z",
        "u_component_of_wind": "u",
        "v_component_of_wind": "v",
        "temperature": "t",
        "specific_humidity": "q",
        "vertical_velocity": "w",
    },
}

#: Aurora's full variable sets, in the reference's channel order.
AURORA_VARS: dict[str, tuple[str, ...]] = {
    SURF: ("2t", "10u", "10v", "msl"),
    STATIC: ("lsm", "z", "slt"),
    ATMOS: ("z", "u", "v", "t", "q"),
}


@dataclasses.dataclass(frozen=True)
class VariableSelection:
    """Which Aurora variables to load, by kind (``()`` = none of that kind).

    Attributes:
      surf: Aurora surface names, e.g. ``("2t", "msl")``.
      static: Aurora static names, e.g. ``("lsm", "z")``.
      atmos: Aurora atmospheric names, e.g. ``("z", "t")``.
      levels: pressure levels in hPa, in the order the model sees them (``()`` = every level
        in the store, ascending order of the store's level coordinate).
      variable_map: WB2 name -> Aurora name overrides, applied to every kind.
    """

    surf: tuple[str, ...] = AURORA_VARS[SURF]
    static: tuple[str, ...] = AURORA_VARS[STATIC]
    atmos: tuple[str, ...] = AURORA_VARS[ATMOS]
    levels: tuple[int, ...] = ()
    variable_map: Mapping[str, str] | None = None

    def names(self, kind: str) -> tuple[str, ...]:
        return {SURF: self.surf, STATIC: self.static, ATMOS: self.atmos}[kind]

    def candidates(self, kind: str, aurora_name: str) -> list[str]:
        """Store names that may hold ``aurora_name`` of ``kind``, user overrides first.

        The Aurora name itself comes last, so a store already written with Aurora's names
        (``z``, ``t``) also works.
        """
        found = [wb2 for wb2, a in (self.variable_map or {}).items() if a == aurora_name]
        found += [wb2 for wb2, a in DEFAULT_MAP[kind].items() if a == aurora_name and wb2 not in found]
        if aurora_name not in found:
            found.append(aurora_name)
        return found


def parse_name_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"2t,msl"`` -> ``("2t", "msl")``; an empty string means none; None passes through as ()."""
    if text is None:
        return ()
    if isinstance(text, str):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return tuple(text)
