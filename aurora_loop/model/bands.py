"""Latitude bands of whole windows: one example's token grid split over the devices of a mesh axis.

With ``--space_parallel N`` the rows of every token grid (B, C, H, W, D) of the backbone are
laid out in N equal bands, one per device of the ``space`` mesh axis, each made of whole
Swin windows, so a block's attention, MLP and norms never need another device's tokens.
A stage's banded layout (:class:`Bands`) is the reference's window-padded grid (its padding
split over the top and the bottom, as :func:`aurora_loop.model.windows.pad_3d` pads) with
dummy window rows added at the bottom until the window rows divide by N. Rows that are
not real rows (padding, dummy windows) hold zeros where a block reads them and are
dropped at the end, so the computation is the reference's.

What moves between devices is rows: the shifted windows' roll and the roll back (a few
rows to the neighbouring band, and around from the last real rows to the first), and the
re-banding between stages (2 x 2 patch merging and splitting halve and double the rows,
and each stage pads its grid to its own window rows). All of them are
:func:`permute_rows` of a static table: each device gathers its new band from its own rows
and from its two ring neighbours' (``lax.ppermute``: neighbour exchanges only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


@dataclasses.dataclass(frozen=True)
class Bands:
    """The banded layout of one grid's rows over ``devices`` devices.

    ``rows``: the grid's real rows H; ``window_rows``: the Swin window's rows at this stage
    (after ``adjust_windows``); ``devices``: N. Global banded row ``g`` holds real row
    ``g - top`` when ``0 <= g - top < rows``, else padding (zeros).
    """

    rows: int
    window_rows: int
    devices: int

    @property
    def top(self) -> int:
        """Padding rows above real row 0 (the smaller half of the window padding)."""
        return ((-self.rows) % self.window_rows) // 2

    @property
    def window_count(self) -> int:
        """Window rows of the reference's padded grid."""
        return (self.rows + (-self.rows) % self.window_rows) // self.window_rows

    @property
    def per_device(self) -> int:
        """Rows per device R: whole windows, the window rows rounded up to a multiple of N."""
        return -(-self.window_count // self.devices) * self.window_rows

    @property
    def total(self) -> int:
        return self.per_device * self.devices

    def real_rows(self) -> np.ndarray:
        """(total,) the real row of every banded row, -1 for padding."""
        g = np.arange(self.total) - self.top
        return np.where((g >= 0) & (g < self.rows), g, -1)

    def real_mask(self) -> np.ndarray:
        """(total,) whether each banded row is a real row."""
        return self.real_rows() >= 0

    def row_of(self, real: np.ndarray) -> np.ndarray:
        """Banded rows of the real rows ``real`` (-1 stays -1)."""
        real = np.asarray(real)
        return np.where(real >= 0, real + self.top, -1)


def roll_source(bands: Bands, shift: int) -> np.ndarray:
    """(N, R) source rows of ``jnp.roll(grid, shift, axis=rows)`` over the real rows, in the
    banded layout (padding rows stay padding)."""
    real = bands.real_rows()
    src = np.where(real >= 0, (real - shift) % max(bands.rows, 1), -1)
    return bands.row_of(src).reshape(bands.devices, bands.per_device)


def merge_source(fine: Bands, coarse: Bands) -> np.ndarray:
    """(N, 2 R') source rows in ``fine``'s layout of the rows that 2 x 2 patch merging turns
    into ``coarse``'s banded rows: coarse row j of a device comes from the pair (2j, 2j+1)
    of the result (padding where the coarse row is padding, or the fine grid has no such
    row: the odd last row is merged with a zero row, as :class:`PatchMerging` pads)."""
    coarse_real = coarse.real_rows()
    pairs = np.stack([2 * coarse_real, 2 * coarse_real + 1], axis=1)
    pairs = np.where((coarse_real[:, None] >= 0) & (pairs < fine.rows), pairs, -1)
    return fine.row_of(pairs.reshape(-1)).reshape(coarse.devices, 2 * coarse.per_device)


def split_source(coarse: Bands, fine: Bands) -> np.ndarray:
    """(N, R) source rows of ``fine``'s banded rows in the result of patch splitting
    ``coarse``'s bands (each coarse banded row j of a device becomes rows 2j and 2j+1 of a
    band of 2 R' rows): fine real row r comes from coarse real row r // 2, half r % 2."""
    fine_real = fine.real_rows()
    coarse_row = coarse.row_of(np.where(fine_real >= 0, fine_real // 2, -1))
    device, local = np.divmod(np.maximum(coarse_row, 0), coarse.per_device)
    src = device * 2 * coarse.per_device + 2 * local + np.where(fine_real >= 0, fine_real % 2, 0)
    return np.where(coarse_row >= 0, src, -1).reshape(fine.devices, fine.per_device)


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """The static plan of one :func:`permute_rows`: which rows each device sends to its ring
    neighbours and where each output row is in [own rows, from prev, from next, a zero row]."""

    send_next: np.ndarray  # (N, hp) local rows each device sends to the next device
    send_prev: np.ndarray  # (N, hn) local rows each device sends to the previous device
    gather: np.ndarray  # (N, R_out) index into the buffer



def plan_exchange(src: np.ndarray, rows_in: int) -> _Exchange:
    """The exchange that makes every device's new band ``src[k]`` (global rows of a layout
    with ``rows_in`` rows per device; -1: a zero row) from its own rows and its ring
    neighbours'. Raises ValueError when a row would come from further away."""
    n = src.shape[0]
    from_prev: list[list[int]] = [[] for _ in range(n)]
    from_next: list[list[int]] = [[] for _ in range(n)]
    for k in range(n):
        for g in src[k]:
            if g < 0:
                continue
            d, row = divmod(int(g), rows_in)
            if d == k:
                continue
            if d == (k - 1) % n:
                if row not in from_prev[k]:
                    from_prev[k].append(row)
            elif d == (k + 1) % n:
                if row not in from_next[k]:
                    from_next[k].append(row)
            else:
                raise ValueError(f"band {k} needs a row of band {d}, which is not a neighbour")
    hp = max(1, max(map(len, from_prev)))
    hn = max(1, max(map(len, from_next)))
    send_next = np.zeros((n, hp), np.int32)
    send_prev = np.zeros((n, hn), np.int32)
    for k in range(n):
        send_next[(k - 1) % n, : len(from_prev[k])] = from_prev[k]
        send_prev[(k + 1) % n, : len(from_next[k])] = from_next[k]
    zero = rows_in + hp + hn
    gather = np.full(src.shape, zero, np.int32)
    for k in range(n):
        for j, g in enumerate(src[k]):
            if g < 0:
                continue
            d, row = divmod(int(g), rows_in)
            if d == k:
                gather[k, j] = row
            elif d == (k - 1) % n and row in from_prev[k]:
                gather[k, j] = rows_in + from_prev[k].index(row)
            else:
                gather[k, j] = rows_in + hp + from_next[k].index(row)
    return _Exchange(send_next, send_prev, gather)


def inverse_source(src: np.ndarray, rows_in: int) -> np.ndarray:
    """The source table (N, rows_in) of the inverse permutation of ``src`` (N, R_out): for
    every input row, the output row that took it (-1: none). ``src`` must use every input
    row at most once (rolls, merges and splits do)."""
    n, rows_out = src.shape
    inverse = np.full((n, rows_in), -1, np.int64)
    for k in range(n):
        for j, g in enumerate(src[k]):
            if g >= 0:
                d, row = divmod(int(g), rows_in)
                if inverse[d, row] >= 0:
                    raise ValueError(f"input row {g} is used twice")
                inverse[d, row] = k * rows_out + j
    return inverse


def permute_rows(x: Array, src: np.ndarray, rows_in: int, axis: int, axis_name: str | None) -> Array:
    """Inside ``shard_map`` over ``axis_name`` (N devices): this device's band of rows of
    ``x`` (axis ``axis``) rebuilt as ``src`` says (:func:`plan_exchange`); rows from the two
    ring neighbours arrive through ``lax.ppermute``. ``axis_name`` None (one device): a
    gather of ``x``'s rows.

    Every input row goes to at most one output row, so the gradient is the inverse
    permutation of the cotangent (no scatter into a zero buffer of the input's size, which
    XLA:CPU allocated early and kept alive for the whole step)."""
    inverse = inverse_source(src, rows_in)
    rows_out = src.shape[1]

    @jax.custom_vjp
    def permute(x: Array) -> Array:
        return _gather_rows(x, src, rows_in, axis, axis_name)

    def forward(x: Array) -> tuple[Array, None]:
        return permute(x), None

    def backward(_: None, ct: Array) -> tuple[Array]:
        return (_gather_rows(ct, inverse, rows_out, axis, axis_name),)

    permute.defvjp(forward, backward)
    return permute(x)


def _gather_rows(x: Array, src: np.ndarray, rows_in: int, axis: int, axis_name: str | None) -> Array:
    """:func:`permute_rows`'s forward pass."""
    if axis_name is None:
        assert src.shape[0] == 1
        safe = np.where(src[0] >= 0, src[0], 0)
        out = jnp.take(x, jnp.asarray(safe), axis=axis)
        keep = (src[0] >= 0).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
        return jnp.where(keep, out, jnp.zeros((), x.dtype)) if not keep.all() else out
    plan = plan_exchange(src, rows_in)
    n = src.shape[0]
    k = jax.lax.axis_index(axis_name)
    to_next = jnp.take(x, jnp.asarray(plan.send_next)[k], axis=axis)
    to_prev = jnp.take(x, jnp.asarray(plan.send_prev)[k], axis=axis)
    from_prev = jax.lax.ppermute(to_next, axis_name, [(d, (d + 1) % n) for d in range(n)])
    from_next = jax.lax.ppermute(to_prev, axis_name, [(d, (d - 1) % n) for d in range(n)])
    zero_shape = list(x.shape)
    zero_shape[axis] = 1
    buffer = jnp.concatenate([x, from_prev, from_next, jnp.zeros(zero_shape, x.dtype)], axis=axis)
    return jnp.take(buffer, jnp.asarray(plan.gather)[k], axis=axis)


def local_rows(table: np.ndarray, axis_name: str | None) -> Array:
    """This device's row of a static (N, ...) table (``lax.axis_index`` inside ``shard_map``)."""
    if axis_name is None:
        return jnp.asarray(table[0])
    return jnp.asarray(table)[jax.lax.axis_index(axis_name)]


@dataclasses.dataclass(frozen=True)
class BandContext:
    """What a Swin block needs to run on one device's band of a grid (inside ``shard_map``
    over ``axis``; ``None``: one device, the band is the whole banded grid).

    ``res``, ``ws``, ``ss``: the grid (C, H, W) and the block's window and shift, for the
    shifted windows' mask (:meth:`for_windows`).
    """

    bands: Bands
    axis: str | None
    res: tuple[int, int, int] | None = None
    ws: tuple[int, int, int] | None = None
    ss: tuple[int, int, int] | None = None

    def for_windows(self, res: tuple[int, int, int], ws: tuple[int, int, int], ss: tuple[int, int, int]) -> BandContext:
        if ws[1] != self.bands.window_rows or res[1] != self.bands.rows:
            raise ValueError(f"bands of {self.bands.rows} rows in windows of {self.bands.window_rows} do not fit a "
                             f"grid of {res[1]} rows in windows of {ws[1]}")
        return dataclasses.replace(self, res=tuple(res), ws=tuple(ws), ss=tuple(ss))

    def roll(self, x: Array, shift: int) -> Array:
        """``jnp.roll(grid, shift, axis=2)`` over the real rows, on this band (B, C, R, W, D)."""
        if shift % max(self.bands.rows, 1) == 0:
            return x
        return permute_rows(x, roll_source(self.bands, shift), self.bands.per_device, 2, self.axis)

    def zero_padding(self, x: Array) -> Array:
        """This band (B, C, R, W, D) with its padding rows zero (the reference's padding
        tokens; a product, whose gradient is the same product, where ``jnp.where``'s would
        need a zero buffer)."""
        keep = local_rows(self.bands.real_mask().reshape(self.bands.devices, -1).astype(np.float32), self.axis)
        return x * keep.astype(x.dtype)[None, None, :, None, None]

    def window_mask(self, like: Array) -> Array:
        """The shifted windows' additive mask (nW, N, N) of this band's windows (padding and
        dummy windows: one group of their own), made where the block runs."""
        from aurora_loop.model.windows import PADDING_GROUP, group_mask, shifted_window_groups

        groups = shifted_window_groups(self.res, self.ws, self.ss)  # (C', H', W', N)
        rows = self.bands.total // self.bands.window_rows
        groups = np.pad(groups, ((0, 0), (0, rows - groups.shape[1]), (0, 0), (0, 0)), constant_values=PADDING_GROUP)
        per_device = groups.reshape(groups.shape[0], self.bands.devices, -1, *groups.shape[2:]).swapaxes(0, 1)
        local = local_rows(per_device, self.axis)  # (C', H'/N, W', N)
        from aurora_loop.model.swin import after

        # Tied to the block's input, like the one-device mask (swin.block_mask): made where the block runs.
        return after(group_mask(local.reshape(-1, local.shape[-1])), like)


@dataclasses.dataclass(frozen=True)
class SpacePlan:
    """How each example is split over devices: ``mesh`` has a ``data`` axis (examples) and a
    ``space`` axis whose devices hold the bands of every token grid's rows.

    The model applies its per-band work with :meth:`map` (``shard_map`` over the mesh);
    everything else (the loss, the optimizer) sees ordinary global arrays.
    """

    mesh: Any
    data_axis: str = "data"
    space_axis: str = "space"
    fsdp: bool = False  # the parameters arrive split over all devices (--fsdp): gathered where each part runs

    @property
    def devices(self) -> int:
        return int(self.mesh.shape[self.space_axis])

    def bands(self, rows: int, window_rows: int) -> Bands:
        return Bands(rows, window_rows, self.devices)

    def banded_spec(self, ndim: int, row_axis: int, examples: bool = True) -> Any:
        """The PartitionSpec of a banded array: rows (axis ``row_axis``) over ``space`` and,
        with ``examples``, axis 0 over ``data``."""
        from jax.sharding import PartitionSpec

        spec = [None] * ndim
        if examples:
            spec[0] = self.data_axis
        spec[row_axis] = self.space_axis
        return PartitionSpec(*spec)

    def example_spec(self, ndim: int) -> Any:
        """The PartitionSpec of a per-example array that every band needs whole."""
        from jax.sharding import PartitionSpec

        return PartitionSpec(self.data_axis, *([None] * (ndim - 1)))

    def map(self, fn: Any, in_specs: Any, out_specs: Any) -> Any:
        """``fn`` on every device's share (``jax.shard_map`` over the whole mesh)."""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def param_specs(self, params: Any) -> Any:
        """The PartitionSpecs of parameters as the train state holds them: whole, or with
        ``fsdp`` split over all devices on the dimension :func:`fsdp_dim` picks (the rule of
        ``aurora_loop.step.state_shardings``), so that each part gathers its own weights and
        its gradients leave as a reduce-scatter."""
        from jax.sharding import PartitionSpec

        axes = (self.data_axis, self.space_axis)

        def spec(leaf: Any) -> Any:
            dim = fsdp_dim(tuple(getattr(leaf, "shape", ())), self.mesh.size) if self.fsdp else None
            return PartitionSpec() if dim is None else PartitionSpec(*([None] * dim + [axes]))

        return jax.tree_util.tree_map(spec, params)

    def gather(self, params: Any, specs: Any) -> Any:
        """Inside :meth:`map`: this device's share of the parameters (handed in with
        ``specs``, :meth:`param_specs`) made whole; the gradient of this gather is a
        reduce-scatter."""
        def whole(leaf: Any, spec: Any) -> Any:
            for dim, axes in enumerate(spec):
                if axes is not None:
                    return jax.lax.all_gather(leaf, axes, axis=dim, tiled=True)
            return leaf

        return jax.tree_util.tree_map(whole, params, specs)


def fsdp_dim(shape: tuple[int, ...], devices: int) -> int | None:
    """The dimension FSDP splits a parameter of ``shape`` on over ``devices``: its largest
    dimension divisible by them (the first of equals), None when none is. The rule of
    ``aurora_loop.step.state_shardings`` (``tests/test_space.py`` checks that they agree)."""
    dims = [d for d, n in enumerate(shape) if n % devices == 0 and n >= devices]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def to_bands(x: Array, bands: Bands, axis: int, scale: int = 1) -> Array:
    """A global array's rows (axis ``axis``; ``scale`` array rows per grid row, e.g. the
    patch size for pixel fields) padded into ``bands``' banded layout (zeros outside the
    real rows)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (bands.top * scale, (bands.total - bands.top - bands.rows) * scale)
    return jnp.pad(x, widths)


def from_bands(x: Array, bands: Bands, axis: int, scale: int = 1) -> Array:
    """The real rows of a banded global array (the inverse of :func:`to_bands`)."""
    return jax.lax.slice_in_dim(x, bands.top * scale, (bands.top + bands.rows) * scale, axis=axis)


def stage_layouts(config: Any, grid: tuple[int, int], devices: int) -> list[tuple[tuple[int, int, int], Bands]]:
    """(token grid (C, H, W), its :class:`Bands`) of every backbone stage of ``config`` on an
    H x W grid (cropped to the patch size) split over ``devices``."""
    from aurora_loop.model.swin import encoder_resolutions
    from aurora_loop.model.windows import adjust_windows

    p = config.patch_size
    res, _ = encoder_resolutions((config.latent_levels, grid[0] // p, grid[1] // p), len(config.encoder_depths))
    return [(r, Bands(r[1], adjust_windows(tuple(config.window_size), (0, 0, 0), r)[0][1], devices)) for r in res]


def _layout_problem(config: Any, grid: tuple[int, int], devices: int) -> str | None:
    layouts = stage_layouts(config, grid, devices)
    half = config.window_size[1] // 2
    for i, (res, bands) in enumerate(layouts):
        where = f"stage {i + 1}'s {res[1]} token rows in windows of {bands.window_rows}"
        if bands.window_count < devices:
            return f"{where} make {bands.window_count} window row{'s' * (bands.window_count != 1)}, fewer than {devices} bands"
        real = bands.real_mask().reshape(devices, -1).sum(axis=1)
        if real.min() == 0:
            return f"{where} leave a band without a real row"
        try:
            for shift in (half, -half):
                if bands.window_rows < res[1]:
                    plan_exchange(roll_source(bands, shift), bands.per_device)
            if i + 1 < len(layouts):
                coarse = layouts[i + 1][1]
                plan_exchange(merge_source(bands, coarse), bands.per_device)
                plan_exchange(split_source(coarse, bands), 2 * coarse.per_device)
        except ValueError:
            return f"{where} need rows from beyond a neighbouring band"
    return None


def space_problem(config: Any, grid: tuple[int, int], devices: int) -> str | None:
    """Why an Aurora of ``config`` cannot split an H x W ``grid`` over ``devices`` bands (a
    stage with fewer window rows than bands, a band without real rows, a roll or re-banding
    that would need more than a neighbour's rows), naming the sizes that would work; None
    when it can."""
    problem = _layout_problem(config, grid, devices)
    if problem is None:
        return None
    fit = [n for n in range(2, 65) if _layout_problem(config, grid, n) is None]
    sizes = ", ".join(map(str, fit)) if fit else "none above 1"
    return (f"--space_parallel {devices} cannot split the {grid[0]} x {grid[1]} grid: {problem}; "
            f"sizes that split this grid: {sizes}")
