"""Test set-up: four simulated CPU devices, configured before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # steadier on 2 cores
