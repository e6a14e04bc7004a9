"""CLIP text-to-patch maps (predmaps.text_similarity_maps, the paper's appendix A.5) equal the same
computation in torch on a randomly initialised timm CLIP image tower.

Tolerance: relative error 1e-5 in float32 at the highest matmul precision (conftest), as the
model parity tests: two blocks of rounding differences, while a missed norm, bias or prefix token
moves the cosines by 1e-2 or more.
"""

import numpy as np
import pytest

from conftest import randomize_timm_, rel_err

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import convert  # noqa: E402
import predmaps  # noqa: E402
from bench import torch_reference as tr  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EMBED = 16  # the joint image-text embedding size: the tower's head (CLIP's image projection) outputs it


@pytest.fixture(scope="module")
def tower():
    # CLIP's image tower in timm: pre-norm, quick-GELU off, eps 1e-5, the projection as `head`.
    model = randomize_timm_(timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=2, embed_dim=64,
                                              num_heads=2, img_size=32, patch_size=8, num_classes=EMBED))
    jmodel, params = convert.load(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, jmodel, params, images


def _torch_similarity(model, images, text):
    """(B, L+1, K, N) cosine of every text embedding with head(norm(x_i)) of every patch token."""
    with torch.no_grad():
        tokens = tr.forward_with_internals(tr.prepare(model), images)["tokens"]
        t = torch.nn.functional.normalize(torch.as_tensor(text), dim=-1)
        sims = []
        for x in tokens:
            emb = torch.nn.functional.normalize(model.head(model.norm(x[:, model.num_prefix_tokens:])), dim=-1)
            sims.append(torch.einsum("ke,bne->bkn", t, emb) if t.ndim == 2 else torch.einsum("bke,bne->bkn", t, emb))
    return torch.stack(sims, 1).numpy()


def test_similarity_of_every_layer_matches_torch_and_maps_are_inverted(tower):
    model, jmodel, params, images = tower
    text = np.random.RandomState(1).randn(3, EMBED).astype(np.float32) * 5  # any scale
    x = images.permute(0, 2, 3, 1).numpy()
    got = predmaps.text_similarity_maps(jmodel, params, x, text)
    want = _torch_similarity(model, images, text)
    assert got.layers == (0, 1, 2)
    assert got.similarity.shape == (2, 3, 3, 4, 4)
    assert rel_err(got.similarity.reshape(want.shape), want) <= 1e-5
    np.testing.assert_array_equal(got.maps, -got.similarity)
    assert np.abs(np.asarray(got.similarity)).max() <= 1 + 1e-6

    # Per-image text embeddings and a layer subset (negative = from the end).
    per_image = np.random.RandomState(2).randn(2, 4, EMBED).astype(np.float32)
    some = predmaps.text_similarity_maps(jmodel, params, x, per_image, layers=[-1, 0])
    want = _torch_similarity(model, images, per_image)
    assert some.layers == (2, 0) and some.similarity.shape == (2, 2, 4, 4, 4)
    assert rel_err(some.similarity[:, 0].reshape(2, 4, 16), want[:, 2]) <= 1e-5
    assert rel_err(some.similarity[:, 1].reshape(2, 4, 16), want[:, 0]) <= 1e-5


def test_a_patch_embedding_as_text_finds_its_own_patch(tower):
    """The cosine is 1 where the text embedding is that patch's own image embedding."""
    model, jmodel, params, images = tower
    with torch.no_grad():
        last = tr.forward_with_internals(tr.prepare(model), images)["tokens"][-1]
        emb = model.head(model.norm(last[:, model.num_prefix_tokens:])).numpy()  # (B, N, E)
    patch = 5
    got = predmaps.text_similarity_maps(jmodel, params, images.permute(0, 2, 3, 1).numpy(), emb[:, patch:patch + 1],
                                        layers=[-1])
    sim = np.asarray(got.similarity).reshape(2, 16)
    np.testing.assert_allclose(sim[:, patch], 1.0, atol=1e-5)
    assert (np.argmax(sim, axis=1) == patch).all()


def test_wrong_text_embeddings_are_named(tower):
    _, jmodel, params, images = tower
    x = images.permute(0, 2, 3, 1).numpy()
    with pytest.raises(ValueError, match=r"text embeddings of size 512 do not match the image embedding .* "
                                         r"\(its head outputs 16\): use a CLIP image tower"):
        predmaps.text_similarity_maps(jmodel, params, x, np.ones((2, 512), np.float32))
    with pytest.raises(ValueError, match=r"text_embeddings must be \(K, E\) or \(B, K, E\) with B=2; got shape \(3, 1, 16\)"):
        predmaps.text_similarity_maps(jmodel, params, x, np.ones((3, 1, EMBED), np.float32))
    with pytest.raises(TypeError, match="text_embeddings must be floats; got dtype int"):
        predmaps.text_similarity_maps(jmodel, params, x, np.ones((2, EMBED), np.int32))
    with pytest.raises(ValueError, match="layer 3 out of range"):
        predmaps.text_similarity_maps(jmodel, params, x, np.ones((2, EMBED), np.float32), layers=[3])
    # one layer as an int (it failed as 'not iterable'); none at all is named (it failed in jnp.stack)
    assert predmaps.text_similarity_maps(jmodel, params, x, np.ones((2, EMBED), np.float32), layers=-1).layers == (2,)
    with pytest.raises(ValueError, match="layers is empty"):
        predmaps.text_similarity_maps(jmodel, params, x, np.ones((2, EMBED), np.float32), layers=[])
    with pytest.raises(ValueError, match="layers is empty"):
        predmaps.prediction_matrices(jmodel, params, x, layers=())
    assert predmaps.prediction_matrices(jmodel, params, x, layers=0).shape == (2, 1, 16, EMBED)
