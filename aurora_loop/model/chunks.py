"""Run a per-token computation over chunks of tokens, so its temporaries scale with the chunk.

The Perceiver level aggregation (encoder) and de-aggregation (decoder) treat every patch on
its own: for each of the N = B * L patches, a few latent levels attend to the C pressure
levels. Done at once, every intermediate is (N, C, width): at 0.25° (N = 64 800 patches,
C = 13 levels) the decoder's MLP alone holds 6.4 GiB per float32 buffer, and its backward
pass needs about ten such buffers at once. :func:`map_token_chunks` runs the computation as
a loop over chunks of patches instead (``lax.map``); with ``remat`` each chunk is
rematerialised on its own in the backward pass, so only one chunk's intermediates are ever
alive. Rows are independent, so the result is that of the unchunked computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def chunk_layout(n: int, chunk_tokens: int) -> tuple[int, int]:
    """(chunks, rows per chunk) covering ``n`` rows with chunks of at most ``chunk_tokens``
    rows, as even as possible (so the padding is less than one row per chunk)."""
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return 1, n
    chunks = -(-n // chunk_tokens)
    return chunks, -(-n // chunks)


def map_token_chunks(fn: Callable[[Any, Array], Any], params: Any, x: Array, chunk_tokens: int, remat: bool) -> Any:
    """``fn(params, x)`` computed over chunks of ``x``'s leading axis.

    ``fn`` maps rows (n, ...) to a pytree of arrays with a leading axis of n, each row
    depending only on its own input row. ``chunk_tokens``: rows per chunk (0 or at least n:
    one call, no loop). ``remat``: keep only each chunk's input for the backward pass and
    recompute the chunk there (``jax.checkpoint`` inside the loop, so the recomputation of a
    chunk runs next to its backward pass). The last chunk is padded with zero rows, whose
    results are dropped.
    """
    n = x.shape[0]
    chunks, rows = chunk_layout(n, chunk_tokens)
    if chunks == 1:
        return fn(params, x)
    pad = chunks * rows - n
    padded = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
    body = jax.checkpoint(fn, prevent_cse=False) if remat else fn
    out = jax.lax.map(lambda part: body(params, part), padded.reshape(chunks, rows, *x.shape[1:]))
    return jax.tree_util.tree_map(lambda y: y.reshape(chunks * rows, *y.shape[2:])[:n], out)
