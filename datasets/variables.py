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

Aurora 1.5 (``AuroraV1p5``; :data:`AURORA_V1P5_VARS`) adds surface and static variables. Their
WB2-style names follow ERA5's long names (the CDS names), hourly accumulations carry
WB2's accumulation suffix (``_1hr``, as ``total_precipitation_6hr``), and a one-hot category
map of a categorical ERA5 field is the field's name plus ``_<category>``:

- surface inputs: ``low/medium/high_cloud_cover`` (lcc/mcc/hcc, 0..1), ``skin_temperature``
  (skt, K), ``soil_temperature_level_1`` (stl1, K), ``volumetric_soil_water_layer_1`` (swvl1,
  m3 m-3), ``sea_ice_cover`` (ci, 0..1), ``snow_depth`` (scaled_sd, m of water equivalent: the
  physical value; the model log-transforms it), ``toa_incident_solar_radiation_normalized``
  (insolation: top-of-atmosphere insolation over the solar constant, dimensionless, negative
  at night; ``aurora_loop.model.insolation``). Not WB2's ``toa_incident_solar_radiation``,
  which is an hourly accumulation in J m-2;
- surface outputs (predicted, never inputs): ``instantaneous_10m_wind_gust`` (i10fg, m s-1),
  ``boundary_layer_height`` (blh, m), and accumulations over the hour before the valid time:
  ``downward_uv_radiation_at_the_surface_1hr`` (uvb_1h, J m-2),
  ``surface_solar_radiation_downwards_1hr`` (ssrd_1h, J m-2), ``top_net_thermal_radiation_1hr``
  (ttr_1h, J m-2, negative: outgoing), ``total_precipitation_1hr`` (scaled_tp_1h, m) and
  ``snowfall_1hr`` (scaled_sf_1h, m of water equivalent);
- statics: ``lake_depth`` (dl), ``standard_deviation_of_filtered_subgrid_orography`` (sdfor),
  and the one-hot maps ``soil_type_<k>`` (slt_k), ``type_of_high_vegetation_<k>`` (tvh_k),
  ``type_of_low_vegetation_<k>`` (tvl_k) for ERA5's category codes k.

:data:`CF_METADATA` holds units, CF standard names and long names per WB2 name (the sample
writer and ``aurora-loop convert`` use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

SURF, STATIC, ATMOS = "surf", "static", "atmos"
KINDS = (SURF, STATIC, ATMOS)

#: ERA5's category codes that Aurora 1.5 takes one-hot maps of: soil type (``slt``: 0 none /
#: water, 1 coarse .. 7 organic), high vegetation (``tvh``: 0 none, 3 evergreen needleleaf,
#: 4 deciduous needleleaf, 5 deciduous broadleaf, 6 evergreen broadleaf, 18 mixed forest,
#: 19 interrupted forest) and low vegetation (``tvl``: 0 none, 1 crops, 2 short grass, 7 tall
#: grass, 9 tundra, 10 irrigated crops, 11 semidesert, 13 bogs and marshes, 16 evergreen
#: shrubs, 17 deciduous shrubs).
SOIL_TYPES = (0, 1, 2, 3, 4, 5, 6, 7)
HIGH_VEGETATION_TYPES = (0, 18, 19, 3, 4, 5, 6)
LOW_VEGETATION_TYPES = (0, 1, 10, 11, 13, 16, 17, 2, 7, 9)

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
        # Aurora 1.5 surface inputs (2d, tcwv, tcc, 100u, 100v and sp are above).
        "low_cloud_cover": "lcc",  # 0..1
        "medium_cloud_cover": "mcc",  # 0..1
        "high_cloud_cover": "hcc",  # 0..1
        "skin_temperature": "skt",  # K
        "soil_temperature_level_1": "stl1",  # K
        "volumetric_soil_water_layer_1": "swvl1",  # m3 m-3
        "sea_ice_cover": "ci",  # 0..1
        "snow_depth": "scaled_sd",  # m of water equivalent (the model log-transforms it)
        "toa_incident_solar_radiation_normalized": "insolation",  # dimensionless, solar constant = 1
        # Aurora 1.5 output-only surface variables (accumulations over the hour before the valid time).
        "instantaneous_10m_wind_gust": "i10fg",  # m s-1
        "boundary_layer_height": "blh",  # m
        "downward_uv_radiation_at_the_surface_1hr": "uvb_1h",  # J m-2
        "surface_solar_radiation_downwards_1hr": "ssrd_1h",  # J m-2
        "top_net_thermal_radiation_1hr": "ttr_1h",  # J m-2 (negative)
        "total_precipitation_1hr": "scaled_tp_1h",  # m
        "snowfall_1hr": "scaled_sf_1h",  # m of water equivalent
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
        "type_of_high_vegetation": "tvh",  # ERA5 category codes (Aurora 1.5 takes tvh_k below)
        "type_of_low_vegetation": "tvl",
        # Aurora 1.5 statics besides lsm, z and the orography / vegetation ones above.
        "lake_depth": "dl",
        "standard_deviation_of_filtered_subgrid_orography": "sdfor",
        **{f"soil_type_{k}": f"slt_{k}" for k in SOIL_TYPES},  # one-hot (fraction) maps
        **{f"type_of_high_vegetation_{k}": f"tvh_{k}" for k in HIGH_VEGETATION_TYPES},
        **{f"type_of_low_vegetation_{k}": f"tvl_{k}" for k in LOW_VEGETATION_TYPES},
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

#: Aurora 1.5's variables (``AuroraV1p5``), in the reference's channel order. The surface set
#: includes the output-only variables (:data:`V1P5_OUTPUT_ONLY`), which the model predicts
#: but never takes as inputs.
AURORA_V1P5_VARS: dict[str, tuple[str, ...]] = {
    SURF: ("2t", "10u", "10v", "msl", "2d", "tcwv", "tcc", "100u", "100v", "sp", "lcc", "mcc", "hcc", "skt", "stl1", "swvl1", "ci",
           "scaled_sd", "i10fg", "blh", "uvb_1h", "ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h", "insolation"),
    STATIC: ("lsm", "z", "anor", "isor", "cvh", "cl", "dl", "cvl", "slor", *(f"slt_{k}" for k in SOIL_TYPES), "sdfor", "sdor",
             *(f"tvh_{k}" for k in HIGH_VEGETATION_TYPES), *(f"tvl_{k}" for k in LOW_VEGETATION_TYPES)),
    ATMOS: ("z", "u", "v", "t", "q"),
}
V1P5_OUTPUT_ONLY: tuple[str, ...] = ("i10fg", "blh", "uvb_1h", "ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h")

#: CF metadata per WB2 name: (units, standard_name or "", long_name). Units as CF writes
#: them; dimensionless fractions are "1".
CF_METADATA: dict[str, tuple[str, str, str]] = {
    "2m_temperature": ("K", "air_temperature", "2 metre temperature"),
    "10m_u_component_of_wind": ("m s-1", "eastward_wind", "10 metre U wind component"),
    "10m_v_component_of_wind": ("m s-1", "northward_wind", "10 metre V wind component"),
    "mean_sea_level_pressure": ("Pa", "air_pressure_at_mean_sea_level", "mean sea level pressure"),
    "geopotential": ("m2 s-2", "geopotential", "geopotential"),
    "u_component_of_wind": ("m s-1", "eastward_wind", "U component of wind"),
    "v_component_of_wind": ("m s-1", "northward_wind", "V component of wind"),
    "temperature": ("K", "air_temperature", "temperature"),
    "specific_humidity": ("kg kg-1", "specific_humidity", "specific humidity"),
    "vertical_velocity": ("Pa s-1", "lagrangian_tendency_of_air_pressure", "vertical velocity"),
    "total_precipitation_6hr": ("m", "precipitation_amount", "total precipitation over 6 hours"),
    "100m_u_component_of_wind": ("m s-1", "eastward_wind", "100 metre U wind component"),
    "100m_v_component_of_wind": ("m s-1", "northward_wind", "100 metre V wind component"),
    "total_cloud_cover": ("1", "cloud_area_fraction", "total cloud cover"),
    "surface_pressure": ("Pa", "surface_air_pressure", "surface pressure"),
    "2m_dewpoint_temperature": ("K", "dew_point_temperature", "2 metre dewpoint temperature"),
    "total_column_water_vapour": ("kg m-2", "lwe_thickness_of_atmosphere_mass_content_of_water_vapor", "total column water vapour"),
    "sea_surface_temperature": ("K", "sea_surface_temperature", "sea surface temperature"),
    "low_cloud_cover": ("1", "", "low cloud cover"),
    "medium_cloud_cover": ("1", "", "medium cloud cover"),
    "high_cloud_cover": ("1", "", "high cloud cover"),
    "skin_temperature": ("K", "", "skin temperature"),
    "soil_temperature_level_1": ("K", "", "soil temperature level 1"),
    "volumetric_soil_water_layer_1": ("m3 m-3", "", "volumetric soil water layer 1"),
    "sea_ice_cover": ("1", "sea_ice_area_fraction", "sea ice area fraction"),
    "snow_depth": ("m", "lwe_thickness_of_surface_snow_amount", "snow depth (m of water equivalent)"),
    "toa_incident_solar_radiation_normalized": ("1", "", "top-of-atmosphere insolation over the solar constant"),
    "toa_incident_solar_radiation": ("J m-2", "", "TOA incident solar radiation over the previous hour"),
    "instantaneous_10m_wind_gust": ("m s-1", "wind_speed_of_gust", "instantaneous 10 metre wind gust"),
    "boundary_layer_height": ("m", "atmosphere_boundary_layer_thickness", "boundary layer height"),
    "downward_uv_radiation_at_the_surface_1hr": ("J m-2", "", "downward UV radiation at the surface over the previous hour"),
    "surface_solar_radiation_downwards_1hr": ("J m-2", "surface_downwelling_shortwave_flux_in_air", "surface solar radiation downwards over the previous hour"),
    "top_net_thermal_radiation_1hr": ("J m-2", "", "top net thermal radiation over the previous hour"),
    "total_precipitation_1hr": ("m", "precipitation_amount", "total precipitation over the previous hour"),
    "snowfall_1hr": ("m", "lwe_thickness_of_snowfall_amount", "snowfall over the previous hour (m of water equivalent)"),
    "land_sea_mask": ("1", "land_binary_mask", "land-sea mask"),
    "geopotential_at_surface": ("m2 s-2", "surface_geopotential", "geopotential at the surface"),
    "soil_type": ("1", "", "soil type (ERA5 category code)"),
    "type_of_high_vegetation": ("1", "", "type of high vegetation (ERA5 category code)"),
    "type_of_low_vegetation": ("1", "", "type of low vegetation (ERA5 category code)"),
    "standard_deviation_of_orography": ("m", "", "standard deviation of orography"),
    "standard_deviation_of_filtered_subgrid_orography": ("m", "", "standard deviation of filtered subgrid orography"),
    "slope_of_sub_gridscale_orography": ("1", "", "slope of sub-gridscale orography"),
    "angle_of_sub_gridscale_orography": ("radians", "", "angle of sub-gridscale orography"),
    "anisotropy_of_sub_gridscale_orography": ("1", "", "anisotropy of sub-gridscale orography"),
    "lake_cover": ("1", "", "lake cover"),
    "lake_depth": ("m", "", "lake depth"),
    "high_vegetation_cover": ("1", "", "high vegetation cover"),
    "low_vegetation_cover": ("1", "", "low vegetation cover"),
    **{f"soil_type_{k}": ("1", "", f"fraction of soil type {k}") for k in SOIL_TYPES},
    **{f"type_of_high_vegetation_{k}": ("1", "", f"fraction of high vegetation type {k}") for k in HIGH_VEGETATION_TYPES},
    **{f"type_of_low_vegetation_{k}": ("1", "", f"fraction of low vegetation type {k}") for k in LOW_VEGETATION_TYPES},
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
