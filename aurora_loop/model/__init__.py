"""Aurora in Flax, with a facade that mirrors the PyTorch reference (``microsoft-aurora``).

    from aurora_loop.model import AuroraConfig, Batch, Metadata, load_reference_params, rollout

    config = AuroraConfig.preset("small")          # or AuroraConfig(**reference_kwargs)
    params = load_reference_params(config, state_dict)   # name -> numpy array, either layout
    prediction = apply(config, params, batch)      # one 6-hour step, pure and jittable
    for prediction in rollout(config, params, batch, steps=4):
        ...

To compare with the reference exactly, feed it the reference's patch areas (float32
``torch.sin`` differs by an ulp from one CPU to the next, and the scale encoding turns one
ulp into a different forecast): ``rollout(..., known_grid=KnownGrid(lat, lon, root_area=areas))``.
"""

from aurora_loop.model.aurora import AuroraModule, apply, init_params, next_input, rollout
from aurora_loop.model.batch import Batch, Metadata, Sample, stack_samples
from aurora_loop.model.checkpoint import CheckpointError, load_params, load_reference_params, save_params
from aurora_loop.model.config import AuroraConfig
from aurora_loop.model.posenc import KnownGrid

__all__ = [
    "AuroraConfig",
    "AuroraModule",
    "Batch",
    "CheckpointError",
    "KnownGrid",
    "Metadata",
    "Sample",
    "apply",
    "init_params",
    "load_params",
    "load_reference_params",
    "next_input",
    "rollout",
    "save_params",
    "stack_samples",
]
