"""The scenario matrix: the real fine-tuning path, with every feature a user combines.

Each cell fine-tunes a pretrained (micro) Aurora through the ``aurora-train`` entry point with
its default callbacks (forecast maps included) and ``--monitor val/loss --save_top_k 1``, on
one device, 4 devices data-parallel, 4 devices ``--fsdp`` or 2 processes x 2 devices (real
``jax.distributed`` on 127.0.0.1), in each roll-out mode, with all weights or LoRA only
(``--model_kwargs`` switches LoRA on; the adapters start fresh on the pretrained weights),
with and without ``--remat`` and ``--bf16``. The full product is 96 cells; :data:`CELLS`
holds 12 in which every pair of option values meets at least once (checked below). The
fine-tuning options (accumulation, EMA, per-lead validation, parameter groups, bf16-params,
time limits) are woven through the cells so that each meets every device layout;
``--remat_policy dots`` runs in remat cells on one device, FSDP and two processes.

Every cell asserts: each run exits 0 (the interrupted one 75); the uninterrupted run
validated its last step and drew forecast maps there; ``export-checkpoint --step best`` works
and the export loads into a fresh task as pretrained weights, equal to the best checkpoint;
the run interrupted by a real SIGTERM and rerun with the same command ends with the same
parameters as the uninterrupted one (bitwise in one process, rtol 1e-6 across processes).

The cells run as subprocesses (:mod:`tests.scenario_cell`) in the background from the start of
the session (``tests/background.py``: one lane while other tests run, two while these wait;
conftest.py puts these tests last), with XLA's LLVM optimisation turned down: these tests
check behaviour, not speed, and compiling dominates their time on two cores.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import background
from tests.scenario_cell import MAX_STEPS, MICRO, SAVE_EVERY, VAL_EVERY
from tests.test_multiprocess import LAUNCHER_VARS, free_port
from tests.xla_flags import FAST_COMPILE

DEVICES = ("1", "4dp", "4fsdp", "2x2")
MODES = ("full", "pushforward", "replay")
# (devices, roll-out mode, LoRA only, remat, bf16): every pair of values of any two options meets.
CELLS = [
    ("1", "full", False, True, True),
    ("1", "pushforward", True, False, False),
    ("1", "replay", True, False, True),
    ("4dp", "full", True, True, True),
    ("4dp", "pushforward", True, True, True),
    ("4dp", "replay", False, False, False),
    ("4fsdp", "full", True, False, False),
    ("4fsdp", "pushforward", False, True, False),
    ("4fsdp", "replay", True, True, True),
    ("2x2", "full", True, True, True),
    ("2x2", "pushforward", True, False, False),
    ("2x2", "replay", False, True, False),
]
# The fine-tuning options of #15, woven through the cells so that each meets every device
# layout (flags added to the cell's command; see tests.scenario_cell.command).
ACCUMULATE = {"1-full-all-remat-bf16", "4dp-pushforward-lora-remat-bf16", "4fsdp-full-lora", "2x2-full-lora-remat-bf16"}
EMA = {"1-pushforward-lora", "4dp-full-lora-remat-bf16", "4fsdp-full-lora", "2x2-replay-all-remat"}
LEAD_TIMES = {"1-full-all-remat-bf16", "4dp-replay-all", "4fsdp-pushforward-all-remat", "2x2-full-lora-remat-bf16"}
GROUPS = {"1-full-all-remat-bf16": [r"encoder\..*", "decoder=2"], "4fsdp-replay-lora-remat-bf16": ["backbone.encoder_layers_0", "backbone=2"],
          "2x2-pushforward-lora": [r"backbone\.decoder_layers\.1\..*", "backbone.encoder_layers_0=3"],
          "4dp-replay-all": ["decoder", "encoder=0.5"]}
REMAT_DOTS = {"4fsdp-pushforward-all-remat", "2x2-replay-all-remat", "1-full-all-remat-bf16"}  # --remat_policy dots
BF16_PARAMS = {"4dp-pushforward-lora-remat-bf16", "2x2-full-lora-remat-bf16"}  # --precision bf16-params instead of --bf16
VAL_ROLLOUT = 3
CELL_TIMEOUT_S = 900
# One example over several devices (--space_parallel, #27), on a store tall enough for 4 bands
# of the micro model's two stages: 4 devices in 4 bands with FSDP over them (pushforward,
# remat keeping the dots), and 2 processes x 2 devices whose 4 bands span both processes
# (each reads the same examples; replay, bfloat16 parameters). The full roll-out on bands is
# tests/test_space.py's cross-mesh resume.
SPACE_CELLS = [("4space", "pushforward", True, True, True), ("2x2space", "replay", False, True, False)]
SPACE_FLAGS = {"4space": ["--space_parallel", "4", "--fsdp", "--accumulate_grad_batches", "2", "--ema_decay", "0.9",
                          "--remat_policy", "dots"],
               "2x2space": ["--space_parallel", "4", "--val_rollout_steps", str(VAL_ROLLOUT), "--precision", "bf16-params"]}
TALL_GRID = (128, 32)


def cell_id(cell: tuple) -> str:
    devices, mode, lora, remat, bf16 = cell
    return "-".join([devices, mode, "lora" if lora else "all"] + ["remat"] * remat + ["bf16"] * bf16)


def as_dict(cell: tuple) -> dict[str, Any]:
    spec = dict(zip(("devices", "mode", "lora", "remat", "bf16"), cell))
    name = cell_id(cell)
    extras = ["--max_time", "01:00:00", "--save_every_n_minutes", "30"]  # never due here: the checks run, nothing fires
    extras += ["--accumulate_grad_batches", "2"] * (name in ACCUMULATE)
    extras += ["--ema_decay", "0.9"] * (name in EMA)
    extras += ["--val_rollout_steps", str(VAL_ROLLOUT)] * (name in LEAD_TIMES)
    if name in GROUPS:
        extras += ["--freeze", GROUPS[name][0], "--lr_multipliers", GROUPS[name][1]]
    extras += ["--remat_policy", "dots"] * (name in REMAT_DOTS)
    if name in BF16_PARAMS:
        spec["bf16"] = False
        extras += ["--precision", "bf16-params"]
    extras += SPACE_FLAGS.get(spec["devices"], [])
    spec["extras"] = extras
    return spec


def two_processes(cell: tuple) -> bool:
    return cell[0] in ("2x2", "2x2space")


def test_the_fine_tuning_options_meet_every_device_layout():
    names = {cell_id(c): c for c in CELLS}
    for option in (ACCUMULATE, EMA, LEAD_TIMES, set(GROUPS)):
        assert option <= set(names), option - set(names)
        assert {names[n][0] for n in option} == set(DEVICES), option
    assert all(names[n][3] for n in REMAT_DOTS) and {names[n][0] for n in REMAT_DOTS} == {"1", "4fsdp", "2x2"}
    assert all(names[n][1] != "replay" for n in ACCUMULATE)


def test_the_matrix_covers_every_pair_of_options():
    values = [DEVICES, MODES, (False, True), (False, True), (False, True)]
    for i, j in itertools.combinations(range(5), 2):
        missing = set(itertools.product(values[i], values[j])) - {(c[i], c[j]) for c in CELLS}
        assert not missing, (i, j, missing)
    assert len({cell_id(c) for c in CELLS}) == len(CELLS)


def child_env(devices: int, compile_cache: Path | None = None) -> dict[str, str]:
    """A cell process's environment: ``devices`` CPU devices, no launcher variables, and
    JAX's persistent compilation cache in ``compile_cache`` (the three runs of a cell compile
    the same steps; the first run's programs serve the other two)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    root = str(Path(__file__).resolve().parent.parent)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_COMPILE,
               PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if compile_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class MatrixRunner:
    """Submits every cell to the session's background runner (tests/background.py): a
    one-process cell takes one lane, a two-process cell two."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prepared: Future | None = None
        self.results: dict[str, Future] = {}
        self.seconds: dict[str, float] = {}
        runner = background.background()
        self.prepared = runner.submit(self._prepare)
        # The two-process cells last: they wait for the foreground to lend its core.
        for cell in sorted(CELLS + SPACE_CELLS, key=two_processes):
            self.results[cell_id(cell)] = runner.submit(lambda cell=cell: self._run_cell(cell), lanes=2 if two_processes(cell) else 1)

    def _prepare(self) -> tuple[str, str, str]:
        """The sample stores (the usual one, and a tall one for the space cells) and the
        pretrained model, written by a process of their own."""
        done = background.run([sys.executable, "-m", "tests.test_scenarios", str(self.root)], env=child_env(1), timeout=CELL_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"preparing the matrix failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return str(self.root / "store.zarr"), str(self.root / "pretrained"), str(self.root / "tall.zarr")

    def _run_cell(self, cell: tuple) -> dict[str, Any]:
        name, spec = cell_id(cell), as_dict(cell)
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        result: dict[str, Any] = {"log": ""}
        try:
            store, spec["pretrained"], tall = self.prepared.result()
            if cell in SPACE_CELLS:
                store = tall
            base = [sys.executable, "-m", "tests.scenario_cell"]
            if two_processes(cell):
                address = f"127.0.0.1:{free_port()}"
                procs = []
                for i in range(2):
                    flags = ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)]
                    log = open(directory / f"train-{i}.log", "w")
                    procs.append((background.popen(base + ["train", json.dumps(spec), store, str(directory), *flags],
                                                   env=child_env(2, directory / f"xla-cache-{i}"), stdout=log,
                                                   stderr=subprocess.STDOUT), log))
                deadline = time.monotonic() + CELL_TIMEOUT_S
                for proc, log in procs:
                    try:
                        proc.wait(timeout=max(deadline - time.monotonic(), 1))
                    except subprocess.TimeoutExpired:
                        for p, _ in procs:
                            p.kill()
                        proc.wait()
                    log.close()
                result["train_rc"] = [proc.returncode for proc, _ in procs]
            else:
                with open(directory / "train-0.log", "w") as log:
                    proc = background.run(base + ["train", json.dumps(spec), store, str(directory)],
                                          env=child_env(4, directory / "xla-cache"),
                                          stdout=log, stderr=subprocess.STDOUT, timeout=CELL_TIMEOUT_S)
                result["train_rc"] = [proc.returncode]
            if all(rc == 0 for rc in result["train_rc"]):
                with open(directory / "analyse.log", "w") as log:
                    proc = background.run(base + ["analyse", json.dumps(spec), str(directory)], env=child_env(1),
                                          stdout=log, stderr=subprocess.STDOUT, timeout=CELL_TIMEOUT_S)
                result["analyse_rc"] = proc.returncode
                if proc.returncode == 0:
                    result["report"] = json.loads((directory / "report.json").read_text())
        except Exception as err:  # noqa: BLE001 - reported by the cell's test
            result["error"] = repr(err)
        result["seconds"] = self.seconds[name] = round(time.monotonic() - started, 1)
        result["log"] = "".join(p.read_text()[-2500:] for p in sorted(directory.glob("*.log")))
        return result

    def result(self, name: str) -> dict[str, Any]:
        return background.background().wait(self.results[name])


def write_pretrained(directory: str) -> str:
    """A pretrained micro Aurora: every parameter random (the modulations too, so that the
    Swin blocks and their LoRA adapters get gradients), in the import/export layout."""
    import jax

    from aurora_loop.model import AuroraConfig, save_params
    from aurora_loop.model.checkpoint import param_shapes

    config = AuroraConfig.preset("tiny", **{k: tuple(v) if isinstance(v, list) else v for k, v in MICRO.items()})
    rng = np.random.default_rng(0)

    def draw(path, shape):
        noise = rng.normal(0.0, 0.05, shape.shape).astype(np.float32)
        return noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config))
    save_params(directory, config, params)
    return directory


_MATRIX: MatrixRunner | None = None


def start_background_work(tmp_path_factory: pytest.TempPathFactory, names: set[str]) -> MatrixRunner | None:
    """Called by conftest.py when collection ends (and by the fixture, if it did not): the
    matrix starts with the session, if any cell is selected."""
    global _MATRIX
    if _MATRIX is None and any(n.startswith("test_scenario[") for n in names):
        _MATRIX = MatrixRunner(tmp_path_factory.mktemp("matrix"))
    return _MATRIX


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    runner = start_background_work(tmp_path_factory, {"test_scenario["})
    yield runner
    print("\nscenario cell seconds: " + ", ".join(f"{k} {v}" for k, v in runner.seconds.items()))


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS + SPACE_CELLS, ids=[cell_id(c) for c in CELLS + SPACE_CELLS])
def test_scenario(matrix, cell):
    result = matrix.result(cell_id(cell))
    log = result["log"]
    assert "error" not in result, result.get("error", "") + log
    assert result["train_rc"] == [0] * len(result["train_rc"]), log
    assert result.get("analyse_rc") == 0, log
    report = result["report"]
    for status in report["status"]:  # one per process
        assert status == {"full": 0, "interrupted": 75, "rerun": 0}, log
    # A validation at the last step (the run ends mid-epoch, off the validation schedule),
    # with its forecast maps, drawn under the training shardings.
    assert report["val_steps"] == sorted(set(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY)) | {MAX_STEPS})
    assert report["map_steps"] == report["val_steps"]
    name = cell_id(cell)
    # Per-lead scores at every validation: 2 leads (the training roll-out), or VAL_ROLLOUT.
    assert report["rmse_by_lead_steps"] == report["val_steps"]
    lead_times = name in LEAD_TIMES or "--val_rollout_steps" in SPACE_FLAGS.get(cell[0], [])
    assert report["lead_scalar_steps"] == (report["val_steps"] if lead_times else [])
    assert report["exported_weights"] == ("ema" if name in EMA or "--ema_decay" in SPACE_FLAGS.get(cell[0], []) else "raw")
    assert report["checkpoints_full"][-1] == MAX_STEPS and SAVE_EVERY in report["checkpoints_full"]
    assert MAX_STEPS in report["checkpoints_resumed"]
    # The best checkpoint exports, and the export loads into a fresh task unchanged.
    assert report["export_status"] == 0
    assert report["best_step"] in report["val_steps"]
    assert report["export_parts"] == ["backbone", "decoder", "encoder"] and report["export_matches"]
    assert report["exported_use_lora"] is bool(cell[2])
    # Interrupted by SIGTERM and rerun == never interrupted.
    assert report["same_structure"] and report["moved"]
    if two_processes(cell):
        assert report["max_rel_diff"] <= 1e-6, report["max_rel_diff"]
    else:
        assert report["bitwise_equal"], report["max_rel_diff"]


if __name__ == "__main__":  # python -m tests.test_scenarios DIR: the matrix's store and pretrained model
    from aurora_loop.datasets.sample_data import write_sample_store

    root = Path(sys.argv[1])
    write_sample_store(str(root / "store.zarr"), grid=(16, 32), times=48, levels=(500, 850))
    write_sample_store(str(root / "tall.zarr"), grid=TALL_GRID, times=48, levels=(500, 850))
    write_pretrained(str(root / "pretrained"))
