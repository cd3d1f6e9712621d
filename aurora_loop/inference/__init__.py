"""Using a trained run.

- :mod:`~aurora_loop.inference.runs`: which checkpoint of a run (latest, best, step N) and
  its weights alone (``params`` or ``ema_params``, never the optimizer state);
- forecasting into a WeatherBench2 store: the driver :mod:`~aurora_loop.inference.forecast`,
  with :mod:`~aurora_loop.inference.times` (initial times, model step, lead times),
  :mod:`~aurora_loop.inference.inputs` (the model inputs from a store),
  :mod:`~aurora_loop.inference.noise` (a stochastic model's noise) and
  :mod:`~aurora_loop.inference.writer` (the store);
- scoring forecasts: :mod:`~aurora_loop.inference.evaluation` and its
  :mod:`~aurora_loop.inference.report`.
"""
