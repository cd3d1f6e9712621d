"""``v1p5_ensemble`` / ``v1p5_ensemble_tiny``: Aurora 1.5's ensemble, trained with the fair CRPS.

The reference's ensemble (``aurora.AuroraV1p5Ensemble``) injects noise into the backbone's
conditioning; what it learns is a distribution, so it trains on an ensemble score rather
than on the error of one forecast. Every example is forecast ``--ensemble_members M`` times
with independent noise (members sit next to their example in the batch, so they are split
over the mesh exactly like the examples), and the loss is the paper's variable weighting
applied to the fair CRPS over the members (:class:`aurora_loop.weather.losses.WeightedCRPS`), which
for M identical members is the deterministic model's weighted MAE. Fresh noise is drawn for
every roll-out step, as the reference's roll-out does once its accumulation window is one
main step.

Validation reports, per variable (and level): ``crps/<field>`` (latitude-weighted fair CRPS,
physical units), ``spread_skill/<field>`` (1 for a calibrated ensemble), and the ensemble
mean's ``mae/<field>`` / ``rmse/<field>`` (per lead time too), next to ``loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from aurora_loop.errors import UsageError
from aurora_loop.model.batch import Batch, Sample
from aurora_loop.task import register_task
from aurora_loop.tasks.aurora import AuroraTask, build_aurora_task
from aurora_loop.weather.crps import MSE_OF_MEAN, SPREAD_VAR, ensemble_scores, spread_skill_ratios
from aurora_loop.weather.losses import WeightedCRPS
from aurora_loop.weather.metrics import MeanMetrics, per_field, weather_errors
from aurora_loop.weather.rollout import rollout_scan

_MEMBERS_KEY = "ensemble_members"


@flax.struct.dataclass
class EnsembleMetrics(MeanMetrics):
    """:class:`MeanMetrics` whose report turns the merged spread and skill means into
    ``spread_skill/<field>`` (:func:`aurora_loop.weather.crps.spread_skill_ratios`)."""

    def compute(self) -> dict:
        out = super().compute()
        members = int(round(out.pop(_MEMBERS_KEY, 0)))
        out = spread_skill_ratios(out, members) if members >= 2 else out
        return {k: v for k, v in out.items() if k.split("/", 1)[0] not in (SPREAD_VAR, MSE_OF_MEAN)}


def repeat_members(sample: Sample, members: int) -> Sample:
    """Every example ``members`` times, next to each other: per-example leaves (fields,
    times, lead times) (b, ...) -> (b * members, ...); grids and static fields stay."""

    def batch(b: Batch) -> Batch:
        rep = lambda v: jnp.repeat(v, members, axis=0)  # noqa: E731
        return b.replace(
            surf_vars={k: rep(v) for k, v in b.surf_vars.items()},
            atmos_vars={k: rep(v) for k, v in b.atmos_vars.items()},
            metadata=b.metadata.replace(time=rep(jnp.asarray(b.metadata.time))),
        )

    lead = None if sample.lead_hours is None else jnp.repeat(jnp.asarray(sample.lead_hours), members, axis=0)
    return Sample(batch(sample.inputs), batch(sample.targets), lead)


class EnsembleAuroraTask(AuroraTask):
    """An :class:`AuroraTask` for a stochastic config, scored over ``members`` noise draws."""

    def __init__(self, config: Any, members: int = 2, **kwargs: Any) -> None:
        if not config.stochastic:
            raise UsageError("the ensemble task needs a stochastic model (v1p5_ensemble)")
        if members < 2:
            raise UsageError(f"the ensemble task trains with the fair CRPS over several members: pass --ensemble_members M "
                             f"with M >= 2 (got {members})")
        if kwargs.get("rollout_mode") == "replay":
            # Replay's buffer rolls one sample on per step with the task's deterministic
            # predictor; it has no member axis and no fresh noise per step.
            raise UsageError("the ensemble task does not train in --rollout_mode replay; use full or pushforward")
        super().__init__(config, **kwargs)
        self.members = members
        fields = {f.name: getattr(self.loss_fn, f.name) for f in dataclasses.fields(self.loss_fn)}
        self.crps = WeightedCRPS(**{**fields, "members": members})

    def _training_sample(self, batch: Sample) -> Sample:
        return repeat_members(self._crop(batch), self.members)

    def _step_loss(self, prediction: Batch, target: Batch) -> jax.Array:
        return jnp.mean(self.crps(prediction, target, self.config.surf_stats_dict))

    def evaluate(self, params: Any, batch: Sample) -> EnsembleMetrics:
        """``loss`` (the CRPS loss), ``crps/<field>``, ``spread_skill/<field>`` and the
        ensemble mean's ``mae/`` / ``rmse/`` scores, averaged over the roll-out's steps (and
        per lead time for mae/rmse). The noise comes from a fixed key: reproducible."""
        batch = self._crop(batch)
        m = self.members
        ensemble = repeat_members(batch, m)

        def per_step(prediction: Batch, target: Batch) -> dict[str, jax.Array]:
            truth = jax.tree.map(lambda v: v[::m], per_field(target))
            members = {k: v.reshape(-1, m, *v.shape[1:]).swapaxes(0, 1) for k, v in per_field(prediction).items() if k in truth}
            mean = prediction.replace(
                surf_vars={k: v.reshape(-1, m, *v.shape[1:]).mean(axis=1) for k, v in prediction.surf_vars.items()},
                atmos_vars={k: v.reshape(-1, m, *v.shape[1:]).mean(axis=1) for k, v in prediction.atmos_vars.items()},
                metadata=prediction.metadata.replace(time=jnp.asarray(prediction.metadata.time)[::m]),
            )
            one = target.replace(surf_vars={k: v[::m] for k, v in target.surf_vars.items()},
                                 atmos_vars={k: v[::m] for k, v in target.atmos_vars.items()},
                                 metadata=target.metadata.replace(time=jnp.asarray(target.metadata.time)[::m]))
            return {
                "loss": self.crps(prediction, target, self.config.surf_stats_dict),
                **ensemble_scores(members, truth, lat=target.metadata.lat),
                **weather_errors(mean, one),
                _MEMBERS_KEY: jnp.full(truth[next(iter(truth))].shape[:1], float(m)),
            }

        scores = rollout_scan(self._predict_fn(params, ensemble, jax.random.key(1)), ensemble, per_step, feed_back=self._feed_back)
        return EnsembleMetrics.from_rollout(scores, self.config.timestep_hours)


def _factory(preset: str):
    def make(config: Any) -> EnsembleAuroraTask:
        members = int(getattr(config, "ensemble_members", 1) or 1)
        return build_aurora_task(preset, config, EnsembleAuroraTask, members=members)

    return make


for _preset in ("v1p5_ensemble", "v1p5_ensemble_tiny"):
    register_task(_preset)(_factory(_preset))
