"""benchmarks/scaling.py --tiny: the compiled step's FLOPs and collectives on 4 CPU devices.

Runs the benchmark in a subprocess (it needs 4 simulated devices before jax starts) and
checks what it reads off the compiled HLO: positive FLOPs, the same compute under DP and
FSDP, DP's gradient all-reduce moving 2 (p-1)/p x the parameter bytes per device, FSDP
gathering weights (all-gather) and reducing gradients (reduce-scatter or all-reduce).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.xla_flags import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def output() -> str:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_COMPILE, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _fields(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"([\w+-]+)=([-+0-9.e]+)", line)}


def _per_step(out: str, layout: str) -> dict[str, float]:
    lines = [line for line in out.splitlines() if line.startswith(f"per-step[4,{layout}]")]
    assert len(lines) == 1, out
    return _fields(lines[0])


def test_last_line_is_the_ratio(output):
    last = output.strip().splitlines()[-1]
    m = re.fullmatch(r"fsdp_over_dp_comm_bytes=([0-9.]+)", last)
    assert m, last
    assert 0.5 < float(m.group(1)) < 10  # FSDP moves the weights (gathers) and the gradients


def test_flops_positive_and_equal_across_layouts(output):
    dp, fsdp = _per_step(output, "dp"), _per_step(output, "fsdp")
    assert dp["flops"] > 1e6 and fsdp["flops"] > 1e6
    # the same forward and backward per device; FSDP only splits the (small) optimizer update
    assert fsdp["flops"] == pytest.approx(dp["flops"], rel=0.1)


def test_dp_all_reduces_the_gradients(output):
    params = _fields(next(line for line in output.splitlines() if line.startswith("params=")))
    param_bytes = params["param_bytes"]
    assert param_bytes == pytest.approx(4 * params["params"])  # float32 parameters
    dp = _per_step(output, "dp")
    p = 4
    assert dp["all-reduce_N"] == pytest.approx(param_bytes, rel=0.05)
    assert dp["all-reduce_bytes"] == pytest.approx(2 * (p - 1) / p * param_bytes, rel=0.05)
    assert dp["comm_bytes"] == pytest.approx(dp["all-reduce_bytes"])  # nothing but all-reduces
    assert "all-gather_N" not in dp and "reduce-scatter_N" not in dp


def test_fsdp_gathers_weights_and_reduces_gradients(output):
    param_bytes = _fields(next(line for line in output.splitlines() if line.startswith("params=")))["param_bytes"]
    fsdp = _per_step(output, "fsdp")
    # weights gathered at least once (forward; again in the rematerialised backward)
    assert fsdp.get("all-gather_N", 0) > 0.5 * param_bytes
    # gradients reduced: reduce-scatter, or (XLA:CPU has no reduce-scatter creator) all-reduce + slice
    assert fsdp.get("reduce-scatter_N", 0) + fsdp.get("all-reduce_N", 0) > 0.5 * param_bytes
    assert fsdp["comm_bytes"] > 0


def test_table_rows(output):
    rows = [line.split() for line in output.splitlines() if re.match(r"\s+4\s+(dp|fsdp)\s", line)]
    assert [r[1] for r in rows] == ["dp", "fsdp"]
    assert all(float(r[2]) > 0 for r in rows)  # GFLOP per device


def test_collective_parser_on_hlo_lines():
    """The ring factors and the three replica-group spellings, on hand-written HLO lines."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.scaling import collective_stats

    hlo = "\n".join([
        "  %ar = f32[1000]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add",
        "  %ag = (f32[8,10]{1,0}, bf16[40]{0}) all-gather(%a, %b), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}",
        "  %rs = bf16[250]{0} reduce-scatter(%y), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add",
        "  %one = f32[99]{0} all-reduce(%z), channel_id=4, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, to_apply=%add",
        "  %deg = f32[99]{0} all-reduce(%z), channel_id=5, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_1'}, to_apply=%add",
        "  %add.1 = f32[1000]{0} add(%ar, %ar)",
    ])
    s = collective_stats(hlo, num_devices=8)
    assert s["all-reduce"]["count"] == 2  # the group of 1 moves nothing
    assert s["all-reduce"]["payload"] == 4000 + 396
    assert s["all-reduce"]["traffic"] == pytest.approx(2 * 3 / 4 * 4000 + 2 * 1 / 2 * 396)
    assert s["all-gather"]["payload"] == 8 * 10 * 4 + 40 * 2
    assert s["all-gather"]["traffic"] == pytest.approx(3 / 4 * 400)
    assert s["reduce-scatter"]["payload"] == 250 * 2 * 4  # the operand: result x group size
    assert s["reduce-scatter"]["traffic"] == pytest.approx(3 / 4 * 2000)
