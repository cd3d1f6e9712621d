"""Position and scale encodings of the patches of a latitude/longitude grid.

Every patch (``p x p`` grid points) is described by the centre of its latitudes and of its
longitudes (degrees) and by the square root of its area on a sphere of radius 6371 km
(km; like the reference we use ``R^2 * pi * |d sin(lat)| * d lon`` for the area, which is pi
times the spherical area). These scalars are Fourier-encoded (:mod:`aurora_loop.model.fourier`).

The reference evaluates them in float32 with a fixed order of operations, and the scale
encoding reaches wavelengths of ~1e-4 km: one float32 ulp of a patch's size changes its
finest components completely. So these helpers reproduce the reference's float32 arithmetic
operation by operation (sequential window sums, float32 products, correctly rounded sines),
whatever the model's compute dtype. The reference's float32 ``torch.sin`` is not correctly
rounded and its one-ulp errors depend on the CPU, so to compare with a reference run exactly
feed it the areas that run used (:class:`KnownGrid`'s ``root_area``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_loop.model.fourier import POSITION, SCALE, fourier_expansion

Array = Any

_DEG2RAD32 = np.float32(np.pi / 180)
_AREA_FACTOR32 = np.float32(6371**2 * np.pi)


def patch_centres(lat: Array, lon: Array, patch_size: int) -> tuple[Array, Array]:
    """Mean latitude (h/p,) and mean longitude (w/p,) of every patch, float32 degrees.

    Averages as a ``p x p`` average pool over the lat/lon mesh does: a running float32 sum
    over rows then columns of the window, divided by ``p * p``.
    """
    p = patch_size
    lat = jnp.asarray(lat).astype(jnp.float32).reshape(-1, p)
    lon = jnp.asarray(lon).astype(jnp.float32).reshape(-1, p)
    lat_sum = jnp.zeros(lat.shape[:1], jnp.float32)
    lon_sum = jnp.zeros(lon.shape[:1], jnp.float32)
    for i in range(p):
        for j in range(p):
            lat_sum = lat_sum + lat[:, i]
            lon_sum = lon_sum + lon[:, j]
    count = jnp.float32(p * p)
    return lat_sum / count, lon_sum / count


def root_area_host(lat: np.ndarray, lon: np.ndarray, patch_size: int) -> np.ndarray:
    """Square root of every patch's area (h/p, w/p), km, float32 (host computation)."""
    f32 = np.float32
    lat = np.asarray(lat, f32).reshape(-1, patch_size)
    lon = np.asarray(lon, f32).reshape(-1, patch_size)

    def sin_deg(a: np.ndarray) -> np.ndarray:
        return np.sin((a * _DEG2RAD32).astype(f32).astype(np.float64)).astype(f32)

    dsin = (sin_deg(lat.max(axis=1)) - sin_deg(lat.min(axis=1))).astype(f32)
    dlon = ((lon.max(axis=1) * _DEG2RAD32).astype(f32) - (lon.min(axis=1) * _DEG2RAD32).astype(f32)).astype(f32)
    area = ((_AREA_FACTOR32 * dsin).astype(f32)[:, None] * dlon[None, :]).astype(f32)
    if not np.all(area > 0):
        raise ValueError("patch areas must be positive: latitudes must decrease and longitudes increase")
    return np.sqrt(area).astype(f32)


class KnownGrid:
    """A grid's coordinates known on the host before tracing (float32 degrees, lat (H,),
    lon (W,), as the model sees them: cropped to the patch size), and optionally the square
    roots of its patch areas.

    With one, the patch areas are computed on the host at trace time (:func:`root_area_host`,
    bit for bit what the host callback computes) and enter the program as constants: no
    host round trip per forward pass, and a compiled step without host callbacks can be kept
    in JAX's persistent compilation cache. A batch on another grid of the same shape gets
    NaN areas (a loud failure, never a silent one); another shape uses the host callback.
    Hashable by value, so modules holding one stay comparable.

    ``root_area``: the square roots of the patch areas to use instead of computing them,
    float32 km, (H/p * W/p,) row-major or (H/p, W/p); e.g. those the PyTorch reference
    computed, to compare with it exactly. The reference takes them from float32
    ``torch.sin``, whose one-ulp errors depend on the CPU, and the scale encoding turns one
    ulp of an area into a different forecast. Given areas are never silently dropped: a
    batch whose grid has another shape is an error.
    """

    def __init__(self, lat: Any, lon: Any, root_area: Any = None) -> None:
        self.lat = np.asarray(lat, np.float32).copy()
        self.lon = np.asarray(lon, np.float32).copy()
        self.given_root_area = None
        if root_area is not None:
            given = np.asarray(root_area)
            as32 = given.astype(np.float32)
            if given.ndim not in (1, 2) or not np.array_equal(as32, given):
                raise ValueError(f"root_area must be float32 values, (h/p * w/p,) or (h/p, w/p); got {given.dtype} {given.shape}")
            if not np.all(np.isfinite(as32) & (as32 > 0)):
                raise ValueError("root_area must be positive and finite")
            self.given_root_area = as32.copy()
        self._key = (self.lat.tobytes(), self.lon.tobytes(), None if self.given_root_area is None
                     else (self.given_root_area.shape, self.given_root_area.tobytes()))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KnownGrid) and self._key == other._key

    def fits(self, lat: Array, lon: Array) -> bool:
        return np.shape(lat) == self.lat.shape and np.shape(lon) == self.lon.shape

    def root_area_values(self, patch_size: int) -> np.ndarray:
        """This grid's (h/p, w/p) float32 km: the given areas, else :func:`root_area_host`."""
        h, w = self.lat.shape[0] // patch_size, self.lon.shape[0] // patch_size
        given = self.given_root_area
        if given is None:
            return root_area_host(self.lat, self.lon, patch_size)
        if given.shape not in ((h * w,), (h, w)):
            raise ValueError(f"root_area has shape {given.shape}; a {self.lat.shape[0]}x{self.lon.shape[0]} grid "
                             f"in patches of {patch_size} needs ({h * w},) or ({h}, {w})")
        return given.reshape(h, w)

    def root_area(self, lat: Array, lon: Array, patch_size: int) -> Array:
        """(h/p, w/p) float32 km; NaN unless ``lat``/``lon`` (traced) are this grid."""
        area = jnp.asarray(self.root_area_values(patch_size))
        same = jnp.all(jnp.asarray(lat).astype(jnp.float32) == self.lat) & jnp.all(jnp.asarray(lon).astype(jnp.float32) == self.lon)
        return jnp.where(same, area, jnp.float32(jnp.nan))


def patch_root_area(lat: Array, lon: Array, patch_size: int, known: KnownGrid | None = None) -> Array:
    """:func:`root_area_host` usable under ``jit``: a constant for a ``known`` grid (its given
    areas if it has some), else a host callback (no gradient flows either way)."""
    if known is not None and known.fits(lat, lon):
        return known.root_area(lat, lon, patch_size)
    if known is not None and known.given_root_area is not None:
        raise ValueError(f"the given patch areas are for a {known.lat.shape[0]}x{known.lon.shape[0]} grid, "
                         f"the batch's (cropped) grid is {np.shape(lat)[0]}x{np.shape(lon)[0]}")
    h, w = np.shape(lat)[0] // patch_size, np.shape(lon)[0] // patch_size
    lat = jax.lax.stop_gradient(jnp.asarray(lat).astype(jnp.float32))
    lon = jax.lax.stop_gradient(jnp.asarray(lon).astype(jnp.float32))
    return jax.pure_callback(
        lambda a, b: root_area_host(np.asarray(a), np.asarray(b), patch_size),
        jax.ShapeDtypeStruct((h, w), jnp.float32),
        lat,
        lon,
        vmap_method="sequential",
    )


def position_scale_encoding(lat: Array, lon: Array, patch_size: int, d: int,
                            known_grid: KnownGrid | None = None) -> tuple[Array, Array]:
    """Position and scale encodings, each (L, d) float32 with L = (h/p) * (w/p) row-major.

    The position encoding is ``[encode(lat centre, d/2), encode(lon centre, d/2)]``.
    ``known_grid``: see :class:`KnownGrid`.
    """
    if d % 4:
        raise ValueError(f"the encoding width must be a multiple of 4, got {d}")
    lat_c, lon_c = patch_centres(lat, lon, patch_size)
    rows, cols = lat_c.shape[0], lon_c.shape[0]
    enc_lat = fourier_expansion(lat_c, d // 2, POSITION)  # (rows, d/2)
    enc_lon = fourier_expansion(lon_c, d // 2, POSITION)  # (cols, d/2)
    pos = jnp.concatenate(
        [
            jnp.broadcast_to(enc_lat[:, None, :], (rows, cols, d // 2)),
            jnp.broadcast_to(enc_lon[None, :, :], (rows, cols, d // 2)),
        ],
        axis=-1,
    ).reshape(rows * cols, d)
    scale = fourier_expansion(patch_root_area(lat, lon, patch_size, known_grid).reshape(-1), d, SCALE)
    return pos, scale
