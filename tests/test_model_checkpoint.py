"""Reference state dicts in both layouts, the seed checkpoint layout, and import-checkpoint."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

from aurora_loop.cli.tools import main as aurora_loop_main
from aurora_loop.model import CheckpointError, load_params, load_reference_params, save_params
from aurora_loop.model.checkpoint import to_legacy_layout
from tests.fixtures import aurora_data as fx


@pytest.fixture(scope="module")
def fixture():
    data = fx.load()
    return fx.config(data), fx.state_dict(data)


def _assert_same(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_both_layouts_load_to_the_same_params(fixture) -> None:
    cfg, state = fixture
    legacy = to_legacy_layout(state, cfg.patch_size)
    assert all(k.startswith("net.") for k in legacy)
    assert legacy["net.encoder.surf_token_embeds.weight"].shape == (32, 7, 2, 4, 4)
    assert legacy["net.decoder.surf_head.weight"].shape == (4 * 16, 64)
    # Row i*V + v of the fused head is pixel i of variable v.
    np.testing.assert_array_equal(legacy["net.decoder.surf_head.weight"][3 * 4 + 2], state["decoder.surf_heads.10v.weight"][3])
    params = load_reference_params(cfg, state)
    _assert_same(params, load_reference_params(cfg, legacy))
    # The mapping is faithful: a few spot checks against the state dict.
    np.testing.assert_array_equal(params["encoder"]["pos_embed"]["kernel"], state["encoder.pos_embed.weight"].T)
    np.testing.assert_array_equal(
        params["backbone"]["encoder_layers_1"]["blocks_1"]["norm2"]["modulation"]["bias"],
        state["backbone.encoder_layers.1.blocks.1.norm2.ln_modulation.1.bias"],
    )
    np.testing.assert_array_equal(params["decoder"]["atmos_heads"]["kernel"][4], state["decoder.atmos_heads.q.weight"].T)
    np.testing.assert_array_equal(
        params["encoder"]["surf_token_embeds"]["weight"][5], state["encoder.surf_token_embeds.weights.z"][:, 0].transpose(1, 2, 3, 0)
    )


def test_mismatches_name_the_parameter(fixture) -> None:
    cfg, state = fixture
    missing = dict(state)
    del missing["backbone.decoder_layers.1.blocks.0.attn.qkv.bias"]
    with pytest.raises(CheckpointError, match="backbone/decoder_layers_1/blocks_0/attn/qkv/bias"):
        load_reference_params(cfg, missing)
    wrong = dict(state, **{"encoder.pos_embed.weight": np.zeros((32, 16), np.float32)})
    with pytest.raises(CheckpointError, match="encoder/pos_embed/kernel"):
        load_reference_params(cfg, wrong)
    extra = dict(state, **{"encoder.surf_token_embeds.weights.sst": state["encoder.surf_token_embeds.weights.2t"]})
    with pytest.raises(CheckpointError, match="sst"):
        load_reference_params(cfg, extra)


def test_shorter_history_is_zero_padded(fixture) -> None:
    cfg, state = fixture
    short = {k: (v[:, :, :1] if "token_embeds.weights." in k else v) for k, v in state.items()}
    params = load_reference_params(cfg, short)
    weight = np.asarray(params["encoder"]["atmos_token_embeds"]["weight"])
    assert np.all(weight[:, 1] == 0) and np.any(weight[:, 0] != 0)
    with pytest.raises(CheckpointError, match="max_history_size"):
        load_reference_params(cfg.replace(max_history_size=1), state)


def test_save_and_load_params(fixture, tmp_path) -> None:
    cfg, state = fixture
    params = load_reference_params(cfg, state)
    save_params(str(tmp_path / "ckpt"), cfg, params)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["backbone", "config.json", "decoder", "encoder"]
    _assert_same(load_params(str(tmp_path / "ckpt")), params)
    with pytest.raises(CheckpointError, match="shape"):
        load_params(str(tmp_path / "ckpt"), cfg.replace(embed_dim=64, num_heads=4))


def _write_safetensors(path, state) -> None:
    header, blobs, offset = {}, [], 0
    for name, value in state.items():
        raw = np.ascontiguousarray(value, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_import_checkpoint_tool(fixture, tmp_path, capsys) -> None:
    cfg, state = fixture
    expected = load_reference_params(cfg, state)
    config_json = tmp_path / "tiny.json"
    config_json.write_text(json.dumps(fx.meta(fx.load())["model"]))
    # The fixture itself (.npz with param/ keys), and the published layout as .safetensors.
    assert aurora_loop_main(["import-checkpoint", fx.SHARED, "--model", "tiny", "--out", str(tmp_path / "a")]) == 0
    _assert_same(load_params(str(tmp_path / "a")), expected)
    _write_safetensors(tmp_path / "legacy.safetensors", to_legacy_layout(state, cfg.patch_size))
    assert aurora_loop_main(["import-checkpoint", str(tmp_path / "legacy.safetensors"), "--model", str(config_json), "--out", str(tmp_path / "b")]) == 0
    _assert_same(load_params(str(tmp_path / "b")), expected)
    capsys.readouterr()

    # Bad input: one line, status 2, nothing overwritten.
    assert aurora_loop_main(["import-checkpoint", fx.SHARED, "--model", "small", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit --model small: missing parameter backbone/" in err
    assert not (tmp_path / "c").exists()
    assert aurora_loop_main(["import-checkpoint", fx.SHARED, "--model", "tiny", "--out", str(tmp_path / "a")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert aurora_loop_main(["import-checkpoint", str(tmp_path / "nope.ckpt"), "--model", "tiny", "--out", str(tmp_path / "d")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
