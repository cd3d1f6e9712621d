"""Forecast maps of a model that crops the grid: Aurora predicts 720 of 721 latitude rows."""

from __future__ import annotations

import numpy as np

from aurora_loop.callbacks.maps import forecast_maps, render_maps
from aurora_loop.model.batch import stack_samples
from tests.synthetic import make_samples


def test_maps_of_a_cropped_prediction_compare_like_with_like():
    target = stack_samples(make_samples(1, grid=(9, 16))).targets  # 9 rows: one over a multiple of 4
    cropped = target.crop(4)
    prediction = cropped.replace(surf_vars={k: v + 1.0 for k, v in cropped.surf_vars.items()})
    maps = forecast_maps(prediction, target, ["2t"])
    predicted, true = maps["2t"]
    assert predicted.shape == true.shape == (8, 16)
    np.testing.assert_allclose(predicted - true, 1.0, rtol=1e-6)  # the same rows, not shifted ones
    image = render_maps("2t", predicted, true, target.metadata.lat, target.metadata.lon, title="step 1")
    assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 0
