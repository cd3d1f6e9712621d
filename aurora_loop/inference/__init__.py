"""Using a trained run: reading its weights (:mod:`~aurora_loop.inference.runs`), forecasting
into a WeatherBench2 store, and scoring forecasts (evaluation and its report)."""
