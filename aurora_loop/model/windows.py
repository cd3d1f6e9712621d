"""Window bookkeeping of the 3D Swin backbone: padding, partitioning and shifted-window masks.

Token grids are (B, C, H, W, D): C latent levels, H x W patches, D features. Padding is
split over both sides of an axis (the smaller half first), as the reference pads.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any
Triple = tuple[int, int, int]

MASKED = -100.0  # additive logit for token pairs that must not attend to each other


def _two_sided(pad: int) -> tuple[int, int]:
    return pad // 2, pad - pad // 2


def pad_3d(x: Array, pad: Triple, value: float = 0.0) -> Array:
    """Pad (B, C, H, W, D) by ``pad = (pc, ph, pw)`` tokens on the level/lat/lon axes."""
    widths = ((0, 0), *(_two_sided(p) for p in pad), (0, 0))
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.pad(x, widths, constant_values=value)


def crop_3d(x: Array, pad: Triple) -> Array:
    """Undo :func:`pad_3d`."""
    _, c, h, w, _ = x.shape
    (cf, cb), (ht, hb), (wl, wr) = (_two_sided(p) for p in pad)
    return x[:, cf : c - cb, ht : h - hb, wl : w - wr, :]


def window_partition(x: Array, ws: Triple) -> Array:
    """(B, C, H, W, D) -> (B * nW, ws0 * ws1 * ws2, D), windows ordered (B, C', H', W')."""
    b, c, h, w, d = x.shape
    x = x.reshape(b, c // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], d)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, ws[0] * ws[1] * ws[2], d)


def window_reverse(windows: Array, ws: Triple, c: int, h: int, w: int) -> Array:
    """Inverse of :func:`window_partition`: (B * nW, N, D) -> (B, C, H, W, D)."""
    c1, h1, w1 = c // ws[0], h // ws[1], w // ws[2]
    d = windows.shape[-1]
    x = windows.reshape(-1, c1, h1, w1, ws[0], ws[1], ws[2], d)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, c, h, w, d)


def adjust_windows(window: Triple, shift: Triple, res: Triple) -> tuple[Triple, Triple]:
    """Shrink the window to the grid (and drop the shift) on axes the window covers."""
    ws, ss = list(window), list(shift)
    for i, r in enumerate(res):
        if r <= window[i]:
            ws[i], ss[i] = r, 0
    return tuple(ws), tuple(ss)  # type: ignore[return-value]


def window_padding(res: Triple, ws: Triple) -> Triple:
    """Tokens to add on each axis so that the grid divides into windows."""
    return tuple((-r) % w for r, w in zip(res, ws))  # type: ignore[return-value]


PADDING_GROUP = 27  # the group of padding tokens (the 27 groups of a shift are 0..26)


@functools.lru_cache(maxsize=64)
def shifted_window_groups(res: Triple, ws: Triple, ss: Triple) -> np.ndarray:
    """The group of every token of every shifted window on a (C, H, W) grid, (C', H', W', N)
    int32 (windows on the padded grid, N tokens each): after the cyclic shift, tokens of
    different groups were not neighbours before it, except across the longitude seam (the
    longitude wraps around, so the groups on the two sides of it are one). Padding tokens
    are :data:`PADDING_GROUP`."""
    c, h, w = res
    groups = np.zeros((c, h, w), dtype=np.float64)
    slices = [(slice(0, -ws[i]), slice(-ws[i], -ss[i]), slice(-ss[i], None)) for i in range(3)]
    for count, (sc, sh, sw) in enumerate(itertools.product(*slices)):
        groups[sc, sh, sw] = count
    # The longitude seam: the last two longitude groups touch each other, per (level, lat) pair.
    for level_group in range(3):
        for first, second in ((1, 2), (4, 5), (7, 8)):
            offset = 9 * level_group
            groups[groups == first + offset] = second + offset
    groups = pad_3d(groups[None, ..., None], window_padding(res, ws), value=float(PADDING_GROUP))
    _, cp, hp, wp, _ = groups.shape
    windows = window_partition(groups, ws)[..., 0]  # (nW, N)
    return windows.reshape(cp // ws[0], hp // ws[1], wp // ws[2], -1).astype(np.int32)


def group_mask(groups: Array) -> Array:
    """Additive attention mask (..., N, N) of windows' token groups (..., N): 0 within a
    group, :data:`MASKED` between groups."""
    xp = np if isinstance(groups, np.ndarray) else jnp
    differ = groups[..., None, :] != groups[..., :, None]
    return xp.where(differ, MASKED, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=64)
def shifted_window_mask(res: Triple, ws: Triple, ss: Triple) -> np.ndarray:
    """Additive attention mask (nW, N, N) float32 for shifted windows on a (C, H, W) grid
    (:func:`shifted_window_groups`)."""
    groups = shifted_window_groups(res, ws, ss)
    return group_mask(groups.reshape(-1, groups.shape[-1]))
