"""Extending a pretrained Aurora: new variables, a longer history, more levels (issue #16).

A pretrained micro Aurora (``tests/scenario_cell.MICRO``, every parameter random) is extended
by a surface variable ``tp`` placed *between* old ones, an atmospheric ``w`` placed first and
a third history slot; its weights are mapped by variable name
(:mod:`aurora_loop.model.extend`).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from aurora_loop.errors import UsageError
from aurora_loop.model import AuroraConfig, save_params
from aurora_loop.model.aurora import apply, init_params
from aurora_loop.model.batch import Batch, Metadata, Sample
from aurora_loop.model.checkpoint import load_params, param_shapes
from aurora_loop.model.extend import ExtendError, adapt_pretrained, dotted, merge_variables
from aurora_loop.model.normalisation import ATMOS_STATS, SURFACE_STATS
from aurora_loop.tasks.aurora import AuroraTask
from tests.scenario_cell import MICRO

TP_STATS = {"tp": (7e-4, 2e-3)}  # location, scale of 6-hour precipitation in m
OLD = AuroraConfig.preset("tiny", **{k: tuple(v) if isinstance(v, list) else v for k, v in MICRO.items()})
NEW_SURF = ("2t", "tp", "10u", "10v", "msl")  # tp between old variables: every later slice moves
EXTENDED = OLD.replace(surf_vars=NEW_SURF, atmos_vars=("w",) + OLD.atmos_vars, max_history_size=3, surf_stats=TP_STATS)
PARTS = ("encoder", "backbone", "decoder")
EMBED_SURF, EMBED_ATMOS = ("encoder", "surf_token_embeds", "weight"), ("encoder", "atmos_token_embeds", "weight")
HEADS = [("decoder", f"{k}_heads", leaf) for k in ("surf", "atmos") for leaf in ("kernel", "bias")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The micro Aurora written like ``tests/test_scenarios.write_pretrained`` (random weights)."""
    directory = str(tmp_path_factory.mktemp("extend") / "pretrained")
    rng = np.random.default_rng(0)

    def draw(path, shape):
        noise = rng.normal(0.0, 0.05, shape.shape).astype(np.float32)
        return noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    save_params(directory, OLD, jax.tree_util.tree_map_with_path(draw, param_shapes(OLD)))
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    path = str(tmp_path_factory.mktemp("extend_store") / "store.zarr")
    return write_sample_store(path, grid=(16, 32), times=24, levels=(250, 500, 850), surf_vars=("2t", "10u", "10v", "msl", "tp"))


def parts_of(directory: str) -> dict[str, str]:
    return {p: os.path.join(directory, p) for p in PARTS}


def get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def physical_batch(levels=(500, 850), steps=2, seed=1) -> Batch:
    """Fields of every variable of EXTENDED at ``loc + scale * N(0, 1)`` (tp: >= 0)."""
    rng = np.random.default_rng(seed)
    h, w, b = 16, 32, 2

    def surf(name):
        loc, scale = TP_STATS.get(name) or SURFACE_STATS[name]
        x = loc + scale * rng.standard_normal((b, steps, h, w))
        return np.abs(x) if name == "tp" else x

    def atmos(name):
        stats = np.array([ATMOS_STATS[name][lv] for lv in levels])  # (c, 2)
        return stats[:, 0, None, None] + stats[:, 1, None, None] * rng.standard_normal((b, steps, len(levels), h, w))

    return Batch(
        surf_vars={k: surf(k).astype(np.float32) for k in EXTENDED.surf_vars},
        static_vars={k: (SURFACE_STATS[k][0] + SURFACE_STATS[k][1] * rng.random((h, w))).astype(np.float32) for k in EXTENDED.static_vars},
        atmos_vars={k: atmos(k).astype(np.float32) for k in EXTENDED.atmos_vars},
        metadata=Metadata(lat=np.linspace(90, -90, h), lon=np.linspace(0, 360, w, endpoint=False),
                          time=np.full((b,), 438_000.0), atmos_levels=levels),
    )


def without(batch: Batch, surf=(), atmos=()) -> Batch:
    return batch.replace(surf_vars={k: v for k, v in batch.surf_vars.items() if k not in surf},
                         atmos_vars={k: v for k, v in batch.atmos_vars.items() if k not in atmos})


# --- the pure mapping -----------------------------------------------------------------------

def test_flags_extend_the_checkpoint_variables_only_when_they_name_new_ones():
    standard = ("2t", "10u", "10v", "msl")
    assert merge_variables(standard, standard) == standard
    assert merge_variables(standard, None) == standard
    assert merge_variables(standard, ("2t", "msl")) == standard  # a subset of the data: the model keeps all
    assert merge_variables(standard, ("2t", "tp", "10u")) == ("2t", "tp", "10u", "10v", "msl")  # flags' order, then the rest
    assert merge_variables(standard + ("tp",), standard) == standard + ("tp",)  # default flags never drop a variable


def test_adapt_copies_old_slices_by_name_and_initialises_new_ones():
    old = jax.tree_util.tree_map(lambda s: np.random.default_rng(s.size).normal(size=s.shape).astype(np.float32), param_shapes(OLD))
    fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, np.float32), param_shapes(EXTENDED))
    for init in ("zero", "default"):
        params, notes = adapt_pretrained(old, OLD, EXTENDED, fresh, init=init)
        new_value = 0.0 if init == "zero" else 7.0
        for path, old_names, new_names in [(EMBED_SURF, OLD.surf_vars + OLD.static_vars, EXTENDED.surf_vars + EXTENDED.static_vars),
                                           (EMBED_ATMOS, OLD.atmos_vars, EXTENDED.atmos_vars)]:
            before, after = get(old, path), get(params, path)
            assert after.shape == (len(new_names), 3) + before.shape[2:]
            for i, name in enumerate(new_names):
                if name in old_names:  # bit for bit, wherever it now stands; the new history slot is zero
                    assert np.array_equal(after[i, :2], before[old_names.index(name)]), (path, name)
                    assert not after[i, 2].any()
                else:
                    assert np.all(after[i] == new_value), (path, name)
        for path in HEADS:
            old_names, new_names = (OLD.surf_vars, NEW_SURF) if "surf" in path[1] else (OLD.atmos_vars, EXTENDED.atmos_vars)
            for i, name in enumerate(new_names):
                expected = get(old, path)[old_names.index(name)] if name in old_names else new_value
                assert np.all(get(params, path)[i] == expected), (path, name)
        shapes = param_shapes(EXTENDED)
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):  # everything else: unchanged
            path = tuple(k.key for k in key_path)
            assert tuple(get_shape(shapes, path)) == leaf.shape, path
            if path not in (EMBED_SURF, EMBED_ATMOS, *HEADS):
                assert np.array_equal(leaf, get(old, path)), path
        assert notes == {"encoder.surf_token_embeds.weight": "new: tp; history slot 3 new",
                         "encoder.atmos_token_embeds.weight": "new: w; history slot 3 new",
                         "decoder.surf_heads.kernel": "new: tp", "decoder.surf_heads.bias": "new: tp",
                         "decoder.atmos_heads.kernel": "new: w", "decoder.atmos_heads.bias": "new: w"}
    with pytest.raises(ExtendError, match="max_history_size=2 .* more than the 1"):
        adapt_pretrained(old, OLD, OLD.replace(max_history_size=1), param_shapes(OLD.replace(max_history_size=1)))


def get_leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def get_shape(tree, path):
    for key in path:
        tree = tree[key]
    return tree.shape


def test_pressure_levels_are_not_parameters():
    key = jax.random.PRNGKey(0)
    shapes = [jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(lambda b=b: init_params(EXTENDED, key, b)))
              for b in (physical_batch((500, 850)), physical_batch((250, 500, 700, 850, 925)))]
    assert shapes[0] == shapes[1]


# --- the task: zero init predicts what the pretrained model did ------------------------------

def test_zero_init_predicts_the_old_variables_as_the_pretrained_model(pretrained):
    batch = physical_batch()  # two history steps, while the extended model takes up to three
    sample = Sample(batch, batch)
    key = jax.random.PRNGKey(3)
    task = AuroraTask(EXTENDED, pretrained=parts_of(pretrained))
    assert task.new_parameters()["encoder.surf_token_embeds.weight"] == "new: tp; history slot 3 new"
    params = jax.device_get(jax.jit(task.init)(key, sample))
    old_params = jax.device_get(load_params(pretrained))
    for i, name in enumerate(NEW_SURF):  # old heads: exactly the pretrained ones; tp's: zero
        for path in HEADS[:2]:
            expected = get(old_params, path)[OLD.surf_vars.index(name)] if name != "tp" else 0.0
            assert np.all(get(params, path)[i] == expected)

    predict = jax.jit(apply, static_argnums=0)
    original = predict(OLD, old_params, without(batch, surf=("tp",), atmos=("w",)))
    extended = predict(EXTENDED, params, batch)

    def worst(prediction):  # the largest difference to the original, in normalised units
        out = 0.0
        for name, value in original.surf_vars.items():
            scale = SURFACE_STATS[name][1]
            out = max(out, float(np.max(np.abs(np.asarray(prediction.surf_vars[name]) - np.asarray(value)))) / scale)
        for name, value in original.atmos_vars.items():
            scales = np.array([ATMOS_STATS[name][lv][1] for lv in (500, 850)])[:, None, None]
            out = max(out, float(np.max(np.abs(np.asarray(prediction.atmos_vars[name]) - np.asarray(value)) / scales)))
        return out

    # Only the order of the encoder's float32 sum over variables changes: equal to rounding.
    assert worst(extended) < 1e-5, worst(extended)
    assert set(extended.surf_vars) == set(NEW_SURF) and np.allclose(np.asarray(extended.surf_vars["tp"]), TP_STATS["tp"][0])

    # --new_weights_init default: the new slices are the fresh initialisation's (same key), the
    # old ones still the pretrained ones, and the old variables' forecast changes.
    task_default = AuroraTask(EXTENDED, pretrained=parts_of(pretrained), new_weights_init="default")

    def both(k):  # one compilation: the task's init and the fresh values of the per-variable leaves
        fresh = init_params(EXTENDED, k, batch)
        return task_default.init(k, sample), {dotted(p): get_leaf(fresh, p) for p in (EMBED_SURF, EMBED_ATMOS, *HEADS)}

    default, fresh = jax.device_get(jax.jit(both)(key))
    fresh = {p: fresh[dotted(p)] for p in (EMBED_SURF, EMBED_ATMOS, *HEADS)}
    tp, w = NEW_SURF.index("tp"), EXTENDED.atmos_vars.index("w")
    for path, i in [(EMBED_SURF, tp), (EMBED_ATMOS, w), (HEADS[0], tp), (HEADS[1], tp), (HEADS[2], w), (HEADS[3], w)]:
        assert np.array_equal(get(default, path)[i], fresh[path][i]), path
        assert fresh[path][i].any() or path[-1] == "bias"  # heads' biases start at zero anyway
        others = [j for j in range(get(default, path).shape[0]) if j != i]
        assert np.array_equal(get(default, path)[others], get(params, path)[others]), path
    assert worst(predict(EXTENDED, default, batch)) > 1e-3


def test_a_shorter_history_than_the_checkpoint_is_refused(pretrained):
    with pytest.raises(UsageError) as err:
        AuroraTask(OLD.replace(max_history_size=1), pretrained=parts_of(pretrained))
    assert "max_history_size=2" in str(err.value) and "\n" not in str(err.value)


# --- training: the new slices move, the old heads start pretrained ---------------------------

def test_one_trainer_step_moves_the_new_slices(pretrained, store):
    from aurora_loop.callbacks import Callback
    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets import build_loaders
    from aurora_loop.parallel import make_mesh
    from aurora_loop.task import make_task
    from aurora_loop.trainer import Trainer

    config = TrainingConfig(dataset_path=store, checkpoint_dir=pretrained, surf_vars=NEW_SURF, levels=(250, 500, 850),
                            batch_size=2, num_workers=1, model_kwargs={"surf_stats": {"tp": list(TP_STATS["tp"])}})
    task = make_task("tiny", config)  # the flags name tp, which the checkpoint lacks: the model gains it
    assert task.config.surf_vars == NEW_SURF and task.config.atmos_vars == OLD.atmos_vars
    # three levels in the data, none new in the model: only tp's slices are new
    assert task.new_parameters() == {"encoder.surf_token_embeds.weight": "new: tp", "decoder.surf_heads.kernel": "new: tp",
                                     "decoder.surf_heads.bias": "new: tp"}

    class Initial(Callback):
        def on_fit_start(self, trainer):
            self.params = jax.device_get(trainer.state.params)

    initial = Initial()
    train, _ = build_loaders(config)
    after = jax.device_get(Trainer([initial], max_steps=1, mesh=make_mesh(1)).fit(task, train).params)
    old_params = jax.device_get(load_params(pretrained))
    tp = NEW_SURF.index("tp")
    old_rows = [NEW_SURF.index(n) for n in OLD.surf_vars]
    for path in (*HEADS[:2], EMBED_SURF):
        old_rows_p = old_rows if path != EMBED_SURF else old_rows + list(range(len(NEW_SURF), len(NEW_SURF) + 3))
        assert np.array_equal(get(initial.params, path)[old_rows_p], get(old_params, path)), path  # pretrained, as placed
        assert not get(initial.params, path)[tp].any()  # zero before the step
        assert get(after, path)[tp].any(), path  # moved by one step
        assert not np.array_equal(get(after, path)[old_rows], get(initial.params, path)[old_rows]), path  # the old ones train too


# --- the command line -------------------------------------------------------------------------

def cli_args(store: str, pretrained: str, out: str, *extra: str) -> list[str]:
    return ["--dataset_path", store, "--checkpoint_dir", pretrained, "--output_dir", out, "--model", "tiny",
            "--batch_size", "4", "--num_workers", "1", "--levels", "250,500,850", *extra]


def test_print_param_groups_marks_the_new_parameters(pretrained, store, tmp_path, capsys):
    from aurora_loop.cli.train import main

    kwargs = {"max_history_size": 3, "surf_stats": {"tp": list(TP_STATS["tp"])}}
    status = main(cli_args(store, pretrained, str(tmp_path / "run"), "--surf_vars", ",".join(NEW_SURF),
                           "--model_kwargs", json.dumps(kwargs), "--print_param_groups"))
    out = capsys.readouterr().out
    assert status == 0
    assert "Extending the pretrained model" in out and "new surface variables tp" in out and "max_history_size 2 -> 3" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("encoder.", "decoder.", "backbone."))}
    assert rows["encoder.surf_token_embeds.weight"].endswith("new: tp; history slot 3 new")
    assert rows["encoder.atmos_token_embeds.weight"].endswith("history slot 3 new")
    assert rows["decoder.surf_heads.kernel"].endswith("new: tp")
    assert rows["encoder.surf_token_embeds.bias"].endswith(f"{16:>12,}")  # shared bias: nothing new
    assert sum("new" in line for line in rows.values()) == 4
    assert next(line for line in out.splitlines() if line.startswith("parameter")).endswith("  new")


def test_cli_refuses_a_shorter_history_in_one_line(pretrained, store, tmp_path, capsys):
    from aurora_loop.cli.train import main

    status = main(cli_args(store, pretrained, str(tmp_path / "run"), "--history", "1", "--model_kwargs", '{"max_history_size": 1}'))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "max_history_size=2" in err and "grow but not shrink" in err


def test_sample_data_writes_the_new_variables(tmp_path, capsys):
    import xarray as xr

    from aurora_loop.cli.tools import main as tools
    from aurora_loop.datasets.store import WeatherStore
    from aurora_loop.datasets.variables import VariableSelection

    names = ("2t", "10u", "10v", "msl", "tp", "100u", "100v", "tcc")
    out = str(tmp_path / "s.zarr")
    assert tools(["sample-data", out, "--grid", "16x32", "--times", "20", "--levels", "500", "--surf_vars", ",".join(names)]) == 0
    assert "tp,100u,100v,tcc" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    tp, tcc = ds["total_precipitation_6hr"].values, ds["total_cloud_cover"].values
    assert ds["total_precipitation_6hr"].attrs["units"] == "m" and tp.min() >= 0 and 1e-4 < tp.mean() < 3e-3 and tp.max() < 0.1
    assert 0.05 < (tp == 0).mean() < 0.95  # dry and raining places
    assert tcc.min() >= 0 and tcc.max() <= 1 and 0.3 < tcc.mean() < 0.8
    u10, u100 = ds["10m_u_component_of_wind"].values, ds["100m_u_component_of_wind"].values
    assert np.std(u100) > np.std(u10) and np.corrcoef(u10.ravel(), u100.ravel())[0, 1] > 0.8 and np.abs(u100).max() < 60
    # The standard fields are those of a default store, and the loader finds the new ones by their Aurora names.
    plain = xr.open_zarr(write_default(tmp_path))
    assert all(np.array_equal(plain[k].values, ds[k].values) for k in plain.data_vars)
    surf, _ = WeatherStore(out, VariableSelection(surf=names, atmos=("t",))).read(0, 2)
    assert set(surf) == set(names) and np.all(surf["tp"] >= 0)


def write_default(tmp_path) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    return write_sample_store(str(tmp_path / "plain.zarr"), grid=(16, 32), times=20, levels=(500,))
