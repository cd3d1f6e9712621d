"""Aurora 1.5 and its ensemble against the PyTorch reference (``microsoft-aurora`` 2.0.1).

The fixtures (``tests/fixtures/aurora_v1p5_tiny.npz``, ``aurora_v1p5_ensemble_tiny.npz``;
see the README beside them) hold a small ``AuroraV1p5`` / ``AuroraV1p5Ensemble`` with random
weights, a batch of 2 on a 32 x 64 grid, the reference's patch areas and, for the ensemble,
the noise its backbone fed its noise MLP in every forward pass. Every prediction of the
roll-out (sub-steps included, output-only variables included) is compared.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model import AuroraConfig, Batch, KnownGrid, Metadata, apply, load_reference_params, rollout
from aurora_loop.model.aurora import NoiseStream, clip_rollout_inputs, noise_shape
from aurora_loop.model.checkpoint import CheckpointError
from aurora_loop.model.insolation import insolation_jax, insolation_numpy

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("aurora_v1p5_tiny", "aurora_v1p5_ensemble_tiny")
PRESET = {"AuroraV1p5": "v1p5", "AuroraV1p5Ensemble": "v1p5_ensemble"}


@functools.lru_cache(maxsize=2)
def _fixture(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as data:
        return {k: data[k] for k in data.files}


def _meta(data: dict) -> dict:
    return json.loads(bytes(data["meta_json"]).decode())


def _config(data: dict) -> AuroraConfig:
    meta = _meta(data)
    return AuroraConfig.preset(PRESET[meta["reference_class"]], **meta["model"])


def _state(data: dict) -> dict[str, np.ndarray]:
    return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}


def _batch(data: dict) -> Batch:
    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}

    meta = _meta(data)
    return Batch(group("in/surf/"), group("in/static/"), group("in/atmos/"),
                 Metadata(lat=data["in/lat"], lon=data["in/lon"], time=[dt.datetime.fromisoformat(t) for t in meta["time"]],
                          atmos_levels=tuple(meta["levels"])))


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(ours, np.float64) - ref)) / np.mean(np.abs(ref)))


@functools.lru_cache(maxsize=4)
def _errors(name: str, x64: bool) -> tuple[dict[str, float], list[list[str]]]:
    """Relative error of every field of every prediction, and our predictions' valid times."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        data = _fixture(name)
        meta = _meta(data)
        cfg = _config(data)
        params = load_reference_params(cfg, _state(data))
        params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64 if x64 else jnp.float32), params)
        known = KnownGrid(data["in/lat"], data["in/lon"], root_area=data["ref/root_area"])
        noise = [data[f"ref/noise/{k}"] for k in range(meta["predictions"])] if cfg.stochastic else None
        errors, times = {}, []
        preds = rollout(cfg, params, _batch(data), meta["steps"], fine_lead_times=meta["fine_lead_times"], noise=noise, known_grid=known)
        for k, pred in enumerate(preds, 1):
            times.append([t.isoformat() for t in pred.metadata.datetimes])
            for group, fields in (("surf", pred.surf_vars), ("atmos", pred.atmos_vars)):
                for var, value in fields.items():
                    errors[f"pred{k}/{group}/{var}"] = _relative(value, data[f"out/pred{k}/{group}/{var}"])
        return errors, times
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name", NAMES)
def test_every_prediction_and_variable_is_compared(name: str) -> None:
    data = _fixture(name)
    meta = _meta(data)
    errors, times = _errors(name, False)
    expected = {k[len("out/"):] for k in data if k.startswith("out/pred") and "/time" not in k}
    assert set(errors) == expected and len(times) == meta["predictions"] == meta["steps"] * len(meta["fine_lead_times"])
    assert {f"pred1/surf/{v}" for v in meta["output_only_surf_vars"]} <= set(errors)
    for k, ours in enumerate(times, 1):
        assert ours == json.loads(bytes(data[f"out/pred{k}/time"]).decode())


@pytest.mark.parametrize("precision, x64, limit", [("x64", True, 1e-5), ("float32", False, 2e-3)])
@pytest.mark.parametrize("name", NAMES)
def test_parity(name: str, precision: str, x64: bool, limit: float) -> None:
    errors, _ = _errors(name, x64)
    worst = max(errors, key=errors.get)
    print(f"{name} {precision}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= limit, (worst, errors[worst])


def _fused(cfg: AuroraConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The published 1.5 checkpoints' layout (``aurora.model.compat._adapt_checkpoint_v1p5``
    reads it): ``net.`` prefix, one embedding over surface then static variables, fused heads
    whose rows are (pixel, variable)."""
    state = dict(state)
    out = {}
    for part, names in (("surf", cfg.surf_vars + cfg.static_vars), ("atmos", cfg.atmos_vars)):
        out[f"encoder.{part}_token_embeds.weight"] = np.concatenate(
            [state.pop(f"encoder.{part}_token_embeds.weights.{n}") for n in names], axis=1)
    for part, names in (("surf", cfg.surf_vars), ("atmos", cfg.atmos_vars)):
        weight = np.stack([state.pop(f"decoder.{part}_heads.{n}.weight") for n in names], axis=1)
        bias = np.stack([state.pop(f"decoder.{part}_heads.{n}.bias") for n in names], axis=1)
        out[f"decoder.{part}_head.weight"] = weight.reshape(-1, weight.shape[-1])
        out[f"decoder.{part}_head.bias"] = bias.reshape(-1)
    out.update(state)
    return {f"net.{k}": v for k, v in out.items()}


def test_published_fused_layout_loads_to_the_same_parameters() -> None:
    data = _fixture("aurora_v1p5_ensemble_tiny")
    cfg = _config(data)
    named = load_reference_params(cfg, _state(data))
    fused = load_reference_params(cfg, _fused(cfg, _state(data)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, named, fused)
    assert "noise_mlp" in named["backbone"] and "context_down_layers_1" in named["backbone"]
    with pytest.raises(CheckpointError, match="unexpected parameter backbone/context_down_layers_0"):  # a deterministic model has none
        load_reference_params(cfg.replace(stochastic=False), _state(data))


def test_presets_follow_the_reference_classes() -> None:
    v1p5 = AuroraConfig.preset("v1p5")
    assert len(v1p5.surf_vars) == 26 and len(v1p5.output_only_surf_vars) == 7 and len(v1p5.static_vars) == 36
    assert v1p5.variable_lead_time and v1p5.use_updated_lead_time_embedding and not v1p5.use_lora and not v1p5.stochastic
    assert v1p5.input_surf_vars[-1] == "insolation" and "scaled_tp_1h" not in v1p5.input_surf_vars
    assert AuroraConfig.preset("v1p5_ensemble").stochastic
    # As in AuroraV1p5, a clipping override adds to the default bounds instead of replacing them.
    clipped = dict(AuroraConfig.preset("v1p5", rollout_input_clipping={"tcc": {"min": 0.1}}).rollout_input_clipping)
    assert clipped["tcc"] == (0.1, None) and clipped["swvl1"] == (0.0, 70.0)
    assert AuroraConfig.from_json(v1p5.to_json()) == v1p5
    with pytest.raises(ValueError, match="output_only_surf_vars"):
        AuroraConfig.preset("tiny", output_only_surf_vars=("tp",))


def test_insolation_in_the_graph_matches_the_host_formula() -> None:
    lat = np.linspace(90, -90, 16)
    lon = np.linspace(0, 360, 32, endpoint=False)
    hours = np.array([438288.0, 442999.0, 473082.0, 253491.0, 438288.0 + 24 * 366 - 1])  # 2020-01-01 .. 2020-12-31T23
    host = insolation_numpy(hours, lat, lon)
    traced = np.asarray(jax.jit(insolation_jax)(jnp.asarray(hours, jnp.float32), lat, lon))
    np.testing.assert_allclose(traced, host, atol=1e-6)
    assert host.min() < -0.5 and host.max() > 0.9  # night and day both present


def test_noise_accumulation_mixes_the_latest_draws() -> None:
    """With accumulation over n passes, pass k sees (draw_k + ... + draw_{k+n-1}) / sqrt(n)
    over a cache of the n newest draws, as the reference's backbone does."""
    stream = NoiseStream(jax.random.key(0), (3,), jnp.float32, accumulate=2)
    first, second = stream.next(), stream.next()
    rng = jax.random.key(0)
    draws = []
    for _ in range(3):
        rng, key = jax.random.split(rng)
        draws.append(jax.random.normal(key, (3,), jnp.float32))
    np.testing.assert_allclose(first, (draws[0] + draws[1]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(second, (draws[1] + draws[2]) / np.sqrt(2), rtol=1e-6)
    plain = NoiseStream(jax.random.key(0), (3,), jnp.float32)
    np.testing.assert_allclose(plain.next(), draws[0])


def test_ensemble_members_differ_by_their_noise_and_output_only_fields_are_not_read() -> None:
    data = _fixture("aurora_v1p5_ensemble_tiny")
    cfg = _config(data)
    params = load_reference_params(cfg, _state(data))
    batch = _batch(data)
    step = jax.jit(lambda b, key: apply(cfg, params, b, rng=key, lead_times=3.0))
    a, a_again, b = step(batch, jax.random.key(1)), step(batch, jax.random.key(1)), step(batch, jax.random.key(2))
    np.testing.assert_array_equal(a.surf_vars["2t"], a_again.surf_vars["2t"])
    assert np.abs(np.asarray(a.surf_vars["2t"]) - np.asarray(b.surf_vars["2t"])).max() > 1e-4
    assert set(a.surf_vars) == set(cfg.surf_vars) and float(np.asarray(a.metadata.time - batch.metadata.time)[0]) == 3.0
    # An output-only variable in the input is replaced by zeros after normalisation: its values do not matter.
    shape = batch.surf_vars["2t"].shape
    junk = batch.replace(surf_vars={**batch.surf_vars, "blh": np.full(shape, 1e4, np.float32)})
    # (to rounding: an output-only field the batch holds keeps its place in the embedding sum)
    np.testing.assert_allclose(step(junk, jax.random.key(1)).surf_vars["2t"], a.surf_vars["2t"], rtol=1e-6)
    assert noise_shape(cfg, batch) == data["ref/noise/0"].shape
    with pytest.raises(ValueError, match="noise= or rng="):
        apply(cfg, params, batch)


def test_clipping_bounds_the_fed_back_inputs_only() -> None:
    cfg = AuroraConfig.preset("v1p5_tiny")
    field = np.linspace(-1, 2, 8, dtype=np.float32).reshape(1, 1, 2, 4)
    pred = Batch({"tcc": field, "tcwv": field, "2t": field}, {}, {"t": field[:, :, None]},
                 Metadata(lat=np.array([10.0, -10.0]), lon=np.array([0.0, 90, 180, 270]), time=np.zeros(1)))
    clipped = clip_rollout_inputs(cfg, pred)
    np.testing.assert_array_equal(clipped.surf_vars["tcc"], np.clip(field, 0, 1))
    np.testing.assert_array_equal(clipped.surf_vars["tcwv"], np.maximum(field, 0))
    np.testing.assert_array_equal(clipped.surf_vars["2t"], field)
    assert clip_rollout_inputs(AuroraConfig.preset("tiny"), pred) is pred
