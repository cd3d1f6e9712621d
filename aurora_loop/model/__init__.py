"""Aurora in Flax, with a facade that mirrors the PyTorch reference."""

from aurora_loop.model.batch import Batch, Metadata, Sample

__all__ = ["Batch", "Metadata", "Sample"]
