"""Memory per example: the level (de-)aggregation over chunks of patches, XLA's buffer
assignment read back by part, and ``--estimate_memory`` / ``aurora-loop memory``.

The figures come from real compiled programs (``compiled.memory_analysis()`` and XLA's
dumps of them); nothing here allocates a model at the sizes it talks about.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from aurora_loop.cli.train import main as train_main
from aurora_loop.memory.buffers import part_of, phase_of
from aurora_loop.model import AuroraConfig, apply, init_params, stack_samples
from tests.synthetic import make_samples

# A small Aurora with 13 levels on a 64 x 128 grid: 512 patches, whose 13-level
# de-aggregation dominates its compiled gradient as it does the 1.3 B model's at 0.25°.
LEVELS = "50,100,150,200,250,300,400,500,600,700,850,925,1000"
TINY = ["--model", "tiny", "--num_gpus", "1", "--batch_size", "1", "--levels", LEVELS]


def test_labels_name_the_module_and_the_pass() -> None:
    name = "jit(train_step)/transpose(jvp(AuroraModule))/jvp(Perceiver3DDecoder)/level_decoder/layers_0/ff/fc1/dot_general"
    assert phase_of(name) == "backward" and part_of(name) == "Perceiver3DDecoder/level_decoder"
    name = "jit(train_step)/jvp(AuroraModule)/backbone/encoder_layers_0/encoder_layers_0._apply_detached/SwinBlock/add"
    assert phase_of(name) == "forward" and part_of(name, 2) == "backbone/encoder_layers_0"
    assert phase_of("jit(train_step)/mul") == "optimizer / other"


def _gradient_temp(level_chunk_tokens: int, dump_dir: str | None = None) -> int:
    """Temporaries (bytes) of the compiled gradient of a tiny Aurora with 13 levels on 64 x
    128, with remat, its level (de-)aggregation over chunks of ``level_chunk_tokens`` patches."""
    config = AuroraConfig.preset("tiny", remat=True, level_chunk_tokens=level_chunk_tokens)
    levels = tuple(int(v) for v in LEVELS.split(","))
    sample = stack_samples(make_samples(1, grid=(64, 128), rollout_steps=1, levels=levels))
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), sample.inputs))

    def loss(params):
        pred = apply(config, params, sample.inputs)
        return sum(jnp.mean(v) for v in (*pred.surf_vars.values(), *pred.atmos_vars.values()))

    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_module_re": ".*loss.*"} if dump_dir else None
    compiled = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options=options)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_chunked_level_aggregation_cuts_the_temporaries_where_the_breakdown_says(tmp_path) -> None:
    """All 512 patches at once, the peak is the decoder's level de-aggregation in the
    backward pass (the breakdown says so); in chunks of 64 patches the temporaries shrink."""
    from aurora_loop.memory.buffers import read_dump

    whole = _gradient_temp(0, str(tmp_path))
    breakdown = read_dump(str(tmp_path), module="loss")
    assert breakdown.temp_bytes == whole
    assert 0.5 * whole <= breakdown.peak_live_bytes <= whole  # the allocation packs the live buffers
    assert sum(size for _, size in breakdown.by_part()) == breakdown.peak_live_bytes
    top, size = breakdown.by_part()[0]
    assert top.startswith("backward: ") and "decoder" in top.lower(), breakdown.by_part()[:3]
    assert breakdown.peak_phase().startswith("backward: ") and "decoder" in breakdown.peak_phase().lower()
    chunked = _gradient_temp(64)
    assert chunked < 0.7 * whole, (chunked, whole)


def _bytes_line(out: str) -> dict[str, int]:
    match = re.search(r"^Bytes per device: (.*)$", out, re.M)
    assert match, out
    return {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}


def test_estimate_equals_the_benchmark_and_writes_nothing(tmp_path) -> None:
    """``aurora-loop memory`` compiles the run's step and prints its bytes; benchmarks/memory.py
    compiling the same configuration gets the same figures. The command, run with a home and
    a cache directory of its own, leaves both empty and creates no output directory."""
    home, cache, out_dir = tmp_path / "home", tmp_path / "cache", tmp_path / "run"
    home.mkdir()
    cache.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache), "JAX_NUM_CPU_DEVICES": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = [*TINY, "--estimate_grid", "64x128", "--remat", "--output_dir", str(out_dir)]
    proc = subprocess.run([sys.executable, "-m", "aurora_loop.cli.tools", "memory", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert not out_dir.exists()
    assert not any(home.rglob("*")) and not any(cache.rglob("*")), sorted(map(str, (*home.rglob("*"), *cache.rglob("*"))))
    figures = _bytes_line(printed)
    assert "Where the temporaries peak:" in printed and "parameters" in printed and "Cards it fits" in printed

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import memory as benchmark
    finally:
        sys.path.pop(0)
    result = benchmark.measure_config(model="tiny", grid=(64, 128), levels=13, devices=1, fsdp=False, precision="fp32",
                                      remat=True, lora=True)
    assert (result["argument"], result["temp"]) == (figures["argument"], figures["temp"])
    assert figures["total"] >= figures["argument"] + figures["temp"]


def test_too_small_a_card_gets_the_cheapest_change_that_fits(tmp_path, capsys) -> None:
    """Without remat the step does not fit a card sized between the two estimates; the
    estimate compiles the cheapest changes in turn and names --remat, the first that fits."""
    from aurora_loop.cli.memory import estimate_config
    from aurora_loop.config import TrainingConfig

    base = dict(model="tiny", num_gpus=1, batch_size=1, levels=tuple(int(v) for v in LEVELS.split(",")), estimate_memory=True,
                estimate_grid="64x128")
    plain, _, _ = estimate_config(TrainingConfig(**base), breakdown=False)
    remat, _, _ = estimate_config(TrainingConfig(**base, remat=True), breakdown=False)
    assert remat.total < plain.total
    card = (plain.total + remat.total) / 2 / 0.9 / 2**30
    assert train_main([*TINY, "--estimate_memory", "--estimate_grid", "64x128", "--device_memory_gib", f"{card:.6f}",
                       "--output_dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "Does not fit" in out
    assert "It fits with --remat." in out, out


@pytest.mark.parametrize("args, message", [
    (["--estimate_memory", "--estimate_grid", "721"], "is not HxW"),
    (["--estimate_memory", "--device_memory_gib", "0"], "device_memory_gib must be positive"),
    (["--estimate_grid", "721x1440"], "add --estimate_memory"),
    (["--estimate_memory", "--num_gpus", "3", "--batch_size", "2"], "not divisible by the 3 devices"),
])
def test_bad_estimate_settings_are_one_line(tmp_path, capsys, args, message) -> None:
    code = train_main(["--model", "tiny", "--output_dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
