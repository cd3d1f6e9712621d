"""Activation rematerialisation (``AuroraConfig.remat``, both ``remat_policy`` values): same
numbers, less memory.

The encoder, the Swin blocks and the decoder are checkpointed with
:func:`aurora_loop.model.swin.remat_after_cotangent`, whose recomputation waits for the
block's cotangent. These tests check that the parameter
tree, the loss and the gradients are those of the plain model, and that the compiled
gradient really needs fewer temporaries (which ``nn.remat`` did not achieve on XLA:CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model import AuroraConfig, apply, init_params, stack_samples
from aurora_loop.model.config import REMAT_POLICIES
from aurora_loop.model.swin import SwinStage, after, remat_after_cotangent
from tests.synthetic import make_samples

# The gradient comparisons compile two models each: skip LLVM's optimisations (about half the
# compile time); the memory test keeps the default pipeline.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
WINDOW = (2, 4, 8)
RES = (2, 16, 32)  # (levels, latitude, longitude) patches of the stage tests


def _config(**changes) -> AuroraConfig:
    """One stage each way (an unshifted and a shifted block), LoRA per roll-out step."""
    return AuroraConfig(
        encoder_depths=(2,), encoder_num_heads=(2,), decoder_depths=(2,), decoder_num_heads=(2,),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2, use_lora=True, lora_steps=3,
        lora_mode="all", surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"), **changes,
    )


def _random_like(shapes, seed: int = 0, scale: float = 0.1):
    """Arrays of the given shapes, N(0, scale); non-zero LoRA B, so every path counts."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def _assert_trees_close(actual, desired) -> None:
    """Leaf by leaf, to float32 rounding relative to each leaf's largest entry."""
    for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(desired)):
        scale = float(np.max(np.abs(d))) + 1e-30
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def inputs():
    return stack_samples(make_samples(1, grid=(8, 16), rollout_steps=1)).inputs


def _shapes(config: AuroraConfig, inputs):
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), inputs))


def test_parameter_tree_unchanged(inputs) -> None:
    plain, remat = _shapes(_config(), inputs), _shapes(_config(remat=True), inputs)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(remat)
    assert jax.tree_util.tree_leaves(plain) == jax.tree_util.tree_leaves(remat)
    assert {"blocks_0", "blocks_1"} <= set(remat["backbone"]["encoder_layers_0"])


def test_model_loss_and_gradients_match(inputs) -> None:
    """The whole model (encoder, backbone, decoder) with a traced roll-out step, its level
    aggregation and de-aggregation whole or over chunks of patches."""
    params = _random_like(_shapes(_config(), inputs))

    def value_and_grad(config: AuroraConfig):
        def loss(params):
            pred = apply(config, params, inputs, rollout_step=jnp.int32(1)).normalise()
            return sum(jnp.mean(v**2) for v in (*pred.surf_vars.values(), *pred.atmos_vars.values()))

        return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)

    value, grads = value_and_grad(_config())
    # level_chunk_tokens=3: the 8 patches' level (de-)aggregation as 3 chunks, one row padded.
    variants = [dict(level_chunk_tokens=3)] + [dict(remat=True, remat_policy=policy, level_chunk_tokens=chunk)
                                               for policy in REMAT_POLICIES for chunk in (0, 3)]
    for variant in variants:
        value_r, grads_r = value_and_grad(_config(**variant))
        np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6, err_msg=str(variant))
        _assert_trees_close(grads_r, grads)


def test_stage_gradients_match_inside_checkpoint_and_scan() -> None:
    """A Python roll-out step, nested in ``jax.checkpoint`` and ``lax.scan`` as a roll-out is."""
    x = _random_like(jax.ShapeDtypeStruct((1, int(np.prod(RES)), 16), jnp.float32), seed=1, scale=1.0)
    c = _random_like(jax.ShapeDtypeStruct((1, 16), jnp.float32), seed=2, scale=1.0)
    common = dict(depth=2, num_heads=2, window_size=WINDOW, mlp_ratio=4.0, use_lora=True, lora_steps=3, lora_mode="all")
    params = _random_like(jax.eval_shape(lambda: SwinStage(**common).init(jax.random.key(0), x, c, RES, (0, 0, 0), 1)))

    def grads(stage: SwinStage):
        def total(params, x, c):
            def body(carry, _):
                return carry + jnp.sum(stage.apply(params, x, c, RES, (0, 0, 0), 1)[0] ** 2), None

            return jax.lax.scan(jax.checkpoint(body), jnp.zeros(()), None, length=2)[0]

        return jax.jit(jax.grad(total, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)(params, x, c)

    plain = grads(SwinStage(**common))
    for policy in REMAT_POLICIES:
        _assert_trees_close(grads(SwinStage(**common, remat=True, remat_policy=policy)), plain)


def test_after_is_exact() -> None:
    x = jnp.asarray([-0.0, 1.5, -3.0, 1e30])
    for signal in (jnp.float32(2.0), jnp.float32(-jnp.inf), jnp.ones((2, 3), jnp.bfloat16)):
        np.testing.assert_array_equal(after(x, signal), x)


@pytest.mark.parametrize("saveable", [None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable], ids=["inputs", "dots"])
def test_integer_arguments_get_no_cotangent(saveable) -> None:
    fn = remat_after_cotangent(lambda w, x, k: jnp.tanh(x @ w) * k, saveable)
    w, x = jnp.ones((3, 2)), jnp.arange(6.0).reshape(2, 3)
    grads = jax.grad(lambda w, x: jnp.sum(fn(w, x, jnp.int32(2))), argnums=(0, 1))(w, x)
    expected = jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) * 2), argnums=(0, 1))(w, x)
    _assert_trees_close(grads, expected)


def _stage_temp_bytes(remat: bool, policy: str = "inputs") -> int:
    """Compiled temporaries (bytes) of the gradient of a 4-block stage, D = 32, 2x16x32 grid."""
    stage = SwinStage(depth=4, num_heads=2, window_size=WINDOW, mlp_ratio=4.0, remat=remat, remat_policy=policy)
    x = jax.ShapeDtypeStruct((1, int(np.prod(RES)), 32), jnp.float32)
    c = jnp.zeros((1, 32))
    params = jax.eval_shape(lambda: stage.init(jax.random.key(0), jnp.zeros(x.shape), c, RES, (0, 0, 0), 0))

    def loss(params, x):
        return jnp.sum(stage.apply(params, x, c, RES, (0, 0, 0), 0)[0] ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_remat_cuts_compiled_temp_memory() -> None:
    """Four blocks' activations (~19 MB) against one block's plus the saved inputs (~6 MB)."""
    plain, remat = _stage_temp_bytes(False), _stage_temp_bytes(True)
    assert remat < 0.5 * plain, (plain, remat)


def test_dots_policy_keeps_more_than_inputs_and_less_than_everything() -> None:
    """``remat_policy="dots"`` keeps the linear layers' outputs: between the two."""
    plain, inputs, dots = _stage_temp_bytes(False), _stage_temp_bytes(True), _stage_temp_bytes(True, "dots")
    assert inputs < dots < plain, (inputs, dots, plain)


def test_training_config_knows_the_model_policies() -> None:
    """aurora_loop.config (below the model in the layers) spells the choices out itself."""
    from aurora_loop.config import TrainingConfig, validate

    for policy in REMAT_POLICIES:
        validate(TrainingConfig(output_dir="o", remat=True, remat_policy=policy))


@pytest.mark.parametrize("remat, policy", [(False, "inputs"), (True, "inputs"), (True, "dots")])
def test_scanned_blocks_match_the_unrolled_stage(remat, policy) -> None:
    """``scan_blocks``: five blocks as two scanned (unshifted, shifted) pairs and a last block,
    with LoRA per traced roll-out step, with and without remat: the same output and gradients
    as the plain unrolled stage, from the same parameter tree."""
    x = _random_like(jax.ShapeDtypeStruct((1, int(np.prod(RES)), 16), jnp.float32), seed=1, scale=1.0)
    c = _random_like(jax.ShapeDtypeStruct((1, 16), jnp.float32), seed=2, scale=1.0)
    common = dict(depth=5, num_heads=2, window_size=WINDOW, mlp_ratio=4.0, use_lora=True, lora_steps=3, lora_mode="all",
                  remat=remat, remat_policy=policy)
    params = _random_like(jax.eval_shape(lambda: SwinStage(**common).init(jax.random.key(0), x, c, RES, (0, 0, 0), 1)))
    scanned = SwinStage(**common, scan_blocks=True)
    assert jax.tree_util.tree_structure(jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, c, RES, (0, 0, 0), 1))) == \
        jax.tree_util.tree_structure(params)

    def value_and_grads(stage: SwinStage):
        def total(params, x, c):
            return jnp.sum(stage.apply(params, x, c, RES, (0, 0, 0), jnp.int32(1))[0] ** 2)

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)(params, x, c)

    jaxpr = str(jax.make_jaxpr(lambda p: scanned.apply(p, x, c, RES, (0, 0, 0), jnp.int32(1)))(params))
    assert jaxpr.count("scan[") == 1 and jaxpr.count("length=2") == 1  # the two pairs in one loop
    plain = SwinStage(**{**common, "remat": False})
    (value, grads), (value_s, grads_s) = value_and_grads(plain), value_and_grads(scanned)
    np.testing.assert_allclose(float(value_s), float(value), rtol=1e-6)
    _assert_trees_close(grads_s, grads)
