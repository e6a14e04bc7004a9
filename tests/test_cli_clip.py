"""`predmaps explain PHOTO --model <CLIP checkpoint> --text PROMPT ...` (predmaps.cli.clip): the paper's A.5 maps
from an open_clip folder, a transformers CLIPModel folder and a hub repo, without torch; its refusals.

The checkpoints are written from random numpy weights under open_clip's and transformers' own key names (the
strict loaders name any key these fixtures got wrong). Without torch the reference is the library called
directly (`convert.load_clip` + `text_similarity_maps` with `text_tower.encode` embeddings): that checks what
the CLI adds (the checkpoint, prompts, layer and eval transform it passes on, the files it writes); the towers'
numerics are test_clip_text.py's and test_convert_*.py's parity tests. With torch, a transformers CLIPModel's
maps are compared with transformers' own towers and open_clip's tokenizer end to end.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from test_clip_prompts import _draw

import convert
import jaxvit
import predmaps
from convert.clip_text import export_open_clip
from jaxvit.checkpoint import param_shapes
from jaxvit.clip_text import CLIPText, CLIPTextConfig
from jaxvit.config import ViTConfig
from predmaps import cli
from predmaps.cli.clip import is_clip_checkpoint

EMBED, WIDTH, DEPTH, PATCH, SIZE, CTX = 16, 32, 3, 8, 32, 16
PROMPTS = ["a dog", "a cat on a mat"]
VOCAB = 49408  # CLIP's: the bundled OpenAI BPE tokenises for it (no tokenizer.json needed)


def _vision_draw(rng, shape, bias=False):
    return (0.1 * rng.normal(size=shape) if bias else rng.normal(size=shape) * np.prod(shape[1:]) ** -0.5
            ).astype(np.float32)


def _ln(rng, key, out, width=WIDTH):
    out[f"{key}.weight"] = (1 + 0.1 * rng.normal(size=width)).astype(np.float32)
    out[f"{key}.bias"] = (0.1 * rng.normal(size=width)).astype(np.float32)


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """open_clip's layout (open_clip_model.safetensors + open_clip_config.json): image tower under `visual.`,
    the text tower at the top level (written by convert.clip_text.export_open_clip, which open_clip loads strictly)."""
    root = tmp_path_factory.mktemp("oc")
    rng = np.random.default_rng(0)
    sd = {"visual.conv1.weight": _vision_draw(rng, (WIDTH, 3, PATCH, PATCH)),
          "visual.class_embedding": _vision_draw(rng, (WIDTH,), bias=True),
          "visual.positional_embedding": _vision_draw(rng, ((SIZE // PATCH) ** 2 + 1, WIDTH), bias=True),
          "visual.proj": _vision_draw(rng, (WIDTH, EMBED))}
    _ln(rng, "visual.ln_pre", sd)
    _ln(rng, "visual.ln_post", sd)
    for i in range(DEPTH):
        b = f"visual.transformer.resblocks.{i}."
        _ln(rng, b + "ln_1", sd)
        _ln(rng, b + "ln_2", sd)
        for name, shape in (("attn.in_proj_", (3 * WIDTH, WIDTH)), ("attn.out_proj.", (WIDTH, WIDTH)),
                            ("mlp.c_fc.", (64, WIDTH)), ("mlp.c_proj.", (WIDTH, 64))):
            sd[b + name + "weight"] = _vision_draw(rng, shape)
            sd[b + name + "bias"] = _vision_draw(rng, shape[:1], bias=True)
    tcfg = CLIPTextConfig(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=2, layers=2, mlp_dim=64,
                          embed_dim=EMBED)
    shapes = jax.eval_shape(lambda: CLIPText(tcfg).init(jax.random.key(0), jnp.zeros((1, CTX), jnp.int32))["params"])
    sd.update(export_open_clip(jax.tree_util.tree_map_with_path(_draw(1), shapes), tcfg))
    save_file(sd, str(root / "open_clip_model.safetensors"))
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": EMBED, "quick_gelu": True,
        "vision_cfg": {"image_size": SIZE, "layers": DEPTH, "width": WIDTH, "patch_size": PATCH, "head_width": 16,
                       "mlp_ratio": 64 / WIDTH},
        "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": WIDTH, "heads": 2, "layers": 2,
                     "mlp_ratio": 64 / WIDTH}}}))
    return root


def _hf_layers(rng, prefix, n, out):
    for i in range(n):
        b = f"{prefix}.encoder.layers.{i}."
        _ln(rng, b + "layer_norm1", out)
        _ln(rng, b + "layer_norm2", out)
        for name, shape in (("self_attn.q_proj", (WIDTH, WIDTH)), ("self_attn.k_proj", (WIDTH, WIDTH)),
                            ("self_attn.v_proj", (WIDTH, WIDTH)), ("self_attn.out_proj", (WIDTH, WIDTH)),
                            ("mlp.fc1", (64, WIDTH)), ("mlp.fc2", (WIDTH, 64))):
            out[f"{b}{name}.weight"] = _vision_draw(rng, shape)
            out[f"{b}{name}.bias"] = _vision_draw(rng, shape[:1], bias=True)


HF_CONFIG = {
    "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": EMBED,
    # eos_token_id 2: the legacy value of OpenAI's hub configs, argmax pooling as open_clip
    "text_config": {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": CTX, "hidden_act": "quick_gelu",
                    "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1},
    "vision_config": {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": DEPTH,
                      "num_attention_heads": 2, "image_size": SIZE, "patch_size": PATCH, "hidden_act": "quick_gelu"}}
HF_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """transformers CLIPModel's layout (model.safetensors, config.json, preprocessor_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(2)
    v, t = "vision_model", "text_model"
    sd = {f"{v}.embeddings.class_embedding": _vision_draw(rng, (WIDTH,), bias=True),
          f"{v}.embeddings.patch_embedding.weight": _vision_draw(rng, (WIDTH, 3, PATCH, PATCH)),
          f"{v}.embeddings.position_embedding.weight": _vision_draw(rng, ((SIZE // PATCH) ** 2 + 1, WIDTH), bias=True),
          "visual_projection.weight": _vision_draw(rng, (EMBED, WIDTH)),
          f"{t}.embeddings.token_embedding.weight": _vision_draw(rng, (VOCAB, WIDTH), bias=True),
          f"{t}.embeddings.position_embedding.weight": _vision_draw(rng, (CTX, WIDTH), bias=True),
          "text_projection.weight": _vision_draw(rng, (EMBED, WIDTH)), "logit_scale": np.array(2.6592, np.float32)}
    _ln(rng, f"{v}.pre_layrnorm", sd)  # transformers' spelling
    _ln(rng, f"{v}.post_layernorm", sd)
    _ln(rng, f"{t}.final_layer_norm", sd)
    _hf_layers(rng, v, DEPTH, sd)
    _hf_layers(rng, t, 2, sd)
    save_file({k: np.ascontiguousarray(a) for k, a in sd.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    (root / "preprocessor_config.json").write_text(json.dumps(HF_PROCESSOR))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = [root / "dog photo.png", root / "cat.jpg"]
    for p, (h, w) in zip(paths, ((40, 48), (50, 36))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    return paths


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    cfg = ViTConfig(name="tiny", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, crop_pct=1.0)
    return jaxvit.save(tmp_path_factory.mktemp("vit") / "tiny",
                       cfg, jax.tree_util.tree_map_with_path(_draw(4), param_shapes(cfg)))


def _explain(photos, model, out, *extra):
    return cli.main(["explain", *map(str, photos), "--model", str(model), "--out", str(out),
                     *sum((["--text", p] for p in PROMPTS), []), *extra])


def _library_cosines(model_dir, photos):
    """(N, L + 1, K, gh, gw) cosines of the library called directly, one photo at a time as the report."""
    clip = convert.load_clip(model_dir)
    emb = clip.text_tower.encode(PROMPTS)
    return np.stack([np.asarray(predmaps.text_similarity_maps(
        clip.image_model, clip.image_params, jaxvit.preprocess.load_batch([p], clip.image_model.config),
        emb).similarity[0]) for p in photos])


@pytest.mark.parametrize("which", ["open_clip", "transformers"])
def test_explain_text_writes_the_a5_maps_of_the_library(which, open_clip_folder, hf_folder, photos, tmp_path, capsys):
    """Per photo one PNG per prompt at the penultimate token layer (Fig. 18) and the every-layer grid; clip.json's
    cosines are the library's for that layer, its per-layer ranges those of every layer; nothing else written."""
    folder = open_clip_folder if which == "open_clip" else hf_folder
    assert is_clip_checkpoint(folder)
    out = tmp_path / "out"
    assert _explain(photos, folder, out) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "clip.json").read_text())
    assert report["prompts"] == PROMPTS and report["layer"] == DEPTH - 1 and report["layers"] == DEPTH + 1
    want_files = {".predmaps-out", "clip.json"}
    sims = _library_cosines(folder, photos)
    for rec, path, sim in zip(report["images"], photos, sims):
        assert rec["image"] == str(path)
        want_files.update(rec["maps"] + [rec["layers_grid"]])
        assert len(rec["maps"]) == 2 and all(name in printed for name in rec["maps"])
        for k in range(2):
            # clip.json rounds to 6 decimals; the same jitted function on the same input otherwise
            np.testing.assert_allclose(rec["prompts"][k]["cosine"], sim[DEPTH - 1, k], atol=1e-6, rtol=0)
            np.testing.assert_allclose(rec["prompts"][k]["cosine_range_per_layer"],
                                       np.stack([sim[:, k].reshape(DEPTH + 1, -1).min(1),
                                                 sim[:, k].reshape(DEPTH + 1, -1).max(1)], 1), atol=1e-6, rtol=0)
            assert Image.open(out / rec["maps"][k]).size == (min(Image.open(path).size),) * 2  # the centre crop seen
    assert {p.name for p in out.iterdir()} == want_files
    assert rec["maps"][1] == "cat_1_a-cat-on-a-mat.png"
    # The last layer by --layers; the map differs from the penultimate one by far more than the rounding.
    assert _explain(photos[:1], folder, out, "--layers", "-1") == 0  # a rerun into its own folder
    last = json.loads((out / "clip.json").read_text())
    assert last["layer"] == DEPTH
    np.testing.assert_allclose(last["images"][0]["prompts"][0]["cosine"], sims[0, DEPTH, 0], atol=1e-6, rtol=0)
    assert np.abs(sims[0, DEPTH, 0] - sims[0, DEPTH - 1, 0]).max() > 1e-2


def test_hub_repo_id_from_the_cache_offline(open_clip_folder, photos, hub_repo, tmp_path, capsys):
    hub_repo("someone/tiny-clip", open_clip_folder)
    assert is_clip_checkpoint("someone/tiny-clip")
    assert _explain(photos[:1], "someone/tiny-clip", tmp_path / "o") == 0
    assert json.loads((tmp_path / "o" / "clip.json").read_text())["images"][0]["maps"][0] == "dog-photo_0_a-dog.png"
    capsys.readouterr()
    assert _explain(photos[:1], "someone/not-cached", tmp_path / "o2") == 2
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_skipped_photos_exit_1_under_strict(open_clip_folder, photos, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert _explain([bad, photos[0]], open_clip_folder, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert err.startswith("skipped: cannot read image") and str(bad) in err
    assert _explain([bad, photos[0]], open_clip_folder, tmp_path / "b", "--strict") == 1
    report = json.loads((tmp_path / "b" / "clip.json").read_text())
    assert [r["image"] for r in report["images"]] == [str(photos[0])] and report["skipped"][0]["image"] == str(bad)
    capsys.readouterr()
    assert _explain([bad], open_clip_folder, tmp_path / "c") == 2
    assert "no readable image" in capsys.readouterr().err


def _refused(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(open_clip_folder, tiny_vit, photos, tmp_path, capsys):
    out = tmp_path / "out"
    main = cli.main
    # --text with a vision model that has no text tower: says what --text needs
    _refused(capsys, _explain(photos, tiny_vit, out), "--text also takes prompts for a CLIP checkpoint", "is not one")
    _refused(capsys, main(["explain", str(photos[0]), "--text", "a dog", "--out", str(out)]), "embedded digit model")
    _refused(capsys, _explain(photos, "vit_base_patch16_clip_224.openai", out), "image towers alone")
    _refused(capsys, main(["explain", str(photos[0]), "--model", str(open_clip_folder), "--text", " ",
                           "--out", str(out)]), "non-empty prompt")
    _refused(capsys, _explain(photos, open_clip_folder, out, "--layers", "-1,-2"), "one token layer")
    _refused(capsys, _explain(photos, open_clip_folder, out, "--layers", "9"), "--layers")
    _refused(capsys, _explain(photos, open_clip_folder, out, "--labels", "1,2", "--classes", "top3"),
             "--labels, --classes do(es) not apply")
    _refused(capsys, _explain(photos, open_clip_folder, out, "--cmap", "nope"), "--cmap")
    assert not out.exists()
    # an unreadable or unsupported checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text((open_clip_folder / "open_clip_config.json").read_text())
    (broken / "open_clip_model.safetensors").write_bytes(b"not safetensors")
    _refused(capsys, _explain(photos, broken, out), str(broken))
    image_only = tmp_path / "image_only"
    image_only.mkdir()
    (image_only / "open_clip_config.json").write_text((open_clip_folder / "open_clip_config.json").read_text())
    from safetensors.numpy import load_file

    sd = load_file(str(open_clip_folder / "open_clip_model.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("visual.")}, str(image_only / "open_clip_model.safetensors"))
    _refused(capsys, _explain(photos, image_only, out), "holds no CLIP text tower")
    (tmp_path / "bad.safetensors").write_text("not safetensors")  # a weights file is read for its keys
    _refused(capsys, _explain(photos, tmp_path / "bad.safetensors", out), "cannot read", "bad.safetensors")
    assert not out.exists()
    # a folder of the user's is never written into
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _refused(capsys, _explain(photos, open_clip_folder, mine), "not empty")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_is_clip_checkpoint_tells_by_the_files(open_clip_folder, hf_folder, tiny_vit, tmp_path):
    assert is_clip_checkpoint(open_clip_folder / "open_clip_model.safetensors")  # a weights file: by its keys
    assert not is_clip_checkpoint(tiny_vit) and not is_clip_checkpoint(None)
    assert not is_clip_checkpoint("vit_base_patch16_clip_224.openai")  # timm: image tower only, no hub access
    vision_only = tmp_path / "vision"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({**HF_CONFIG["vision_config"], "model_type": "clip_vision_model"}))
    assert not is_clip_checkpoint(vision_only)


def test_maps_equal_transformers_and_open_clip_tokenizer_end_to_end(photos, tmp_path):
    """The CLI's cosines against a reference computed entirely in torch: a random transformers CLIPModel, its
    CLIPImageProcessor, open_clip's tokenizer, transformers' towers; every layer's patch tokens through
    post_layernorm and visual_projection. Tolerance 1e-5: float32 in two implementations with clip.json's
    6-decimal rounding (measured 5.4e-7 at most); the next layer differs by 0.13 or more (asserted: > 1e-2)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    config = transformers.CLIPConfig(text_config=HF_CONFIG["text_config"], vision_config=HF_CONFIG["vision_config"],
                                     projection_dim=EMBED)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PROCESSOR))
    out = tmp_path / "out"
    assert _explain(photos, folder, out) == 0
    report = json.loads((out / "clip.json").read_text())
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(**{
        k: v for k, v in HF_PROCESSOR.items() if k != "image_processor_type"})
    ids = open_clip.tokenize(PROMPTS, context_length=CTX)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text)
        text = torch.nn.functional.normalize(text, dim=-1)
        for rec, path in zip(report["images"], photos):
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
            cos = [torch.nn.functional.normalize(model.visual_projection(model.vision_model.post_layernorm(h[0, 1:])),
                                                 dim=-1) @ text.T for h in hidden]  # (N, K) per layer
            for k in range(2):
                want = cos[DEPTH - 1][:, k].numpy().reshape(SIZE // PATCH, SIZE // PATCH)
                np.testing.assert_allclose(rec["prompts"][k]["cosine"], want, atol=1e-5, rtol=0)
                assert np.abs(cos[DEPTH][:, k].numpy().reshape(want.shape) - want).max() > 1e-2
                ranges = [[float(c[:, k].min()), float(c[:, k].max())] for c in cos]
                np.testing.assert_allclose(rec["prompts"][k]["cosine_range_per_layer"], ranges, atol=1e-5, rtol=0)
