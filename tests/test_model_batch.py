"""Batch conventions, normalisation, Fourier encodings and window masks of the Aurora port."""

from __future__ import annotations

import datetime as dt

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model import AuroraConfig, Batch, Metadata, fourier, posenc, windows
from aurora_loop.model.normalisation import atmos_stats


def _batch(h: int = 33, w: int = 64) -> Batch:
    rng = np.random.default_rng(0)
    return Batch(
        surf_vars={"2t": (280 + 10 * rng.standard_normal((1, 2, h, w))).astype(np.float32)},
        static_vars={"z": rng.standard_normal((h, w)).astype(np.float32)},
        atmos_vars={"t": (250 + 10 * rng.standard_normal((1, 2, 2, h, w))).astype(np.float32)},
        metadata=Metadata(lat=np.linspace(90, -90, h), lon=np.linspace(0, 360, w, endpoint=False),
                          time=[dt.datetime(2020, 1, 1, 6)], atmos_levels=(500, 850)),
    )


def test_metadata_checks_coordinates() -> None:
    lon = np.arange(8) * 45.0
    with pytest.raises(ValueError, match="decreasing"):
        Metadata(lat=np.linspace(-90, 90, 5), lon=lon, time=np.zeros(1))
    with pytest.raises(ValueError, match=r"\[-90, 90\]"):
        Metadata(lat=np.array([91.0, 0.0]), lon=lon, time=np.zeros(1))
    with pytest.raises(ValueError, match=r"\[0, 360\)"):
        Metadata(lat=np.array([10.0, 0.0]), lon=np.array([0.0, 360.0]), time=np.zeros(1))
    with pytest.raises(ValueError, match="increasing"):
        Metadata(lat=np.array([10.0, 0.0]), lon=lon[::-1].copy(), time=np.zeros(1))
    meta = Metadata(lat=np.array([10.0, 0.0]), lon=lon, time=[dt.datetime(1970, 1, 2)])
    np.testing.assert_array_equal(meta.time, [24.0])
    # Pytree round trips (placeholders, tracers) are not checked.
    jax.tree_util.tree_map(lambda x: x, meta)
    jax.jit(lambda m: m)(meta)


def test_crop_and_normalise() -> None:
    batch = _batch(33)
    cropped = batch.crop(4)
    assert cropped.spatial_shape == (32, 64) and cropped.static_vars["z"].shape == (32, 64)
    assert cropped.atmos_vars["t"].shape == (1, 2, 2, 32, 64)
    assert _batch(32).crop(4).spatial_shape == (32, 64)
    with pytest.raises(ValueError, match="at most 1"):
        _batch(34).crop(4)
    norm = batch.normalise()
    locs, scales = atmos_stats("t", (500, 850))
    np.testing.assert_allclose(np.asarray(norm.atmos_vars["t"])[0, 0, 1], (batch.atmos_vars["t"][0, 0, 1] - locs[1]) / scales[1], atol=1e-5)
    back = norm.unnormalise()
    np.testing.assert_allclose(np.asarray(back.surf_vars["2t"]), batch.surf_vars["2t"], rtol=1e-6)
    override = batch.normalise({"2t": (280.0, 10.0)})
    np.testing.assert_allclose(np.asarray(override.surf_vars["2t"]), (batch.surf_vars["2t"] - 280) / 10, atol=1e-5)


def test_config_accepts_reference_kwargs() -> None:
    cfg = AuroraConfig(embed_dim=256, timestep=dt.timedelta(hours=12), bf16_mode=True, use_fp16_safe_attention=True)
    assert cfg.timestep_hours == 12 and cfg.autocast and hash(cfg) == hash(AuroraConfig.from_json(cfg.to_json()))
    assert AuroraConfig(stochastic=True).stochastic  # Aurora 1.5's ensemble option is implemented now
    with pytest.raises(ValueError, match="level_condition"):  # the air-pollution variant's is not
        AuroraConfig(level_condition=(500, 850))
    with pytest.raises(TypeError, match="bogus"):
        AuroraConfig(bogus=1)


@pytest.mark.parametrize("bounds, values", [
    (fourier.ABSOLUTE_TIME, [438300.0, 441954.0, 446892.5]),  # hours since 1970
    (fourier.SCALE, [1234.5678, 2001.25, 15.5]),  # km
    (fourier.POSITION, [-89.1, 0.0, 359.9]),  # degrees
])
def test_float32_fourier_phases_are_exact(bounds, values) -> None:
    """Large phases (up to ~1e8 rad) are reduced exactly: float32 agrees with float64."""
    x = np.asarray(values, np.float32)
    ours = np.asarray(jax.jit(lambda v: fourier.fourier_expansion(v, 64, bounds))(jnp.asarray(x)))
    exact = fourier.static_expansion(x.astype(np.float64), 64, bounds)
    np.testing.assert_allclose(ours, exact, atol=2e-5)
    naive = np.concatenate([np.sin(x[:, None] * np.float32(2 * np.pi) / fourier.wavelengths(bounds, 64).astype(np.float32))] * 1, -1)
    if bounds is not fourier.POSITION:  # the plain float32 product would be far off
        assert np.abs(naive - exact[:, :32]).max() > 0.1


def test_patch_encodings() -> None:
    lat = np.linspace(90, -90, 32)
    lon = np.linspace(0, 360, 64, endpoint=False)
    lat_c, lon_c = posenc.patch_centres(lat, lon, 4)
    np.testing.assert_allclose(np.asarray(lat_c), lat.reshape(-1, 4).mean(1), rtol=1e-6)
    area = posenc.root_area_host(lat, lon, 4).astype(np.float64) ** 2  # km^2, (8, 16)
    # A patch spans its extreme grid points: 3 latitude and 3 longitude spacings. The
    # reference's formula carries an extra factor pi (R^2 pi dsin dlon); we keep it.
    rows = lat.reshape(-1, 4)
    dsin = np.abs(np.sin(np.deg2rad(rows[:, 0])) - np.sin(np.deg2rad(rows[:, -1])))
    np.testing.assert_allclose(area, (6371**2 * np.pi * dsin * np.deg2rad(3 * 360 / 64))[:, None] * np.ones(16), rtol=1e-5)
    pos, scale = jax.jit(lambda a, b: posenc.position_scale_encoding(a, b, 4, 32))(lat, lon)
    assert pos.shape == scale.shape == (8 * 16, 32)


def test_a_known_grid_gives_the_host_callbacks_areas_as_constants() -> None:
    """With the grid known before tracing, the encodings are bitwise those of the host
    callback, the compiled program has no host callback, and another grid of the same shape
    gets NaN (never a silently wrong encoding)."""
    lat = np.linspace(90, -90, 32)
    lon = np.linspace(0, 360, 64, endpoint=False)
    known = posenc.KnownGrid(lat, lon)
    assert known == posenc.KnownGrid(lat.copy(), lon.copy()) and hash(known) == hash(posenc.KnownGrid(lat, lon))

    def encodings(grid):
        return jax.jit(lambda a, b: posenc.position_scale_encoding(a, b, 4, 32, grid))

    via_callback = encodings(None)(lat, lon)
    via_constant = encodings(known)(lat, lon)
    for a, b in zip(via_callback, via_constant):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "callback" in encodings(None).lower(lat, lon).as_text()
    assert "callback" not in encodings(known).lower(lat, lon).as_text()
    _, scale = encodings(known)(lat - 0.5, lon)
    assert np.all(np.isnan(np.asarray(scale)))


def test_a_known_grid_can_carry_given_patch_areas() -> None:
    """``root_area`` replaces the computed areas (the reference's, to compare with it), is
    part of the grid's identity, keeps the NaN guard, and is never silently dropped."""
    lat = np.linspace(90, -90, 32)
    lon = np.linspace(0, 360, 64, endpoint=False)
    computed = posenc.root_area_host(lat, lon, 4)
    given = computed.copy()
    given[2, 5] = np.nextafter(given[2, 5], np.float32(np.inf))  # one ulp, as another CPU's torch.sin
    known = posenc.KnownGrid(lat, lon, root_area=given.reshape(-1))
    assert known == posenc.KnownGrid(lat, lon, root_area=given.reshape(-1).copy())
    assert hash(known) == hash(posenc.KnownGrid(lat, lon, root_area=given.reshape(-1).copy()))
    assert known != posenc.KnownGrid(lat, lon) and known != posenc.KnownGrid(lat, lon, root_area=computed.reshape(-1))
    assert known != posenc.KnownGrid(lat, lon, root_area=given)  # another layout, another key

    def scale(grid):
        return np.asarray(jax.jit(lambda a, b: posenc.position_scale_encoding(a, b, 4, 32, grid)[1])(lat, lon))

    expected = np.asarray(fourier.fourier_expansion(jnp.asarray(given.reshape(-1)), 32, fourier.SCALE))
    np.testing.assert_array_equal(scale(known), expected)
    np.testing.assert_array_equal(scale(posenc.KnownGrid(lat, lon, root_area=given)), expected)
    changed = np.any(scale(known) != scale(posenc.KnownGrid(lat, lon)), axis=-1)
    assert changed.tolist() == (np.arange(8 * 16) == 2 * 16 + 5).tolist()
    assert np.all(np.isnan(np.asarray(jax.jit(
        lambda a, b: posenc.position_scale_encoding(a, b, 4, 32, known)[1])(lat - 0.5, lon))))
    with pytest.raises(ValueError, match="given patch areas"):
        posenc.position_scale_encoding(lat[:28], lon, 4, 32, known)
    with pytest.raises(ValueError, match="needs"):
        posenc.position_scale_encoding(lat, lon, 4, 32, posenc.KnownGrid(lat, lon, root_area=given.T))
    with pytest.raises(ValueError, match="float32"):
        posenc.KnownGrid(lat, lon, root_area=given.astype(np.float64) * (1 + 1e-12))
    with pytest.raises(ValueError, match="positive"):
        posenc.KnownGrid(lat, lon, root_area=-given)


def test_shifted_window_mask() -> None:
    mask = windows.shifted_window_mask((2, 8, 16), (2, 4, 8), (0, 2, 4))
    assert mask.shape == (4, 64, 64)
    assert np.all(np.diagonal(mask, axis1=1, axis2=2) == 0) and np.all(mask == mask.transpose(0, 2, 1))
    # Without the seam merge the last window column would split into more groups.
    groups_last = len({tuple(row) for row in (mask[-1] == 0)})
    groups_first = len({tuple(row) for row in (mask[0] == 0)})
    assert groups_first == 1 and groups_last == 2
    grid = jnp.arange(2 * 6 * 10).reshape(1, 2, 6, 10, 1).astype(jnp.float32)
    padded = windows.pad_3d(grid, windows.window_padding((2, 6, 10), (2, 4, 4)))
    assert padded.shape == (1, 2, 8, 12, 1)
    parts = windows.window_partition(padded, (2, 4, 4))
    back = windows.crop_3d(windows.window_reverse(parts, (2, 4, 4), 2, 8, 12), (0, 2, 2))
    np.testing.assert_array_equal(back, grid)
