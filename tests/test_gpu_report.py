"""benchmarks/gpu_report.py runs at a tiny size on the CPU, so it cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.xla_flags import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_report_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "report.json"
    # A subprocess, so that XLA's slow CPU optimisations can be turned off (this checks the script, not speed).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_report.py"), "--models", "tiny", "--grid", "16", "32",
                           "--levels", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32", "--no-remat", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert printed[-1].startswith("gpu_report_done models=1 ")
    (figures,) = json.loads(out.read_text())
    assert figures["model"] == "tiny" and figures["grid"] == [16, 32] and figures["parameters"] > 0
    assert figures["step_s_median"] > 0 and figures["flops_per_step"] > 0 and figures["tflops_per_s"] > 0
    assert figures["peak_memory_gib"] > 0 and math.isfinite(figures["loss"])
    assert figures["mfu"] is None  # a CPU has no peak in the table
