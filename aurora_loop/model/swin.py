"""The 3D Swin Transformer U-Net backbone, conditioned on the lead time.

Tokens are (B, L, D) with L = C * H * W flattened level-major (C latent levels, H x W
patches). Encoder stages run Swin blocks then merge 2 x 2 patches (D doubles); decoder
stages run Swin blocks then split patches (D halves), adding the encoder's features of the
same resolution; the last stage concatenates the first encoder stage's output, so the
backbone returns (B, L, 2 * embed_dim).

With ``remat`` every Swin block keeps only its input for the backward pass and recomputes
its activations there (see :func:`remat_after_cotangent` for why this is not ``nn.remat``);
``remat_policy="dots"`` keeps its linear layers' outputs too (:func:`checkpointed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.layers import MLP, attention, dense, layer_norm
from aurora_loop.model.lora import LoRARollout
from aurora_loop.model.windows import (
    adjust_windows,
    crop_3d,
    pad_3d,
    shifted_window_mask,
    window_padding,
    window_partition,
    window_reverse,
)

Array = Any
Dtype = Any
Triple = tuple[int, int, int]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows of a token grid.

    (B, C, H, W, D) -> (B, C, H, W, D). The grid is rolled by ``-shift``, padded to a
    multiple of the window, split into windows of N tokens, attended within each window,
    and put back (unpadded, rolled back). The reference projects the *padded* windows; both
    projections act token by token, so here ``qkv`` runs on the real tokens only (padding
    tokens are zero vectors, whose ``qkv`` is exactly its bias) and ``proj`` runs after the
    padding is cropped. Same numbers, far fewer FLOPs where padding is large (a 8 x 16 grid
    padded to 12 x 24 for a 6 x 12 window has 2.25x the tokens).
    """

    num_heads: int
    use_lora: bool = False
    lora_steps: int = 40
    lora_mode: str = "single"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, grid: Array, mask: np.ndarray | None, rollout_step: int | Array,
        ws: Triple = (1, 1, 1), ss: Triple = (0, 0, 0), band: Any = None,
    ) -> Array:
        """``band``: a :class:`~aurora_loop.model.bands.BandContext` when ``grid`` is this
        device's band of rows (inside ``shard_map``; its rows are whole windows, padding
        rows included): the roll moves rows between bands, the padding rows' inputs are
        zeros (so their qkv is the bias, as the reference pads), and ``mask`` is made from
        the band's windows."""
        b, cc, h, w, d = grid.shape
        shifted = any(ss)
        if band is not None:
            if shifted:
                grid = band.roll(jnp.roll(grid, shift=(-ss[0], -ss[2]), axis=(1, 3)), -ss[1])
            grid = band.zero_padding(grid)
            mask = band.window_mask(grid) if shifted else None
        elif shifted:
            grid = jnp.roll(grid, shift=(-ss[0], -ss[1], -ss[2]), axis=(1, 2, 3))
        qkv_layer = dense(3 * d, "qkv", dtype=self.dtype)
        qkv = qkv_layer(grid)
        if self.use_lora:
            lora = LoRARollout(3 * d, max_steps=self.lora_steps, mode=self.lora_mode, dtype=self.dtype, name="lora_qkv")
            qkv = qkv + lora(grid, rollout_step)
        pad = window_padding((cc, h, w), ws)
        if any(pad):
            # A padding token is a zero vector: its qkv (LoRA included) is the bias, exactly.
            fill = qkv_layer(jnp.zeros((1, d), grid.dtype))[0]
            real = pad_3d(np.ones((1, cc, h, w, 1), bool), pad, value=False)
            qkv = jnp.where(real, pad_3d(qkv, pad), fill)
        _, cp, hp, wp, _ = qkv.shape
        qkv = window_partition(qkv, ws)  # (B * nW, N, 3D)
        bw, n, _ = qkv.shape
        qkv = qkv.reshape(bw, n, 3, self.num_heads, d // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B * nW, H, N, Dh)
        if mask is not None:
            nw = mask.shape[0]
            shape = (bw // nw, nw, self.num_heads, n, d // self.num_heads)
            bias = (mask if band is not None else block_mask(mask, grid))[None, :, None]
            out = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), bias)
            out = out.reshape(bw, self.num_heads, n, -1)
        else:
            out = attention(q, k, v)
        out = out.transpose(0, 2, 1, 3).reshape(bw, n, d)
        out = crop_3d(window_reverse(out, ws, cp, hp, wp), pad)  # (B, C, H, W, D)
        y = dense(d, "proj", dtype=self.dtype)(out)
        if self.use_lora:
            lora = LoRARollout(d, max_steps=self.lora_steps, mode=self.lora_mode, dtype=self.dtype, name="lora_proj")
            y = y + lora(out, rollout_step)
        if shifted and band is not None:
            y = band.roll(jnp.roll(y, shift=(ss[0], ss[2]), axis=(1, 3)), ss[1])
        elif shifted:
            y = jnp.roll(y, shift=ss, axis=(1, 2, 3))
        return y


class AdaptiveLayerNorm(nn.Module):
    """``LN(x) * scale(c) + shift(c)`` with (shift, scale) = Linear(SiLU(c)); c (B, Dc), or
    (B, L, Dc) per token (the stochastic backbone)."""

    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d = x.shape[-1]
        zeros = nn.initializers.zeros
        mod = nn.Dense(2 * d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=zeros, name="modulation")(nn.silu(c))
        if mod.ndim == 2:  # one conditioning per example, for every token
            mod = mod.reshape(mod.shape[0], *([1] * (x.ndim - 2)), mod.shape[-1])
        shift, scale = jnp.split(mod, 2, axis=-1)
        return layer_norm("ln", affine=False, dtype=self.dtype)(x) * scale + shift


class SwinBlock(nn.Module):
    """One (shifted-)window block with post-norm residuals modulated by ``c``."""

    num_heads: int
    window_size: Triple
    shift_size: Triple
    mlp_ratio: float = 4.0
    use_lora: bool = False
    lora_steps: int = 40
    lora_mode: str = "single"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array, res: Triple, rollout_step: int | Array, band: Any = None) -> Array:
        """x (B, C*H*W, D), c (B, Dc) or (B, C*H*W, Dc), res = (C, H, W) -> (B, C*H*W, D).

        ``band``: x is this device's band (B, C, R, W, D) of the grid's rows (and c (B, Dc)
        or banded likewise), a :class:`~aurora_loop.model.bands.BandContext` of this grid."""
        cc, h, w = res
        ws, ss = adjust_windows(self.window_size, self.shift_size, res)
        shifted = any(ss)
        attn = WindowAttention(self.num_heads, self.use_lora, self.lora_steps, self.lora_mode, self.dtype, name="attn")
        if band is not None:
            grid = attn(x, None, rollout_step, ws, ss, band=band.for_windows(res, ws, ss))
        else:
            b, length, d = x.shape
            if length != cc * h * w:
                raise ValueError(f"{length} tokens do not form a {cc}x{h}x{w} grid")
            mask = shifted_window_mask(res, ws, ss) if shifted else None
            grid = attn(x.reshape(b, cc, h, w, d), mask, rollout_step, ws, ss).reshape(b, length, d)
        d = x.shape[-1]

        x = x + AdaptiveLayerNorm(self.dtype, name="norm1")(grid, c)
        y = MLP(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(x)
        return x + AdaptiveLayerNorm(self.dtype, name="norm2")(y, c)


def after(tree: Any, signal: Any) -> Any:
    """``tree`` (arrays of any shape) unchanged, but computed only once ``signal`` exists.

    Adds to every leaf a zero derived from one element of ``signal`` (an array, or a pytree
    whose first leaf is used). XLA can neither fold it (it is not a constant) nor schedule
    the leaves' users before ``signal``. ``min(|s|, 0)`` is 0 for every finite or infinite
    ``s`` (only a NaN passes through, and then the computation it orders is poisoned
    already); ``x + 0`` is exact.
    """
    first = jax.tree_util.tree_leaves(signal)[0]
    # One element by index, not through a reshape: a reshape of an array split over devices
    # (a band of rows) would gather it whole.
    s = jnp.abs(first[(0,) * jnp.ndim(first)])

    def tie(x: Array) -> Array:
        return x + jnp.minimum(s.astype(x.dtype), jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map(tie, tree)


def block_mask(mask: np.ndarray, grid: Array) -> Array:
    """The shifted-window mask (nW, N, N) as a value of this block (tied to its input
    ``grid``): a constant mask is broadcast once to the logits' shape and kept alive for
    the whole step (XLA:CPU: 3.4 GiB at 0.25°); this one is made where the block runs."""
    return after(jnp.asarray(mask), grid)


def detached(module: nn.Module) -> nn.Module:
    """An unbound copy of a submodule, to apply as a pure function of its parameters."""
    return module.clone(parent=None, name=None)


def remat_after_cotangent(fn: Callable[..., Any], saveable: Callable[..., bool] | None = None,
                          tie_params: bool = True) -> Callable[..., Any]:
    """Activation checkpointing of ``fn(params, x, *rest) -> y`` that survives XLA:CPU.

    ``x`` and ``y`` may be pytrees of floating arrays (the encoder takes dicts of fields,
    the decoder returns them); ``rest`` holds arrays.

    The forward pass keeps only the arguments; the backward pass recomputes ``fn`` and its
    VJP. ``jax.checkpoint`` does the same, but on XLA:CPU its recomputation depends only on
    saved values, and the scheduler runs it early (often inside the forward pass), so every
    block's activations are alive at once again and the compiled temporaries do not shrink.
    Here the recomputation's inputs are made to depend on the cotangent of ``y``
    (:func:`after`), so it can only run when the backward pass reaches this block.

    The parameters are tied the same way, to ``x`` in the forward pass and to the cotangent
    in the backward pass: when they are sharded (FSDP), XLA then gathers each block's
    weights just before the block runs, instead of gathering all of them up front and
    keeping them alive.

    A loop (``lax.scan`` over the blocks) would also keep the passes apart, but it needs the
    blocks' parameters stacked, which copies them (and their gradients) at apply time: in a
    10-layer toy, 193 MB of temporaries against 84 MB here and 566 MB without remat.

    ``rest`` may hold integer arrays (e.g. a traced roll-out step); they get no cotangent.

    ``saveable``: a ``jax.checkpoint`` policy (e.g. ``jax.checkpoint_policies.
    dots_with_no_batch_dims_saveable``). The forward pass then also keeps what the policy
    saves, and the backward pass recomputes only the rest from it, again only once the
    cotangent has arrived (``jax.checkpoint`` with the same policy, on XLA:CPU, needed more
    temporaries than no checkpointing at all).

    ``tie_params=False`` leaves ``params`` untied (a whole roll-out step checkpointed with
    the model's parameters among them: tying them would copy every weight; they may also
    hold integers and keys).
    """

    def primal(params: Any, x: Array, *rest: Array) -> Array:
        return fn(after(params, x) if tie_params else params, x, *rest)

    if saveable is None:

        def forward(params: Any, x: Array, *rest: Array) -> tuple[Array, tuple]:
            return primal(params, x, *rest), (params, x, rest)

        def backward(saved: tuple, ct: Array) -> tuple:
            params, x, rest = saved
            differentiable, floating, float_rest = _floating_rest(fn, rest)
            # Tied outside the VJP: the ties' own (zero) derivatives would cost a reduction each.
            if tie_params:
                params, x = after((params, x), ct)
            else:
                x = after(x, ct)
            _, vjp = jax.vjp(differentiable, params, x, *float_rest)
            return _none_for_integers(vjp(ct), floating)

    else:
        # The forward pass keeps the residuals of a VJP of the checkpointed ``fn`` (what
        # ``saveable`` saves); the backward pass ties them to the cotangent, then applies them.

        def forward(params: Any, x: Array, *rest: Array) -> tuple[Array, tuple]:
            differentiable, _, float_rest = _floating_rest(fn, rest)
            y, vjp = jax.vjp(jax.checkpoint(differentiable, policy=saveable), after(params, x), x, *float_rest)
            return y, (vjp, rest)

        def backward(saved: tuple, ct: Array) -> tuple:
            vjp, rest = saved
            _, floating, _ = _floating_rest(fn, rest)
            return _none_for_integers(after(vjp, ct)(ct), floating)

    checkpointed = jax.custom_vjp(primal)
    checkpointed.defvjp(forward, backward)
    return checkpointed


def _floating_rest(fn: Callable[..., Any], rest: tuple) -> tuple[Callable[..., Any], list[bool], list[Array]]:
    """``fn(params, x, *rest)`` as a function of (params, x, the floating entries of ``rest``),
    the integer entries fixed; which entries float; the floating entries."""
    floating = [jnp.issubdtype(jnp.result_type(r), jnp.inexact) for r in rest]

    def differentiable(params: Any, x: Array, *float_rest: Array) -> Array:
        values = iter(float_rest)
        return fn(params, x, *(next(values) if f else r for r, f in zip(rest, floating)))

    return differentiable, floating, [r for r, f in zip(rest, floating) if f]


def _none_for_integers(grads: Any, floating: list[bool]) -> tuple:
    """The cotangents of (params, x, *rest) from those of (params, x, *floating rest): None
    for each integer entry of ``rest``."""
    grads = iter(grads)
    params_ct, x_ct = next(grads), next(grads)
    return (params_ct, x_ct, *(next(grads) if f else None for f in floating))


def checkpointed(fn: Callable[..., Any], policy: str = "inputs") -> Callable[..., Any]:
    """``fn(params, x, *rest)`` with activation checkpointing under ``policy``
    (``AuroraConfig.remat_policy``).

    ``inputs``: :func:`remat_after_cotangent`, which keeps only the arguments. ``dots``: the
    same, also keeping the outputs of the products without batch dimensions (the linear
    layers'), so that the backward pass recomputes only element-wise work (norms, GELU,
    softmax) and the attention's batched products: less recomputation for more memory.
    """
    if policy == "inputs":
        return remat_after_cotangent(fn)
    if policy == "dots":
        return remat_after_cotangent(fn, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat policy {policy!r}")


class PatchMerging(nn.Module):
    """2 x 2 patches -> one: (B, C*H*W, D) -> (B, C*ceil(H/2)*ceil(W/2), out_dim or 2D).

    ``norm=False`` leaves out the layer norm (the stochastic backbone merges its per-token
    conditioning this way, keeping its width)."""

    dtype: Dtype | None = None
    out_dim: int | None = None
    norm: bool = True

    @nn.compact
    def __call__(self, x: Array, res: Triple) -> Array:
        c, h, w = res
        b, _, d = x.shape
        grid = pad_3d(x.reshape(b, c, h, w, d), (0, h % 2, w % 2))
        h2, w2 = grid.shape[2] // 2, grid.shape[3] // 2
        grid = grid.reshape(b, c, h2, 2, w2, 2, d).transpose(0, 1, 2, 4, 3, 5, 6)
        x = grid.reshape(b, c * h2 * w2, 4 * d)
        if self.norm:
            x = layer_norm("norm", dtype=self.dtype)(x)
        return dense(self.out_dim or 2 * d, "reduction", use_bias=False, dtype=self.dtype)(x)


class PatchSplitting(nn.Module):
    """One patch -> 2 x 2: (B, C*H*W, D) -> (B, C*(2H - ch)*(2W - cw), D/2), cropping ``crop``."""

    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, res: Triple, crop: Triple) -> Array:
        c, h, w = res
        b, _, d = x.shape
        out = d // 2
        x = dense(4 * out, "lin1", use_bias=False, dtype=self.dtype)(x)
        grid = x.reshape(b, c, h, w, 2, 2, out).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, c, 2 * h, 2 * w, out)
        x = crop_3d(grid, crop).reshape(b, -1, out)
        x = layer_norm("norm", dtype=self.dtype)(x)
        return dense(out, "lin2", use_bias=False, dtype=self.dtype)(x)


class SwinStage(nn.Module):
    """``depth`` Swin blocks (every other one shifted), then optional merging or splitting."""

    depth: int
    num_heads: int
    window_size: Triple
    mlp_ratio: float
    downsample: bool = False
    upsample: bool = False
    use_lora: bool = False
    lora_steps: int = 40
    lora_mode: str = "single"
    remat: bool = False
    remat_policy: str = "inputs"
    scan_blocks: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array, res: Triple, crop: Triple, rollout_step: int | Array,
                 space: tuple | None = None) -> tuple[Array, Array]:
        """Returns (resampled output, output before resampling).

        ``space``: (:class:`~aurora_loop.model.bands.SpacePlan`, this grid's
        :class:`~aurora_loop.model.bands.Bands`, the resampled grid's): x (and a per-token c)
        are banded global arrays (B, C, rows, W, D) and every block and the resampling run on
        each device's band."""
        half = tuple(s // 2 for s in self.window_size)
        blocks = [
            SwinBlock(
                num_heads=self.num_heads,
                window_size=self.window_size,
                shift_size=(0, 0, 0) if i % 2 == 0 else half,
                mlp_ratio=self.mlp_ratio,
                use_lora=self.use_lora,
                lora_steps=self.lora_steps,
                lora_mode=self.lora_mode,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )
            for i in range(self.depth)
        ]
        banded = space is not None and not self.is_initializing()
        if self.scan_blocks and self.depth >= 4 and not self.is_initializing():
            x = self._scanned(blocks, x, c, res, rollout_step, space if banded else None)
        else:
            for block in blocks:
                if (self.remat or banded) and not self.is_initializing():
                    x = self._apply_detached(detached(block), self.variables["params"][block.name], x, c, res, rollout_step,
                                             space if banded else None)
                else:
                    x = block(x, c, res, rollout_step)
        if self.downsample:
            merge = PatchMerging(self.dtype, name="downsample")
            return (merge_bands(merge, self.variables["params"]["downsample"], x, res, space) if banded else merge(x, res)), x
        if self.upsample:
            split = PatchSplitting(self.dtype, name="upsample")
            return (split_bands(split, self.variables["params"]["upsample"], x, res, crop, space) if banded
                    else split(x, res, crop)), x
        return x, x

    def _scanned(self, blocks: list[SwinBlock], x: Array, c: Array, res: Triple, rollout_step: int | Array,
                 space: tuple | None = None) -> Array:
        """The blocks as a ``lax.scan`` over (unshifted, shifted) pairs: XLA compiles one
        pair instead of ``depth`` blocks. The pairs' parameters (``blocks_i``, the usual
        tree) are stacked here, at apply time, which copies them and their gradients. An
        odd last block runs after the loop. (B, C*H*W, D) -> (B, C*H*W, D)."""
        params = self.variables["params"]
        pairs = self.depth // 2
        stacked = [jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *(params[blocks[2 * j + k].name] for j in range(pairs)))
                   for k in (0, 1)]
        unshifted, shifted = detached(blocks[0]), detached(blocks[1])

        def run_block(block: nn.Module, block_params: Any, x: Array) -> Array:
            return self._apply_detached(block, block_params, x, c, res, rollout_step, space)

        def pair(x: Array, pair_params: tuple) -> tuple[Array, None]:
            return run_block(shifted, pair_params[1], run_block(unshifted, pair_params[0], x)), None

        x, _ = jax.lax.scan(pair, x, tuple(stacked))
        if self.depth % 2:
            x = run_block(detached(blocks[-1]), params[blocks[-1].name], x)
        return x

    def _apply_detached(self, block: nn.Module, params: Any, x: Array, c: Array, res: Triple, rollout_step: int | Array,
                        space: tuple | None = None) -> Array:
        """``block`` (a detached block, :func:`detached`) applied to ``params`` (a ``blocks_i``
        subtree of this stage, the same tree as without remat or scan): (B, C*H*W, D) ->
        (B, C*H*W, D). With ``remat`` it is checkpointed on its input under ``remat_policy``;
        the block is then one pure function of (params, x, c) for the custom VJP. With
        ``space`` the block runs on every device's band (banded x)."""

        def run(params: Any, x: Array, c: Array, step: int | Array = rollout_step) -> Array:
            return block.apply({"params": params}, x, c, res, step)

        if space is not None:
            on_bands = banded_block(block, res, space, static_step=rollout_step if isinstance(rollout_step, int) else None)

            def run(params: Any, x: Array, c: Array, step: int | Array = rollout_step) -> Array:
                return on_bands(params, x, c, step)

        if not self.remat:
            return run(params, x, c)
        if isinstance(rollout_step, int):  # a Python step stays static (LoRA picks its adapter)
            return checkpointed(run, self.remat_policy)(params, x, c)
        return checkpointed(run, self.remat_policy)(params, x, c, rollout_step)


def banded_block(block: nn.Module, res: Triple, space: tuple, static_step: int | None) -> Callable[..., Array]:
    """``run(params, x, c, step)`` of a detached Swin ``block`` on every device's band of a
    banded grid x (B, C, rows, W, D) (``space``: plan, bands); c (B, Dc), or banded per
    token; ``step`` traced (or ``static_step``, a Python roll-out step)."""
    from aurora_loop.model.bands import BandContext

    plan, bands = space[0], space[1]
    grid_spec = plan.banded_spec(5, 2)

    def run(params: Any, x: Array, c: Array, step: int | Array | None = None) -> Array:
        c_spec = grid_spec if c.ndim == 5 else plan.example_spec(c.ndim)
        context = BandContext(bands, plan.space_axis)
        specs = plan.param_specs(params)
        if static_step is not None:
            def body(p: Any, xl: Array, cl: Array) -> Array:
                return block.apply({"params": plan.gather(p, specs)}, xl, cl, res, static_step, band=context)

            return plan.map(body, (specs, grid_spec, c_spec), grid_spec)(params, x, c)

        def body_traced(p: Any, xl: Array, cl: Array, s: Array) -> Array:
            return block.apply({"params": plan.gather(p, specs)}, xl, cl, res, s, band=context)

        from jax.sharding import PartitionSpec

        return plan.map(body_traced, (specs, grid_spec, c_spec, PartitionSpec()), grid_spec)(params, x, c, step)

    return run


def merge_bands(merge: nn.Module, params: Any, x: Array, res: Triple, space: tuple) -> Array:
    """:class:`PatchMerging` of a banded grid x (B, C, rows, W, D) into the next stage's bands
    (``space``: plan, these bands, the next stage's): each device first gathers the row
    pairs its new band merges (:func:`~aurora_loop.model.bands.merge_source`)."""
    from aurora_loop.model.bands import merge_source, permute_rows

    plan, here, coarse = space
    spec = plan.banded_spec(5, 2)
    src = merge_source(here, coarse)
    module = detached(merge)

    specs = plan.param_specs(params)

    def body(p: Any, xl: Array) -> Array:
        pairs = permute_rows(xl, src, here.per_device, 2, plan.space_axis)  # (B, C, 2 R', W, D)
        b, cc, rows, w, d = pairs.shape
        out = module.apply({"params": plan.gather(p, specs)}, pairs.reshape(b, cc * rows * w, d), (cc, rows, w))
        return out.reshape(b, cc, rows // 2, -1, out.shape[-1])

    return plan.map(body, (specs, spec), spec)(params, x)


def split_bands(split: nn.Module, params: Any, x: Array, res: Triple, crop: Triple, space: tuple) -> Array:
    """:class:`PatchSplitting` of a banded grid x (B, C, rows, W, D) into the finer stage's
    bands (``space``: plan, these bands, the finer stage's): each device splits its rows,
    then gathers its new band (:func:`~aurora_loop.model.bands.split_source`); the rows the
    reference crops are simply never gathered."""
    from aurora_loop.model.bands import permute_rows, split_source

    plan, here, fine = space
    spec = plan.banded_spec(5, 2)
    src = split_source(here, fine)
    module = detached(split)

    specs = plan.param_specs(params)

    def body(p: Any, xl: Array) -> Array:
        b, cc, rows, w, d = xl.shape
        out = module.apply({"params": plan.gather(p, specs)}, xl.reshape(b, cc * rows * w, d), (cc, rows, w), (0, 0, crop[2]))
        out = out.reshape(b, cc, 2 * rows, -1, out.shape[-1])
        return permute_rows(out, src, 2 * rows, 2, plan.space_axis)

    return plan.map(body, (specs, spec), spec)(params, x)


def stage_bands(config: AuroraConfig, patch_res: Triple, space: Any) -> list[Any]:
    """The :class:`~aurora_loop.model.bands.Bands` of every backbone stage's grid for the
    plan ``space``: each stage's rows in bands of its own (adjusted) window rows."""
    res, _ = encoder_resolutions(patch_res, len(config.encoder_depths))
    return [space.bands(r[1], adjust_windows(tuple(config.window_size), (0, 0, 0), r)[0][1]) for r in res]


def encoder_resolutions(patch_res: Triple, stages: int) -> tuple[list[Triple], list[Triple]]:
    """Grid of every encoder stage and the padding each merge adds (the last is (0, 0, 0))."""
    res, pads = [tuple(patch_res)], []
    for _ in range(1, stages):
        c, h, w = res[-1]
        pads.append((0, h % 2, w % 2))
        res.append((c, (h + h % 2) // 2, (w + w % 2) // 2))
    pads.append((0, 0, 0))
    return res, pads  # type: ignore[return-value]


class Swin3DBackbone(nn.Module):
    """The U-Net: (B, L, D) tokens + lead-time encoding (B, D) -> (B, L, 2D).

    The blocks are conditioned on ``c = time_mlp(lead encoding)`` (B, D). A stochastic
    model (``config.stochastic``, the 1.5 ensemble) adds ``noise_mlp(noise)`` per token,
    ``noise`` (B, L, D) standard normal, and merges that per-token ``c`` down to each
    coarser encoder stage with ``context_down_layers_i``; the decoder stages reuse the
    encoder's ``c`` of their resolution.
    """

    config: AuroraConfig

    @nn.compact
    def __call__(self, x: Array, lead_encoding: Array, patch_res: Triple, rollout_step: int | Array,
                 noise: Array | None = None, space: Any = None) -> Array:
        """``space``: a :class:`~aurora_loop.model.bands.SpacePlan`: x (and noise) are then
        banded grids (B, C, rows, W, D) in the first stage's bands (:func:`stage_bands`),
        and so is the output."""
        cfg = self.config
        dtype = cfg.backbone_dtype
        if patch_res[0] % cfg.window_size[0]:
            raise ValueError(f"latent levels ({patch_res[0]}) must be a multiple of window_size[0] ({cfg.window_size[0]})")
        out_dtype = x.dtype
        if dtype is not None:
            x = x.astype(dtype)
        b = x.shape[0]
        time = jnp.broadcast_to(jnp.asarray(lead_encoding, x.dtype), (b, cfg.embed_dim))
        c = MLP(cfg.embed_dim, act="silu", dtype=dtype, name="time_mlp")(time)
        if cfg.stochastic:
            if noise is None:
                raise ValueError("a stochastic Aurora needs noise (B, L, D): pass noise= or rng=")
            per_example = c.reshape(c.shape[0], *([1] * (noise.ndim - 2)), c.shape[-1])
            c = per_example + MLP(cfg.embed_dim, act="silu", dtype=dtype, name="noise_mlp")(noise.astype(x.dtype))

        res, pads = encoder_resolutions(patch_res, len(cfg.encoder_depths))
        banded = space is not None and not self.is_initializing()
        bands = stage_bands(cfg, patch_res, space) if banded else None

        def plan(i: int, j: int | None) -> tuple | None:  # stage i's bands, and those it resamples into
            return (space, bands[i], None if j is None else bands[j]) if banded else None

        n_enc, n_dec = len(cfg.encoder_depths), len(cfg.decoder_depths)
        common = dict(
            window_size=tuple(cfg.window_size), mlp_ratio=cfg.mlp_ratio, use_lora=cfg.use_lora,
            lora_steps=cfg.lora_steps, lora_mode=cfg.lora_mode, remat=cfg.remat, remat_policy=cfg.remat_policy, scan_blocks=cfg.scan_blocks, dtype=dtype,
        )
        skips, contexts = [], []
        for i in range(n_enc):
            contexts.append(c)
            stage = SwinStage(cfg.encoder_depths[i], cfg.encoder_num_heads[i], downsample=i < n_enc - 1,
                              name=f"encoder_layers_{i}", **common)
            x, unscaled = stage(x, c, res[i], (0, 0, 0), rollout_step, space=plan(i, i + 1 if i < n_enc - 1 else None))
            skips.append(unscaled)
            if cfg.stochastic and i < n_enc - 1:
                down = PatchMerging(dtype, out_dim=cfg.embed_dim, norm=False, name=f"context_down_layers_{i}")
                c = merge_bands(down, self.variables["params"][down.name], c, res[i], plan(i, i + 1)) if banded else down(c, res[i])
        for i in range(n_dec):
            index = n_dec - i - 1
            stage = SwinStage(cfg.decoder_depths[i], cfg.decoder_num_heads[i], upsample=i < n_dec - 1,
                              name=f"decoder_layers_{i}", **common)
            x, _ = stage(x, contexts[index] if cfg.stochastic else c, res[index], pads[index - 1], rollout_step,
                         space=plan(index, index - 1 if i < n_dec - 1 else None))
            if 0 < i < n_dec - 1:
                x = x + skips[index - 1]
            elif i == n_dec - 1:
                x = jnp.concatenate([x, skips[0]], axis=-1)
        return x.astype(out_dtype)
