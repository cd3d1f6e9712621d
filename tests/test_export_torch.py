"""Export to the PyTorch reference: params -> reference state dict, its constructor kwargs, and
``aurora-loop export-checkpoint --format torch|safetensors|npz``."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import struct

import jax
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import ModelCheckpoint
from aurora_loop.cli.export_checkpoint import write_safetensors
from aurora_loop.cli.import_checkpoint import read_npz, read_safetensors
from aurora_loop.cli.tools import main as aurora_loop_main
from aurora_loop.config import TrainingConfig
from aurora_loop.data import ArrayLoader
from aurora_loop.model import AuroraConfig, load_params, load_reference_params
from aurora_loop.model.batch import stack_samples
from aurora_loop.model.checkpoint import CheckpointError, state_dict_to_params, to_legacy_layout
from aurora_loop.model.reference_export import (
    OWN_FIELDS,
    REFERENCE_KWARGS,
    params_to_state_dict,
    reference_kwargs,
    reference_kwargs_json,
)
from aurora_loop.parallel import make_mesh
from aurora_loop.task import make_task
from aurora_loop.trainer import Trainer
from tests.fixtures import aurora_data as fx
from tests.synthetic import make_samples

HAS_TORCH = importlib.util.find_spec("torch") is not None

# The keyword arguments of aurora.Aurora.__init__ (microsoft-aurora 2.0.1), for checking that
# an exported kwargs JSON names nothing else.
REFERENCE_SIGNATURE = {
    "surf_vars", "static_vars", "atmos_vars", "window_size", "encoder_depths", "encoder_num_heads", "decoder_depths",
    "decoder_num_heads", "latent_levels", "patch_size", "embed_dim", "num_heads", "mlp_ratio", "drop_path", "drop_rate",
    "enc_depth", "dec_depth", "dec_mlp_ratio", "perceiver_ln_eps", "max_history_size", "timestep", "stabilise_level_agg",
    "use_lora", "lora_steps", "lora_mode", "surf_stats", "autocast", "autocast_dtype", "bf16_mode", "use_fp16_safe_attention",
    "level_condition", "dynamic_vars", "atmos_static_vars", "separate_perceiver", "modulation_heads", "positive_surf_vars",
    "positive_atmos_vars", "clamp_at_first_step", "simulate_indexing_bug", "stochastic", "use_updated_lead_time_embedding",
    "variable_lead_time", "rollout_input_clipping", "output_only_surf_vars", "output_only_atmos_vars",
}


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    assert a.dtype == np.float32, a.dtype
    return a.view(np.uint32)


def _assert_same_bits(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.fixture(scope="module")
def fixture():
    data = fx.load()
    return fx.config(data), fx.state_dict(data), fx.meta(data)["model"]


@pytest.fixture(scope="module")
def fixture_params(fixture):
    cfg, state, _ = fixture
    return load_reference_params(cfg, state)


# --- the mapping ----------------------------------------------------------------------------

def test_fixture_state_dict_round_trips_bit_for_bit(fixture, fixture_params) -> None:
    """Reference state dict -> our params -> reference state dict gives the fixture's
    ``param/*`` back: the same names, shapes, dtype and bits."""
    cfg, state, _ = fixture
    exported = params_to_state_dict(cfg, fixture_params)
    assert set(exported) == set(state)
    for name, value in state.items():
        assert exported[name].shape == value.shape, name
        np.testing.assert_array_equal(_bits(exported[name]), _bits(value), err_msg=name)
    # A wrapped {"params": ...} tree and jax arrays are taken too.
    again = params_to_state_dict(cfg, {"params": jax.tree_util.tree_map(jax.numpy.asarray, fixture_params)})
    assert all(np.array_equal(again[k], exported[k]) for k in exported)


def test_lora_and_stabilised_configs_invert_the_importer() -> None:
    """Configs the fixture does not cover (LoRA per step, extra level-agg norms, two Perceiver
    blocks, fewer variables): params -> state dict -> params is the identity, and the names
    are the reference's (LoRA adapters as ``attn.lora_qkv.loras.<step>.lora_A``)."""
    from aurora_loop.model.checkpoint import param_shapes

    cfg = AuroraConfig.preset("tiny", use_lora=True, lora_mode="all", lora_steps=3, stabilise_level_agg=True, enc_depth=2,
                              surf_vars=("2t", "msl"), static_vars=("lsm",), atmos_vars=("z", "t"))
    shapes = param_shapes(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    state = params_to_state_dict(cfg, params)
    lora = state["backbone.encoder_layers.0.blocks.0.attn.lora_qkv.loras.2.lora_A"]
    assert lora.shape == (8, 32)  # (r, in): torch's layout
    np.testing.assert_array_equal(lora, params["backbone"]["encoder_layers_0"]["blocks_0"]["attn"]["lora_qkv"]["lora_A"][2].T)
    assert "backbone.encoder_layers.0.blocks.0.attn.lora_qkv.loras.3.lora_A" not in state
    # The extra norms are on the first level-aggregation block only, as in the reference.
    assert "encoder.level_agg.layers.0.0.ln_k.weight" in state and "encoder.level_agg.layers.1.0.ln_k.weight" not in state
    assert "encoder.level_agg.layers.1.1.net.2.bias" in state and "encoder.level_agg.layers.1.3.weight" in state
    assert state["encoder.surf_token_embeds.weights.lsm"].shape == (32, 1, 2, 4, 4)
    assert sorted(k.split(".")[-2] for k in state if k.startswith("decoder.surf_heads.")) == ["2t", "2t", "msl", "msl"]
    _assert_same_bits(state_dict_to_params(cfg, state, shapes), params)

    with pytest.raises(CheckpointError, match="missing parameter"):
        params_to_state_dict(cfg.replace(enc_depth=3), params)


def test_reference_kwargs_are_the_constructors() -> None:
    """Every AuroraConfig field is either a reference keyword argument or listed as ours; the
    kwargs rebuild the same config, and their JSON form is plain JSON."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(AuroraConfig)}
    assert fields - set(OWN_FIELDS) - {"timestep_hours"} <= set(REFERENCE_KWARGS) <= REFERENCE_SIGNATURE
    cfg = AuroraConfig.preset("small", remat=True, surf_stats={"2t": (1.0, 2.0)}, timestep_hours=12.0, use_lora=True, lora_mode="all")
    kwargs = reference_kwargs(cfg)
    assert set(kwargs) <= REFERENCE_SIGNATURE and "remat" not in kwargs
    assert kwargs["timestep"].total_seconds() == 12 * 3600 and kwargs["surf_stats"] == {"2t": (1.0, 2.0)}
    assert kwargs["encoder_depths"] == (2, 6, 2) and kwargs["embed_dim"] == 256 and kwargs["lora_mode"] == "all"
    assert AuroraConfig(**kwargs) == cfg.replace(remat=False)
    as_json = json.loads(json.dumps(reference_kwargs_json(cfg)))
    assert as_json["timestep"] == 12.0 and as_json["window_size"] == [2, 6, 12]
    assert AuroraConfig(**as_json) == cfg.replace(remat=False)
    assert "timestep" not in reference_kwargs_json(AuroraConfig.preset("tiny"))  # the default 6 h: left to the reference
    assert "surf_stats" not in reference_kwargs_json(AuroraConfig.preset("tiny"))
    if HAS_TORCH and importlib.util.find_spec("aurora") is not None:  # the reference itself, when installed
        import aurora

        assert set(kwargs) <= set(inspect.signature(aurora.Aurora.__init__).parameters)


def test_fixture_kwargs_match_the_fixtures_constructor_arguments(fixture) -> None:
    """The fixture was built with ``aurora.Aurora(**meta["model"])``: our kwargs for its config
    agree with those on every argument the fixture gave."""
    cfg, _, model_kwargs = fixture
    ours = reference_kwargs_json(cfg)
    for name, value in model_kwargs.items():
        assert ours[name] == value, name


# --- files on disk and the import-checkpoint tool -----------------------------------------------

@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_import_export_import_is_the_identity(fixture, fixture_params, layout, tmp_path, capsys) -> None:
    """A reference checkpoint in either published layout, as .npz and .safetensors files:
    ``aurora-loop import-checkpoint`` -> params_to_state_dict -> files -> import again gives
    the same parameters bit for bit (and, from the current layout, the same file contents)."""
    cfg, state, model_kwargs = fixture
    source = state if layout == "current" else to_legacy_layout(state, cfg.patch_size)
    kwargs_file = tmp_path / "model.json"
    kwargs_file.write_text(json.dumps(model_kwargs))
    src = tmp_path / f"{layout}.safetensors"
    write_safetensors(str(src), source)
    assert aurora_loop_main(["import-checkpoint", str(src), "--model", str(kwargs_file), "--out", str(tmp_path / "seed")]) == 0
    imported = load_params(str(tmp_path / "seed"))
    _assert_same_bits(imported, fixture_params)

    exported = params_to_state_dict(cfg, imported)
    write_safetensors(str(tmp_path / "out.safetensors"), exported)
    with open(tmp_path / "out.npz", "wb") as fh:
        np.savez(fh, **exported)
    for name in ("out.safetensors", "out.npz"):
        path = tmp_path / name
        read = read_safetensors(str(path)) if name.endswith(".safetensors") else read_npz(str(path))
        assert set(read) == set(state)
        for key in state:
            np.testing.assert_array_equal(_bits(read[key]), _bits(state[key]), err_msg=key)
        seed = tmp_path / f"seed-{name}"
        assert aurora_loop_main(["import-checkpoint", str(path), "--model", str(kwargs_file), "--out", str(seed)]) == 0
        _assert_same_bits(load_params(str(seed)), imported)
    capsys.readouterr()


def test_safetensors_file_layout(tmp_path) -> None:
    """The header: 8-byte little-endian length, JSON padded to 8 bytes, F32 entries whose
    offsets tile the data exactly; the data little-endian float32."""
    state = {"b.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1.5], np.float32)}
    path = tmp_path / "x.safetensors"
    write_safetensors(str(path), state, {"format": "pt"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert header["b.weight"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["a"] == {"dtype": "F32", "shape": [1], "data_offsets": [24, 28]}
    assert len(raw) == 8 + size + 28
    assert np.frombuffer(raw[8 + size : 8 + size + 24], "<f4").tolist() == list(range(6))
    read = read_safetensors(str(path))
    assert read.keys() == state.keys() and all(np.array_equal(read[k], state[k]) for k in state)


# --- a real run and export-checkpoint -------------------------------------------------------------

@pytest.fixture(scope="module")
def aurora_run(tmp_path_factory):
    """A tiny Aurora trained two steps (with a moving average of the weights), checkpointed.
    One Swin stage keeps the compilation short (the fixture tests cover the full tiny tree)."""
    run_dir = tmp_path_factory.mktemp("aurora_run")
    one_stage = {"encoder_depths": [1], "decoder_depths": [1], "encoder_num_heads": [2], "decoder_num_heads": [2]}
    training = TrainingConfig(model="tiny", surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"),
                              levels=(500, 850), output_dir=str(run_dir), model_kwargs=one_stage)
    with open(run_dir / "config.json", "w") as fh:
        json.dump(training.to_json_dict(), fh)
    task = make_task("tiny", training)
    samples = make_samples(4, grid=(16, 32))
    train = ArrayLoader(samples, 2, stack_samples, seed=0)
    checkpoint = ModelCheckpoint(str(run_dir / "checkpoints"), every_n_steps=1, max_to_keep=3, verbose=False)
    trainer = Trainer([checkpoint], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1), ema_decay=0.5)
    state = trainer.fit(task, train)
    assert int(state.step) == 2
    return run_dir, task.model_config, jax.device_get(state.params), jax.device_get(state.ema_params)


def _export(run_dir, *extra) -> int:
    return aurora_loop_main(["export-checkpoint", str(run_dir), *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_run_exports_to_reference_state_dict(aurora_run, fmt, tmp_path, capsys) -> None:
    """``--format safetensors|npz``: re-importing the file with our importer gives the run's
    weights bit for bit (the moving average by default, the trained ones with --weights raw);
    ``PATH.json`` holds only reference keyword names and rebuilds the run's config."""
    run_dir, config, params, ema = aurora_run
    out = tmp_path / f"model.{fmt}"
    assert _export(run_dir, "--format", fmt, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"Exported step 2 to {out}" in printed and "moving average" in printed
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, out.name + ".json"])  # no temporary files left

    kwargs = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert set(kwargs) <= REFERENCE_SIGNATURE and "remat" not in kwargs
    assert kwargs["surf_vars"] == ["2t", "msl"] and kwargs["atmos_vars"] == ["z", "t"] and "timestep" not in kwargs
    assert kwargs["encoder_depths"] == [1] and kwargs["embed_dim"] == 32
    rebuilt = AuroraConfig(**kwargs)
    assert rebuilt == config.replace(remat=False)

    read = read_safetensors(str(out)) if fmt == "safetensors" else read_npz(str(out))
    assert "encoder.surf_token_embeds.weights.lsm" in read and "decoder.atmos_heads.t.bias" in read
    _assert_same_bits(load_reference_params(rebuilt, read), ema)
    # ... and through import-checkpoint, with the exported kwargs as --model.
    seed = tmp_path / "seed"
    assert aurora_loop_main(["import-checkpoint", str(out), "--model", str(tmp_path / f"{out.name}.json"), "--out", str(seed)]) == 0
    _assert_same_bits(load_params(str(seed)), ema)

    raw = tmp_path / "raw" / f"model.{fmt}"
    assert _export(run_dir, "--format", fmt, "--weights", "raw", "--step", "1", "--out", str(raw)) == 0
    read = read_safetensors(str(raw)) if fmt == "safetensors" else read_npz(str(raw))
    step1 = load_reference_params(rebuilt, read)
    assert not np.array_equal(np.asarray(step1["encoder"]["pos_embed"]["kernel"]), np.asarray(params["encoder"]["pos_embed"]["kernel"]))
    assert _export(run_dir, "--format", fmt, "--weights", "raw", "--force", "--out", str(raw)) == 0
    read = read_safetensors(str(raw)) if fmt == "safetensors" else read_npz(str(raw))
    _assert_same_bits(load_reference_params(rebuilt, read), params)
    capsys.readouterr()


def test_torch_format(aurora_run, tmp_path, capsys) -> None:
    """``--format torch``: without PyTorch, one line naming the fix, exit 2, nothing written;
    with it, ``torch.load`` gives a plain dict name -> tensor equal to the run's weights."""
    run_dir, config, _params, ema = aurora_run
    out = tmp_path / "model.ckpt"
    status = _export(run_dir, "--format", "torch", "--out", str(out))
    if not HAS_TORCH:
        assert status == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("aurora-loop export-checkpoint: error:")
        assert "needs PyTorch" in err and "aurora_loop[torch]" in err and "--format safetensors" in err
        assert os.listdir(tmp_path) == []
        return
    import torch

    assert status == 0
    state = torch.load(str(out), map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())
    read = {k: v.numpy() for k, v in state.items()}
    _assert_same_bits(load_reference_params(AuroraConfig(**json.loads((tmp_path / "model.ckpt.json").read_text())), read), ema)


def test_bad_requests_fail_with_one_line_and_write_nothing(aurora_run, tmp_path, capsys) -> None:
    run_dir, *_ = aurora_run
    taken = tmp_path / "taken.npz"
    taken.write_bytes(b"mine")
    (tmp_path / "dir.npz").mkdir()
    cases = [
        (["--format", "npz", "--out", str(taken)], "exists"),
        (["--format", "npz", "--out", str(tmp_path / "dir.npz")], "is a directory"),
        (["--format", "npz", "--out", str(tmp_path / "model.safetensors")], "writes a .npz file"),
        (["--format", "safetensors", "--out", str(tmp_path / "model")], "writes a .safetensors file"),
        (["--format", "safetensors", "--out", str(tmp_path / "a.safetensors"), "--step", "99"], "no checkpoint for step 99"),
    ]
    for extra, message in cases:
        assert _export(run_dir, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("aurora-loop export-checkpoint: error:"), err
    assert taken.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["dir.npz", "taken.npz"]


def test_conv_runs_are_refused(tmp_path, capsys) -> None:
    """Only Aurora runs have a reference state dict; the conv task is refused in one line."""
    run_dir = tmp_path / "conv"
    (run_dir / "checkpoints").mkdir(parents=True)
    with open(run_dir / "config.json", "w") as fh:
        json.dump(TrainingConfig(model="conv", output_dir=str(run_dir)).to_json_dict(), fh)
    # A complete-looking step directory: the refusal comes before any weights are read.
    (run_dir / "checkpoints" / "3" / "state").mkdir(parents=True)
    (run_dir / "checkpoints" / "3" / "meta").mkdir()
    out = tmp_path / "out" / "model.npz"
    assert _export(run_dir, "--format", "npz", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not an Aurora model" in err and "--format orbax" in err
    assert not (tmp_path / "out").exists()
