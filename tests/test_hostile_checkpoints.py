"""Checkpoints as an attacker would craft them (issue 24): a checkpoint is data, never code.

Every crafted file is made by the test in tmp_path. Payloads that would run code write a marker file
when run; each test asserts the marker does not exist and the one-line error that names the file.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import jax
import msgpack
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import convert
import jaxvit
from jaxvit.checkpoint import param_shapes
from predmaps import cli

# A real timm architecture at depth 1 and 32 px: what a timm save_for_hf folder of it holds.
ARCH = "vit_tiny_patch16_224"
ARGS = {"depth": 1, "img_size": [32, 32], "num_classes": 5}
CFG = jaxvit.get_config(ARCH, depth=1, img_size=(32, 32), num_classes=5)


def _params(cfg=CFG):
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32), param_shapes(cfg))


class _RunsCode:
    """Unpickling this creates `marker`: the proof that a pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return self.marker.touch, ()


def _timm_folder(path, model_args, **extra):
    """A timm hub layout: clean model.safetensors and a config.json with `model_args`."""
    path.mkdir()
    save_file(convert.export_state_dict(_params()), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 5, "model_args": model_args,
                                                  "pretrained_cfg": {"tag": None}, **extra}))
    return path


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return path


def _cli_refuses(argv, capsys, want: str) -> None:
    """predmaps explain exits 2 with exactly one stderr line, starting with `want`."""
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith(f"error: {want}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# 1. config.json's model_args reach timm.create_model only through the allow-list.

@pytest.mark.parametrize("key, value", [
    ("checkpoint_path", "evil.pth"),  # timm torch.loads it (weights_only=False in timm 1.0.20-1.0.24)
    ("pretrained", True),
    ("pretrained_cfg", {"file": "evil.pth"}),
    ("pretrained_cfg_overlay", {"file": "evil.pth"}),
    ("cache_dir", "."),
    ("norm_layer", "layernorm"),  # a layer argument names code
])
def test_model_args_that_could_load_a_file_are_refused_by_name(key, value, tmp_path, monkeypatch, capsys):
    """The issue's case: a config.json whose model_args name a pickle beside clean weights. Refused
    before timm builds anything, naming the argument and what is accepted; the pickle never runs,
    through convert.load, `python -m convert` and `predmaps explain --model DIR`."""
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)  # "evil.pth" resolves here, as it would for timm
    marker = tmp_path / "ran"
    import torch

    torch.save({"pos_embed": _RunsCode(marker)}, str(tmp_path / "evil.pth"))
    folder = _timm_folder(tmp_path / "ckpt", dict(ARGS, **{key: value}))
    want = (f"{folder / 'config.json'}: model_args {key!r} is refused: a checkpoint may give only these "
            "timm.create_model arguments: act_layer, attn_drop_rate, class_token, depth, ")
    with pytest.raises(ValueError) as e:
        convert.load(folder)
    assert str(e.value).startswith(want) and "\n" not in str(e.value), e.value

    from convert.__main__ import main as convert_main

    assert convert_main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + want) and err.count("\n") == 1, err
    _cli_refuses(["explain", str(_image(tmp_path)), "--model", str(folder), "--out", str(tmp_path / "maps")], capsys,
                 want)
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "maps").exists()
    # The same folder with allowed arguments only loads: the refusal is the argument's, not the folder's.
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "model_args": ARGS}))
    assert convert.load(folder)[0].config.depth == 1


@pytest.mark.parametrize("key, value, want", [
    ("depth", 1000000, "model_args depth must be an integer from 1 to 256; got 1000000 (int)"),  # ran 120 s+
    ("depth", "12", "model_args depth must be an integer from 1 to 256; got '12' (str)"),
    ("depth", -1, "model_args depth must be an integer from 1 to 256; got -1 (int)"),
    ("depth", True, "model_args depth must be an integer from 1 to 256; got True (bool)"),
    ("num_heads", 0, "model_args num_heads must be an integer from 1 to 1024; got 0 (int)"),
    ("patch_size", 0, "model_args patch_size must be an integer from 1 to 1024; got 0 (int)"),
    ("embed_dim", -192, "model_args embed_dim must be an integer from 1 to 16384; got -192 (int)"),
    ("img_size", [32, 0], "model_args img_size must be an integer or [height, width], each from 1 to 8192; got [32, 0]"),
    ("global_pool", "map", "model_args global_pool must be one of token, avg, avgmax, max; got 'map'"),
    ("act_layer", "os.system", "model_args act_layer must be one of gelu, quick_gelu, gelu_tanh; got 'os.system'"),
    ("mlp_ratio", float("nan"), "model_args mlp_ratio must be a number in (0, 64]; got nan"),
    ("qkv_bias", "yes", "model_args qkv_bias must be true or false; got 'yes'"),
    ("drop_path_rate", 2, "model_args drop_path_rate must be a number in [0, 1); got 2"),
])
def test_model_args_of_wrong_type_or_range_name_the_argument_and_the_file(key, value, want, tmp_path):
    """Checked before timm (or, without timm, the bundled table) builds anything: no ZeroDivisionError,
    TypeError, numpy's "Need at least one array to stack", nor minutes of building a million blocks."""
    folder = _timm_folder(tmp_path / "ckpt", dict(ARGS, **{key: value}))
    with pytest.raises(ValueError) as e:
        convert.load(folder)
    assert str(e.value) == f"{folder / 'config.json'}: {want}"
    # resolve_config checks them first, whether it then goes to timm or to the bundled table.
    with pytest.raises(ValueError, match=f"^{want[:30]}"):
        convert.timm_vit.resolve_config(ARCH, model_args={key: value})


def test_architecture_of_a_config_json_is_a_model_name_not_a_path(tmp_path):
    """timm reads a 'local-dir:' or 'hf-hub:' name as a place to fetch a config (and its model_args)."""
    folder = _timm_folder(tmp_path / "ckpt", ARGS)
    (folder / "config.json").write_text(json.dumps({"architecture": f"local-dir:{tmp_path}", "model_args": ARGS}))
    with pytest.raises(ValueError) as e:
        convert.load(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: architecture 'local-dir:{tmp_path}' is no timm model "
                                   "name"), e.value


# ---------------------------------------------------------------------------------------------
# 2. The fields of a jaxvit config, from a jaxvit checkpoint or a timm export's jaxvit_config.

BAD_FIELDS = [
    ("depth", 1000000, "depth must be an integer from 1 to 256; got 1000000 (int)"),
    ("depth", "12", "depth must be an integer from 1 to 256; got '12' (str)"),
    ("depth", -1, "depth must be an integer from 1 to 256; got -1 (int)"),
    ("num_heads", 0, "num_heads must be an integer from 1 to 1024; got 0 (int)"),
    ("num_heads", 5, "embed_dim 192 is not divisible by num_heads 5 (give head_dim for heads of another width)"),
    ("patch_size", 0, "patch_size must be an integer from 1 to 1024; got 0 (int)"),
    ("patch_size", 64, "patch_size 64 is larger than img_size (32, 32)"),
    ("embed_dim", -768, "embed_dim must be an integer from 1 to 16384; got -768 (int)"),
    ("num_classes", -1, "num_classes must be an integer from 0 to 1048576; got -1 (int)"),
    ("img_size", [32, 100000], "img_size must be a positive integer or (height, width); got [32, 100000] (list): "
                               "each side from 1 to 8192"),
    ("qkv_bias", 1, "qkv_bias must be true or false; got 1 (int)"),
    ("norm_eps", 0, "norm_eps must be a number in (0, 1]; got 0 (int)"),
    ("std", [0.5, 0, 0.5], "std must be a list of positive numbers, one per channel; got [0.5, 0, 0.5] (list)"),
    ("label_names", 5, "label_names must be a list of strings (one per class) or null; got 5 (int)"),
]


@pytest.mark.parametrize("key, value, want", BAD_FIELDS)
def test_jaxvit_checkpoint_config_fields_are_checked_before_anything_is_built(key, value, want, tmp_path):
    """One check (ViTConfig's) for every source; the loaders name the file."""
    ckpt = jaxvit.save(tmp_path / "ckpt", CFG, _params())
    stored = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(stored, **{key: value})))
    for load in (jaxvit.load, convert.load):
        with pytest.raises(ValueError) as e:
            load(ckpt)
        assert str(e.value) == f"{ckpt / 'config.json'}: {want}", e.value


def test_timm_export_jaxvit_config_is_checked_and_named(tmp_path, capsys):
    folder = _timm_folder(tmp_path / "export", ARGS, jaxvit_config=dict(CFG.to_dict(), depth=1000000))
    want = f"{folder / 'config.json'}: depth must be an integer from 1 to 256; got 1000000 (int)"
    with pytest.raises(ValueError) as e:
        convert.load(folder)
    assert str(e.value) == want
    _cli_refuses(["explain", str(_image(tmp_path)), "--model", str(folder), "--out", str(tmp_path / "maps")], capsys,
                 want)


def test_tensor_shapes_beyond_the_limits_name_the_weights(tmp_path):
    """A bare state dict whose block keys say 300 blocks: inferred, then refused as any config is."""
    sd = convert.export_state_dict(_params())
    sd["blocks.299.norm1.weight"] = sd["blocks.0.norm1.weight"]
    path = tmp_path / "deep.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as e:
        convert.load(path, num_heads=3)
    assert str(e.value) == f"{path}: depth must be an integer from 1 to 256; got 300 (int)"


# ---------------------------------------------------------------------------------------------
# 3. params.msgpack holds numbers only.

def _ndarray_ext(shape, dtype_name: bytes, buffer: bytes) -> msgpack.ExtType:
    """flax.serialization's encoding of one array (ext type 1), with any dtype name."""
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype_name, buffer), use_bin_type=True))


@pytest.mark.parametrize("dtype_name, buffer, want", [
    (b"U10;rm -rf", b"\0" * 40, "is damaged (data type 'U10;rm -rf' not understood; e.g. an interrupted copy)"),
    (b"<U1", b"a\0\0\0" * 192, "holds an array of dtype <U1 at ['cls_token']: jaxvit params are floating-point arrays"),
    (b"int32", b"\0" * 768, "holds an array of dtype int32 at ['cls_token']: jaxvit params are floating-point arrays"),
])
def test_msgpack_params_of_other_dtypes_are_refused(dtype_name, buffer, want, tmp_path):
    ckpt = jaxvit.save(tmp_path / "ckpt", CFG, _params())
    tree = msgpack.unpackb((ckpt / "params.msgpack").read_bytes(), raw=False)
    tree["cls_token"] = _ndarray_ext((1, 1, 192), dtype_name, buffer)
    (ckpt / "params.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(ValueError) as e:
        jaxvit.load(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'params.msgpack'} {want}"), e.value


# ---------------------------------------------------------------------------------------------
# 4. Pickles that hold code; a --model that is a broken link.

@pytest.mark.parametrize("how", ["torch.save", "protocol 4", "protocol 5"])
def test_a_pickle_with_code_is_refused_as_code_and_never_run(how, tmp_path, capsys):
    """torch.save writes GLOBAL opcodes (torch names the callable); a pickle of protocol 4 or more uses
    STACK_GLOBAL, which torch 2.14 reports only as "Unsupported operand 149" and called damaged. Either
    way: the file contains code, named, refused; never torch's advice to load with weights_only=False."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    payload = {"pos_embed": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    with pytest.raises(ValueError) as e:
        convert.load(path, model_name=ARCH)
    msg = str(e.value)
    assert msg.startswith(f"{path} contains code: its pickle references ") and "getattr" in msg, msg
    assert "pathlib.PosixPath, beyond tensors" in msg and "refuses it and runs nothing from it" in msg
    assert "\n" not in msg and "weights_only" not in msg and "\x1b" not in msg
    _cli_refuses(["explain", str(_image(tmp_path)), "--model", str(path), "--model-name", ARCH, "--out",
                  str(tmp_path / "maps")], capsys, f"{path} contains code: ")
    assert not marker.exists()


def test_a_broken_link_as_model_is_a_broken_link_not_a_model_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").symlink_to(tmp_path / "gone.safetensors")
    want = f"mymodel is a broken symbolic link: it points to {tmp_path / 'gone.safetensors'}, which does not exist"
    with pytest.raises(FileNotFoundError, match=f"^{want}$"):
        convert.load("mymodel")
    _cli_refuses(["explain", str(_image(tmp_path)), "--model", "mymodel", "--out", str(tmp_path / "maps")], capsys,
                 want)


def test_cli_refusal_of_a_crafted_config_is_one_line_in_a_fresh_process(tmp_path):
    """The one case run as a user runs it: `python -m convert DIR --out x`, exit 2, one stderr line."""
    folder = _timm_folder(tmp_path / "ckpt", dict(ARGS, checkpoint_path="evil.pth"))
    proc = subprocess.run([sys.executable, "-m", "convert", str(folder), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {folder / 'config.json'}: model_args 'checkpoint_path' is refused")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key, value, want", [case for case in BAD_FIELDS if case[0] != "patch_size" or case[1] == 0])
def test_keyword_arguments_get_the_same_check(key, value, want):
    """A config from a user's keywords (ViTConfig(...), get_config overrides) is checked as one from a file."""
    kw = dict(embed_dim=192, num_heads=3, img_size=(32, 32))
    with pytest.raises(jaxvit.config.ConfigError, match=f"^{want[:40].replace('(', '.').replace('[', '.')}"):
        jaxvit.ViTConfig(**dict(kw, **{key: value}))
    with pytest.raises(jaxvit.config.ConfigError):
        jaxvit.get_config(ARCH, **{key: value})


def test_an_export_under_its_own_unresolvable_name_still_loads(tmp_path):
    """The name check applies only to a name that is resolved: save_timm's export of a network timm
    cannot build keeps the config's own name (any string), and its jaxvit_config says what it is."""
    cfg = jaxvit.ViTConfig(name="my net/v2", img_size=(32, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           head_dim=8, mlp_dim=64, num_classes=5)
    out = convert.save_timm(_params(cfg), cfg, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architecture"] == "my net/v2"
    assert convert.load(out)[0].config == cfg


def test_pretrained_cfg_data_settings_are_checked_and_named(tmp_path):
    """config.json's normalisation reaches the eval transform: a zero std would divide by zero."""
    folder = _timm_folder(tmp_path / "ckpt", ARGS)
    stored = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(stored, pretrained_cfg={"tag": None, "std": [0, 1, "x"]})))
    with pytest.raises(ValueError) as e:
        convert.load(folder)
    assert str(e.value) == (f"{folder / 'config.json'}: std must be a list of positive numbers, one per channel; "
                            "got (0.0, 1.0, 'x') (tuple)")
