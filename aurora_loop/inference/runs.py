"""Which weights of a saved TrainState to read: the moving average or the trained ones.

A run with ``--ema_decay`` saves ``ema_params`` next to ``params``. ``export-checkpoint``,
``aurora-loop forecast`` and ``evaluate`` read the average by default (``--weights auto``),
since that is what the run validated with; ``--weights raw`` reads ``params``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aurora_loop.errors import UsageError

WEIGHT_CHOICES = ("auto", "ema", "raw")
WEIGHTS_HELP = ("which weights of a run that kept a moving average (--ema_decay) to use: auto (the average when there is one, "
                "else the trained weights), ema (the average; an error without one) or raw (the trained weights)")


def _saved_tree(checkpointer: Any, state_dir: str) -> Any:
    metadata = checkpointer.metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def weights_key(tree: Mapping[str, Any], weights: str, where: str) -> str:
    """``"ema_params"`` or ``"params"``: the subtree of a saved state ``weights`` names."""
    has_ema = isinstance(tree.get("ema_params"), Mapping) and bool(tree["ema_params"])
    if weights not in WEIGHT_CHOICES:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if weights == "ema" and not has_ema:
        raise UsageError(f"{where} holds no moving average of the weights (the run had no --ema_decay); use --weights raw or auto")
    return "ema_params" if has_ema and weights != "raw" else "params"


def restore_state_weights(state_dir: str, weights: str = "auto") -> tuple[Any, str]:
    """(the chosen weights of the TrainState saved in ``state_dir`` as numpy arrays, the
    subtree read: ``ema_params`` or ``params``). Only that subtree is read from disk."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a step's item dir has no _CHECKPOINT_METADATA (it is one level up)
    try:
        checkpointer = ocp.PyTreeCheckpointer()
        tree = _saved_tree(checkpointer, state_dir)
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise UsageError(f"{state_dir} does not hold a trainer state with params; pass a run dir, "
                             "run/checkpoints/<step> or an exported checkpoint dir")
        key = weights_key(tree, weights, state_dir)
        wanted = {key: tree[key]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True))
    finally:
        absl_logger.setLevel(level)
    return state[key], key
