"""Numerical parity with the PyTorch reference (microsoft-aurora 2.0.1) on the tiny fixture.

Criterion: mean|ours - reference| / mean|reference| per variable and roll-out step, and for
the encoder and backbone outputs of the first step; <= 1e-5 with x64, <= 2e-3 in float32.

Two reference outputs are used (see tests/fixtures/README.md): ``aurora_tiny_local.npz``,
the reference rerun on the fixture's parameters and inputs on this machine type, and the
shipped ``aurora_tiny.npz``. The shipped outputs were produced by a reference whose float32
patch areas differ by one ulp in 28 of 128 patches from what the reference computes here
(and what we compute); the scale encoding's finest wavelengths turn that ulp into ~1e-2
output differences, so the shipped outputs cannot be met by any port that follows the
reference's arithmetic on this machine, including the reference itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model import load_reference_params, rollout
from tests.fixtures import aurora_data as fx


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).mean() / np.abs(ref).mean())


@functools.lru_cache(maxsize=2)
def _run(x64: bool) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Our roll-out on the fixture: (first-step taps, per-step fields), as numpy."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        data = fx.load()
        cfg = fx.config(data)
        params = load_reference_params(cfg, fx.state_dict(data))
        params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64 if x64 else jnp.float32), params)
        taps, steps = {}, []
        for k, (pred, step_taps) in enumerate(rollout(cfg, params, fx.batch(data), fx.meta(data)["steps"], intermediates=True)):
            if k == 0:
                taps = {name: np.asarray(v) for name, v in step_taps.items()}
            fields = {f"surf/{n}": np.asarray(v) for n, v in pred.surf_vars.items()}
            fields.update({f"atmos/{n}": np.asarray(v) for n, v in pred.atmos_vars.items()})
            fields["lat"] = np.asarray(pred.metadata.lat)
            steps.append(fields)
        return taps, steps
    finally:
        jax.config.update("jax_enable_x64", previous)


def _errors(x64: bool, reference: str) -> dict[str, float]:
    taps, steps = _run(x64)
    ref = fx.load(reference)
    errors = {f"tap/{k}": _relative(v, ref[f"tap/step1/{k}"]) for k, v in taps.items()}
    for k, fields in enumerate(steps, 1):
        for name, value in fields.items():
            if name != "lat":
                errors[f"step{k}/{name}"] = _relative(value, ref[f"out/step{k}/{name}"])
    return errors


def test_every_output_is_compared() -> None:
    _, steps = _run(False)
    data = fx.load()
    assert len(steps) == fx.meta(data)["steps"] == 2
    expected = {k[len("out/step1/"):] for k in data.files if k.startswith("out/step1/")}
    assert set(steps[0]) == expected
    for k, fields in enumerate(steps, 1):
        np.testing.assert_array_equal(fields["lat"], data[f"out/step{k}/lat"])
        for name, value in fields.items():
            assert value.shape == data[f"out/step{k}/{name}"].shape, name


def test_parity_x64() -> None:
    errors = _errors(True, fx.LOCAL)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: {errors[worst]:.3e}"


def test_parity_float32() -> None:
    errors = _errors(False, fx.LOCAL)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2e-3, f"{worst}: {errors[worst]:.3e}"


def test_float32_close_to_x64() -> None:
    """Our float32 run tracks our float64 run (the Fourier phases are reduced exactly)."""
    taps32, steps32 = _run(False)
    taps64, steps64 = _run(True)
    assert _relative(taps32["encoder"], taps64["encoder"]) < 1e-5
    for s32, s64 in zip(steps32, steps64):
        for name in s32:
            assert _relative(s32[name], s64[name]) < 1e-3, name


@pytest.mark.xfail(strict=True, reason="the shipped outputs come from float32 patch areas one ulp off in 28 patches; see module docstring")
def test_parity_x64_shipped_fixture() -> None:
    errors = _errors(True, fx.SHARED)
    assert max(errors.values()) <= 1e-5


def test_shipped_fixture_differs_only_by_the_scale_encoding() -> None:
    """Against the shipped fixture our encoder output differs, per patch, by one vector shared
    by every example and latent level (an encoding of the patch, not of the data), and is
    exact on the other patches."""
    taps, _ = _run(True)
    ref = fx.load(fx.SHARED)["tap/step1/encoder"]
    b, tokens, d = ref.shape
    diff = (taps["encoder"] - ref).reshape(b, 2, tokens // 2, d)
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:1, :1], diff.shape), atol=1e-8)
    per_patch = np.abs(diff[0, 0]).max(axis=-1)
    assert np.sum(per_patch < 1e-6) == 100  # the other 28 patches carry the one-ulp area difference
    assert np.all(per_patch[per_patch >= 1e-6] > 1e-3)
