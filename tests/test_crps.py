"""Ensemble scores: the fair CRPS is unbiased, spread/skill is 1 when calibrated, and the
per-field scores follow weather_errors' names and weighting, under jit and sharding too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from scipy import stats

from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import DATA_AXIS, make_mesh
from aurora_loop.weather.crps import (
    crps_ensemble,
    ensemble_scores,
    fair_crps,
    pairwise_abs_sum,
    spread_skill,
    spread_skill_ratio,
    spread_skill_ratios,
)
from aurora_loop.weather.metrics import MeanMetrics, latitude_weights, weather_errors
from tests.synthetic import make_samples


def gaussian_crps(mu, sigma, y):
    """Exact CRPS of N(mu, sigma^2) at y (Gneiting et al. 2005)."""
    z = (y - mu) / sigma
    return sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_degenerate_ensemble_scores_its_mae():
    rng = np.random.default_rng(0)
    forecast = rng.normal(size=(3, 6, 10)).astype(np.float32)
    target = rng.normal(size=(3, 6, 10)).astype(np.float32)
    weights = latitude_weights(np.linspace(75, -75, 6))[:, None]
    ensemble = np.broadcast_to(forecast, (4, *forecast.shape))
    mae = np.mean(np.abs(forecast - target) * np.asarray(weights), axis=(1, 2))
    np.testing.assert_allclose(fair_crps(ensemble, target, weights), mae, rtol=1e-6)
    np.testing.assert_allclose(crps_ensemble(ensemble, target, weights), mae, rtol=1e-6)
    spread_var, mse_of_mean = spread_skill(ensemble, target, weights)
    np.testing.assert_allclose(spread_var, 0.0, atol=1e-7)
    np.testing.assert_allclose(mse_of_mean, np.mean((forecast - target) ** 2 * np.asarray(weights), axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("members", [2, 4])
def test_fair_crps_is_unbiased_and_plain_is_not(members):
    """Members drawn from N(mu, sigma^2) at 400k independent points: the mean fair CRPS is the
    exact Gaussian CRPS; the plain estimator is off by sigma / (M sqrt(pi)) on average."""
    rng = np.random.default_rng(members)
    n, mu, sigma = 100_000, 0.3, 1.7
    y = rng.uniform(-3.0, 4.0, size=(4, n))
    ensemble = (mu + sigma * rng.standard_normal((members, 4, n))).astype(np.float32)
    exact = float(np.mean(gaussian_crps(mu, sigma, y)))
    fair = float(np.mean(fair_crps(ensemble, y.astype(np.float32))))
    plain = float(np.mean(crps_ensemble(ensemble, y.astype(np.float32))))
    assert fair == pytest.approx(exact, rel=0.01)
    assert plain == pytest.approx(exact + sigma / (members * np.sqrt(np.pi)), rel=0.01)
    if members == 2:
        assert plain > 1.05 * exact


def test_sorted_pairwise_sum_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 7, 4)).astype(np.float32)
    brute = np.sum(np.abs(x[:, None] - x[None, :]), axis=(0, 1))
    np.testing.assert_allclose(pairwise_abs_sum(jnp.asarray(x)), brute, rtol=1e-5, atol=1e-5)
    # ... and through fair_crps / crps_ensemble, and their gradients (the training loss).
    y = rng.normal(size=x.shape[1:]).astype(np.float32)

    def brute_fair(ens):
        pairs = jnp.sum(jnp.abs(ens[:, None] - ens[None, :]), axis=(0, 1))
        return jnp.mean(jnp.mean(jnp.abs(ens - y), axis=0) - pairs / (2 * 5 * 4), axis=(1, 2))

    np.testing.assert_allclose(fair_crps(x, y), brute_fair(jnp.asarray(x)), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda e: jnp.sum(fair_crps(e, y)))(jnp.asarray(x))
    np.testing.assert_allclose(grad, jax.grad(lambda e: jnp.sum(brute_fair(e)))(jnp.asarray(x)), rtol=1e-5, atol=1e-7)


def test_one_member_is_refused():
    with pytest.raises(ValueError, match="at least 2 members"):
        fair_crps(np.zeros((1, 2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 members"):
        spread_skill(np.zeros((1, 2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="target has shape"):
        fair_crps(np.zeros((3, 2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("members", [4, 10])
def test_spread_skill_ratio_is_one_when_calibrated(members):
    """Target and members exchangeable draws around a common signal: ratio 1 (the
    uncorrected ratio would be sqrt(M / (M + 1)): 0.894 at M = 4, 0.953 at M = 10); members
    with half the spread: clearly below 1."""
    rng = np.random.default_rng(10 + members)
    b, n, sigma = 4, 50_000, 2.0
    signal = 5.0 * rng.standard_normal((b, n))
    target = (signal + sigma * rng.standard_normal((b, n))).astype(np.float32)
    noise = sigma * rng.standard_normal((members, b, n))
    ratios = {}
    for label, scale in (("calibrated", 1.0), ("narrow", 0.5)):
        spread_var, mse_of_mean = spread_skill((signal + scale * noise).astype(np.float32), target)
        metric = MeanMetrics.from_values({f"spread_var/{label}": spread_var, f"mse_of_mean/{label}": mse_of_mean, "crps/x": jnp.zeros(b)})
        computed = metric.compute()
        ratios = spread_skill_ratios(computed, members)
        assert set(ratios) == set(computed) | {f"spread_skill/{label}"}
        assert all(ratios[k] == v for k, v in computed.items())
        ratio = ratios[f"spread_skill/{label}"]
        if label == "calibrated":
            assert ratio == pytest.approx(1.0, abs=0.02)
        else:
            # sqrt((M + 1) / M * 0.25 / (1 + 0.25 / M)) = 0.54 at M = 4, 0.52 at M = 10
            assert ratio < 0.6


def test_spread_skill_ratios_keeps_prefixes_and_suffixes():
    computed = {"val/spread_var/z500/12h": 3.0, "val/mse_of_mean/z500/12h": 5.0, "spread_var/2t": 1.0, "loss": 0.5}
    out = spread_skill_ratios(computed, 3)
    assert out["val/spread_skill/z500/12h"] == pytest.approx(np.sqrt(4 / 3 * 3 / 5))
    assert "spread_skill/2t" not in out  # no mse_of_mean/2t partner
    assert {k: out[k] for k in computed} == computed
    assert spread_skill_ratio(1.0, 0.0, 3) == np.inf
    assert np.isnan(spread_skill_ratio(0.0, 0.0, 3))


def test_latitude_weights_discount_polar_errors():
    lat = np.linspace(90, -90, 19)
    target = np.zeros((2, 19, 8), np.float32)
    ensemble = np.zeros((3, 2, 19, 8), np.float32)
    ensemble[:, :, [0, -1]] = np.array([1.0, 2.0, 4.0])[:, None, None, None]  # wrong only at the poles
    weights = latitude_weights(lat)[:, None]
    weighted, plain = fair_crps(ensemble, target, weights), fair_crps(ensemble, target)
    assert np.all(np.asarray(plain) > 0)
    assert np.all(np.asarray(weighted) < 0.2 * np.asarray(plain))
    # Weights that do not average 1 are normalised: only their ratios matter.
    np.testing.assert_allclose(fair_crps(ensemble, target, 7.0 * weights), weighted, rtol=1e-6)
    # ensemble_scores(lat=...) is the same as passing latitude_weights.
    scores = ensemble_scores({"x": ensemble}, {"x": target}, lat=lat)
    np.testing.assert_allclose(scores["crps/x"], weighted, rtol=1e-6)


@pytest.fixture(scope="module")
def forecast():
    """A target Batch (b = 4, t = 1), a prediction a little off it, and a 3-member ensemble
    around the prediction as per-field dicts (members first, no time axis)."""
    targets = stack_samples(make_samples(4, grid=(8, 16), seed=5)).targets
    rng = np.random.default_rng(2)
    perturb = lambda v: v + (0.01 * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(np.float32)  # noqa: E731
    prediction = jax.tree.map(np.asarray, targets)
    prediction = type(targets)(
        surf_vars={k: perturb(v) for k, v in prediction.surf_vars.items()},
        static_vars=prediction.static_vars,
        atmos_vars={k: perturb(v) for k, v in prediction.atmos_vars.items()},
        metadata=targets.metadata,
    )
    truth = {k: np.asarray(v)[:, 0] for k, v in {**targets.surf_vars, **targets.atmos_vars}.items()}
    mean = {k: np.asarray(v)[:, 0] for k, v in {**prediction.surf_vars, **prediction.atmos_vars}.items()}
    members = {k: np.stack([perturb(v) for _ in range(3)]) for k, v in mean.items()}
    return targets, prediction, truth, mean, members


def test_ensemble_scores_names_and_weighting_match_weather_errors(forecast):
    targets, prediction, truth, mean, members = forecast
    levels = targets.metadata.atmos_levels
    errors = weather_errors(prediction, targets)
    # A degenerate ensemble (every member the prediction): crps/<f> == mae/<f>, mse_of_mean/<f> == rmse/<f>.
    degenerate = {k: np.stack([v] * 3) for k, v in mean.items()}
    scores = ensemble_scores(degenerate, truth, lat=targets.metadata.lat, levels=levels)
    fields = {k.split("/", 1)[1] for k in errors if k.startswith("mae/")}
    assert {"2t", "msl", "z500", "z850", "t500", "t850"} == fields
    for kind in ("crps", "spread_var", "mse_of_mean"):
        assert {k.split("/", 1)[1] for k in scores if k.startswith(f"{kind}/")} == fields
    for name in fields:
        assert scores[f"crps/{name}"].shape == (4,)
        np.testing.assert_allclose(scores[f"crps/{name}"], errors[f"mae/{name}"], rtol=1e-5)
        np.testing.assert_allclose(scores[f"mse_of_mean/{name}"], errors[f"rmse/{name}"], rtol=1e-5)
    # The spread of a real ensemble shows up, and levels are split in order.
    spread = ensemble_scores(members, truth, lat=targets.metadata.lat, levels=levels)
    assert np.all(np.asarray(spread["spread_var/z850"]) > 0)
    lat_weights = latitude_weights(targets.metadata.lat)[:, None]
    np.testing.assert_allclose(spread["crps/z850"], fair_crps(members["z"][:, :, 1], truth["z"][:, 1], lat_weights), rtol=1e-6)
    with pytest.raises(ValueError, match="levels"):
        ensemble_scores(members, truth, levels=(500,))


def test_jit_with_sharded_batch_matches_unsharded(forecast):
    targets, _, truth, _, members = forecast
    mesh = make_mesh(4)
    lat, levels = np.asarray(targets.metadata.lat), targets.metadata.atmos_levels
    score = jax.jit(lambda m, t: ensemble_scores(m, t, lat=lat, levels=levels))
    sharded = score(
        jax.device_put(members, NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))),
        jax.device_put(truth, NamedSharding(mesh, PartitionSpec(DATA_AXIS))),
    )
    plain = ensemble_scores(members, truth, lat=lat, levels=levels)
    assert set(sharded) == set(plain)
    for name, value in sharded.items():
        assert len(value.sharding.device_set) == 4
        np.testing.assert_allclose(value, plain[name], rtol=1e-5, err_msg=name)
