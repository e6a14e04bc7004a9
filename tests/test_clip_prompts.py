"""The CLIP path in pure JAX, no torch needed: `convert.load_clip` gives both towers and the tokenizer,
`predmaps.text_similarity_maps` takes prompts, and `predmaps.clip.clip_report` writes the A.5 maps (the
body of `predmaps explain --text`). The towers' parity with open_clip/transformers is test_clip_text.py's;
here prompts must give exactly what their embeddings give, and the report what the maps say.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import convert
import jaxvit
import predmaps
from convert.clip_text import export_open_clip
from jaxvit.clip_text import CLIPText, CLIPTextConfig, TextTower
from jaxvit.clip_tokenizer import CLIPTokenizer
from jaxvit.checkpoint import param_shapes
from jaxvit.config import ViTConfig
from predmaps.clip import clip_report

EMBED = 16
PROMPTS = ["a dog", "a cat on a mat"]


def _draw(seed):
    rng = np.random.default_rng(seed)  # random weights without running (and compiling) init

    def draw(path, s):
        x = rng.normal(size=s.shape).astype(np.float32)
        if len(s.shape) >= 2:
            return x * np.prod(s.shape[:-1]) ** -0.5
        return 1 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else 0.1 * x
    return draw


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """An open_clip-style text checkpoint (CLIP's 49,408-token vocabulary: the bundled BPE tokenises for it)
    with its open_clip_config.json, and a jaxvit CLIP-like image tower of the same embedding size."""
    root = tmp_path_factory.mktemp("clip")
    tcfg = CLIPTextConfig(context_length=77, width=32, heads=2, layers=2, mlp_dim=64, embed_dim=EMBED)
    shapes = jax.eval_shape(lambda: CLIPText(tcfg).init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"])
    tparams = jax.tree_util.tree_map_with_path(_draw(0), shapes)
    save_file(export_open_clip(tparams, tcfg), str(root / "open_clip_model.safetensors"))
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": EMBED, "quick_gelu": True,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                     "mlp_ratio": 2}}}))
    vcfg = ViTConfig(name="tiny-clip", img_size=(32, 32), patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64,
                     num_classes=EMBED, crop_pct=1.0, pre_norm=True, patch_bias=False, norm_eps=1e-5)
    vparams = jax.tree_util.tree_map_with_path(_draw(1), param_shapes(vcfg))
    jaxvit.save(root / "image", vcfg, vparams)
    return root, tparams


def test_load_clip_gives_both_towers_and_the_tokenizer(clip_dir):
    root, tparams = clip_dir
    clip = convert.load_clip(root, image_source=root / "image")
    assert clip.text_model.config.act == "quick_gelu" and clip.image_model.config.num_classes == EMBED
    np.testing.assert_array_equal(clip.text_params["resblocks_1"]["c_fc"]["kernel"],
                                  np.float32(tparams["resblocks_1"]["c_fc"]["kernel"]))
    assert clip.tokenizer("a dog")[0, :4].tolist() == [49406, 320, 1929, 49407]  # OpenAI CLIP's ids
    emb = clip.text_tower.encode(PROMPTS)
    want = clip.text_model.apply({"params": clip.text_params}, clip.tokenizer(PROMPTS)).features
    np.testing.assert_allclose(emb, want, atol=1e-5)  # jitted vs eager: float32 fusion rounding only


def test_towers_of_different_embedding_sizes_are_refused(clip_dir, tmp_path):
    root, _ = clip_dir
    model, params = jaxvit.load(root / "image")
    cfg = model.config.replace(num_classes=EMBED + 1)
    params = {**params, "head": {"kernel": np.zeros((32, EMBED + 1), np.float32),
                                 "bias": np.zeros(EMBED + 1, np.float32)}}
    jaxvit.save(tmp_path / "other", cfg, params)
    with pytest.raises(convert.CheckpointMismatchError, match=f"{EMBED + 1} dimensions and the text tower into {EMBED}"):
        convert.load_clip(root, image_source=tmp_path / "other")


def test_prompts_give_what_their_embeddings_give(clip_dir):
    clip = convert.load_clip(clip_dir[0], image_source=clip_dir[0] / "image")
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    by_prompt = predmaps.text_similarity_maps(clip.image_model, clip.image_params, x, PROMPTS,
                                              text_tower=clip.text_tower)
    by_emb = predmaps.text_similarity_maps(clip.image_model, clip.image_params, x, clip.text_tower.encode(PROMPTS))
    assert by_prompt.similarity.shape == (2, 4, 2, 4, 4)
    np.testing.assert_array_equal(by_prompt.similarity, by_emb.similarity)
    with pytest.raises(ValueError, match="text_tower="):
        predmaps.text_similarity_maps(clip.image_model, clip.image_params, x, PROMPTS)


def test_clip_report_writes_the_penultimate_layer_maps_and_every_layer(clip_dir, tmp_path):
    clip = convert.load_clip(clip_dir[0], image_source=clip_dir[0] / "image")
    photo = tmp_path / "photo one.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    report = clip_report(clip.image_model, clip.image_params, clip.text_tower, [photo], PROMPTS, out)
    depth = clip.image_model.config.depth
    assert report["layer"] == depth - 1  # penultimate token layer (Fig. 18)
    rec = report["images"][0]
    assert rec["maps"] == ["photo-one_0_a-dog.png", "photo-one_1_a-cat-on-a-mat.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(rec["maps"] + ["photo-one_layers.png", "clip.json"])
    assert json.loads((out / "clip.json").read_text()) == report
    x = jaxvit.preprocess.load_batch([photo], clip.image_model.config)
    sim = np.asarray(predmaps.text_similarity_maps(clip.image_model, clip.image_params, x, PROMPTS,
                                                   text_tower=clip.text_tower).similarity[0])
    for k in range(2):
        np.testing.assert_allclose(rec["prompts"][k]["cosine"], sim[depth - 1, k], atol=1e-6)
        assert len(rec["prompts"][k]["cosine_range_per_layer"]) == depth + 1
    assert Image.open(out / rec["maps"][0]).size == (40, 40)  # the centre crop the model saw (crop_pct 1)
    grid = Image.open(out / "photo-one_layers.png")
    assert grid.width > grid.height  # prompts as rows, the L + 1 layers as columns
    report = clip_report(clip.image_model, clip.image_params, clip.text_tower, [photo], ["a dog"], tmp_path / "o2",
                         layer=-1)
    assert report["layer"] == depth
    with pytest.raises(ValueError, match="prompts"):
        clip_report(clip.image_model, clip.image_params, clip.text_tower, [photo], [""], tmp_path / "o3")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    report = clip_report(clip.image_model, clip.image_params, clip.text_tower, [bad, photo], ["a dog"], tmp_path / "o4")
    assert [r["image"] for r in report["images"]] == [str(photo)] and report["skipped"][0]["image"] == str(bad)
    (tmp_path / "again").mkdir()
    twin = tmp_path / "again" / photo.name
    twin.write_bytes(photo.read_bytes())
    report = clip_report(clip.image_model, clip.image_params, clip.text_tower, [photo, twin], ["a dog"], tmp_path / "o6")
    assert [r["maps"] for r in report["images"]] == [["photo-one_0_a-dog.png"], ["photo-one-1_0_a-dog.png"]]
    with pytest.raises(ValueError, match="no readable image"):
        clip_report(clip.image_model, clip.image_params, clip.text_tower, [bad], ["a dog"], tmp_path / "o5")


def test_text_tower_without_tokenizer_says_so():
    tower = TextTower(CLIPText(CLIPTextConfig(width=32, heads=2, layers=1, mlp_dim=32)), {}, None)
    with pytest.raises(ValueError, match="without a tokenizer"):
        tower.encode(["a dog"])
    assert isinstance(CLIPTokenizer.from_bpe()(["x"]), np.ndarray)


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_repo_loads_from_the_cache_offline(clip_dir, offline_cache):
    root, tparams = clip_dir
    snap = offline_cache / "models--someone--tiny-clip" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        (snap / name).write_bytes((root / name).read_bytes())
    model, params, tok = convert.load_clip_text("someone/tiny-clip")
    assert model.config.act == "quick_gelu" and tok("a dog")[0, 2] == 1929  # the bundled BPE: no tokenizer.json
    np.testing.assert_array_equal(params["token_embedding"], np.float32(tparams["token_embedding"]))


def test_hub_repo_not_cached_offline_is_a_clear_error(offline_cache):
    with pytest.raises(convert.HubUnavailableError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        convert.load_clip_text("someone/not-cached")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_clip_text("missing/file.safetensors")
