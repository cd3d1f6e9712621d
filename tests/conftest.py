"""Test set-up: four simulated CPU devices, configured before JAX is imported anywhere."""

import os

from tests.xla_flags import FAST_COMPILE

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# Quick XLA:CPU compilation for every test and the subprocesses they start (an XLA_FLAGS of
# your own wins).
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)
# aurora-train and forecast keep a persistent compilation cache under $XDG_CACHE_HOME: one
# per test session, so tests share it (and exercise it) without touching the user's home.
if "XDG_CACHE_HOME" not in os.environ:
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="aurora-loop-test-cache-")
