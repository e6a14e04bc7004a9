"""Tests of the torch reference implementation (bench/torch_reference.py) on tiny random timm ViTs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from bench import torch_reference as tr  # noqa: E402

NUM_CLASSES = 7

# name -> (timm model, kwargs, img_size); all depth 2 and tiny images to stay fast.
MODEL_SPECS = {
    "vit": ("vit_tiny_patch16_224", dict(depth=2), 48),  # 3x3 patches, 1 prefix
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2), 48),  # 2 prefix
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=192, num_heads=3), 42),  # 5 prefix
}


def _make(name, **extra):
    arch, kw, size = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, img_size=size,
                              **kw, **extra)
    # timm's random init is nearly degenerate (tiny heads, layer scale 1e-5, near-uniform
    # attention); re-draw the weights at unit scale so that attention, predictions and gradients
    # differ across tokens, heads and classes and the checks below are not vacuous.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("gamma"):  # layer scale
                p.uniform_(0.5, 1.5)
            elif p.ndim >= 2 and not name_.startswith(("pos_embed", "cls_token", "reg_token", "dist_token")):
                p.normal_(0, p[0].numel() ** -0.5)  # fan-in scaling (Linear and Conv2d)
            elif p.ndim >= 2:
                p.normal_(0, 1.0)
            elif "norm" in name_ and name_.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
        heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
        for h in heads:
            h.weight.mul_(3.0)
    return tr.prepare(model), size


# The models are tiny: thread start-up costs more than it saves (conftest's torch_one_thread).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module", params=list(MODEL_SPECS))
def model_and_images(request):
    model, size = _make(request.param)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, size, size, generator=g)
    return model, images


def _dims(model, images):
    out = tr.forward_with_internals(model, images)
    B, C = out["logits"].shape
    L = len(out["attn"])
    H = out["attn"][0].shape[1]
    T = out["attn"][0].shape[-1]
    P = model.num_prefix_tokens
    return B, C, L, H, T, P, T - P


def _target_cases(B, C):
    g = torch.Generator().manual_seed(2)
    return [
        (None, 1),
        ("all", C),
        (torch.randint(0, C, (B,), generator=g), 1),
        (torch.randint(0, C, (B, 3), generator=g), 3),
    ]


def test_prepare_idempotent(model_and_images):
    model, _ = model_and_images
    assert tr.prepare(model) is model
    tr.prepare(model)
    assert not model.training
    assert all(blk.attn.fused_attn is False for blk in model.blocks)


def test_internals_match_model(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
        ref = model(images)
        x0 = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    B, C, L, H, T, P, N = _dims(model, images)
    torch.testing.assert_close(out["logits"], ref)
    assert len(out["tokens"]) == L + 1 and len(out["attn"]) == L
    torch.testing.assert_close(out["tokens"][0], x0)
    for a in out["attn"]:
        assert a.shape == (B, H, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(B, H, T))
    # Attention recomputed by hand from each block's input tokens: the hooks capture softmax(qk^T).
    for l, blk in enumerate(model.blocks):
        x = blk.norm1(out["tokens"][l])
        qkv = blk.attn.qkv(x).reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1])
        a = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        torch.testing.assert_close(out["attn"][l], a.detach(), rtol=1e-5, atol=1e-6)


def test_head_fn_reproduces_logits(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
        nu = tr.head_fn(model)
        xL = out["tokens"][-1]
        if hasattr(model, "head_dist"):
            # nu is the average of the two heads applied to the same token ...
            t = xL[:, 0]
            torch.testing.assert_close(nu(t), (model.head(model.norm(t)) + model.head_dist(model.norm(t))) / 2)
            # ... and the model's own logits are that average with the class token through
            # `head` and the distillation token through `head_dist`.
            z = model.norm(xL)
            torch.testing.assert_close(out["logits"], (model.head(z[:, 0]) + model.head_dist(z[:, 1])) / 2)
        else:
            torch.testing.assert_close(nu(xL[:, 0]), out["logits"])
        # nu works on any leading shape.
        assert nu(xL).shape == xL.shape[:2] + (NUM_CLASSES,)


def test_head_fn_avg_pool():
    model, size = _make("vit", global_pool="avg")
    assert not isinstance(model.fc_norm, torch.nn.Identity)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
        pooled = out["tokens"][-1][:, model.num_prefix_tokens:].mean(1)
        torch.testing.assert_close(tr.head_fn(model)(pooled), out["logits"], rtol=1e-5, atol=1e-5)


def test_prediction_matrix(model_and_images):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
        for l in range(L + 1):
            psi = tr.prediction_matrix(model, out["tokens"][l])
            assert psi.shape == (B, N, C)
            torch.testing.assert_close(psi.sum(-1), torch.ones(B, N))
            z = tr.prediction_matrix(model, out["tokens"][l], scores="logits")
            torch.testing.assert_close(z.softmax(-1), psi)
            torch.testing.assert_close(z, tr.head_fn(model)(out["tokens"][l][:, P:]))


@pytest.mark.parametrize("name", list(tr.METHODS))
def test_shapes_all_targets(model_and_images, name):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    fn = tr.METHODS[name]
    for targets, K in _target_cases(B, C):
        if name in ("gradcam", "generic_attention") and isinstance(targets, str):
            targets, K = torch.arange(4).expand(B, 4), 4  # keep the batched backward small
        res = fn(model, images, targets)
        assert res["maps"].shape == (B, K, N), (name, targets)
        assert res["classes"].shape == (B, K)
        assert torch.isfinite(res["maps"]).all()
        if targets is None:
            torch.testing.assert_close(res["classes"][:, 0], model(images).argmax(-1))
        elif isinstance(targets, torch.Tensor):
            torch.testing.assert_close(res["classes"], targets.reshape(B, -1))


def _psi_by_hand(model, tokens):
    """Psi (N, C) in numpy from the model's weights, independent of bench/torch_reference.py: the
    final LayerNorm per token, the head (a distilled DeiT: the mean of its two heads), softmax."""
    w = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert "fc_norm.weight" not in w  # every model here reads its head off the final norm
    m, v = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
    t = (tokens - m) / np.sqrt(v + model.norm.eps) * w["norm.weight"] + w["norm.bias"]
    heads = ["head"] + (["head_dist"] if "head_dist.weight" in w else [])
    z = sum(t @ w[f"{h}.weight"].T + w[f"{h}.bias"] for h in heads) / len(heads)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_predicatt_outputs(model_and_images):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    for similarity in ("dot", "cosine"):
        for scores in ("probs", "logits"):
            res = tr.predicatt(model, images, "all", similarity=similarity, scores=scores)
            assert res["alpha"].shape == (B, C, L, H)
            torch.testing.assert_close(res["alpha"].sum((-1, -2)), torch.ones(B, C))
            assert res["weighted_attention"].shape == (B, C, N)
            assert res["prediction_map"].shape == (B, C, N)
            torch.testing.assert_close(res["maps"], res["weighted_attention"] * res["prediction_map"])
    # Explicit recomputation of Eq. 3-5 for one example and one class.
    res = tr.predicatt(model, images, "all")
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
    b, c = 1, 3
    a_cls = np.stack([a[b, :, 0, P:].numpy() for a in out["attn"]])  # (L, H, N)
    p = _psi_by_hand(model, out["tokens"][-1][b, P:].double().numpy())[:, c]
    s = (a_cls @ p).reshape(-1)
    alpha = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    w = (alpha[:, None] * a_cls.reshape(L * H, N)).sum(0)
    np.testing.assert_allclose(res["alpha"][b, c].numpy().reshape(-1), alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res["maps"][b, c].numpy(), w * p, rtol=1e-5, atol=1e-8)


def test_predicatt_layers(model_and_images):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
    top = out["logits"].argmax(-1)
    for layer in range(-(L + 1), L + 1):
        idx = layer % (L + 1)
        pm = tr.prediction_map(model, images, layer=layer)["maps"][:, 0]
        psi = tr.prediction_matrix(model, out["tokens"][idx])
        torch.testing.assert_close(pm, psi[torch.arange(B), :, top])
        pa = tr.predicatt(model, images, layer=layer)
        torch.testing.assert_close(pa["prediction_map"][:, 0], pm)
    with pytest.raises(IndexError):
        tr.predicatt(model, images, layer=L + 1)


def test_uniform_attention_gives_psi_over_T(model_and_images):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for blk in model.blocks:
                D = blk.attn.qkv.weight.shape[0] // 3
                blk.attn.qkv.weight[: 2 * D] = 0  # q and k rows
                if blk.attn.qkv.bias is not None:
                    blk.attn.qkv.bias[: 2 * D] = 0
        out = tr.forward_with_internals(model, images)
        for a in out["attn"]:
            torch.testing.assert_close(a, torch.full_like(a, 1 / T))
        for scores in ("probs", "logits"):
            res = tr.predicatt(model, images, "all", scores=scores)
            torch.testing.assert_close(res["alpha"], torch.full_like(res["alpha"], 1 / (L * H)))
            torch.testing.assert_close(res["maps"], res["prediction_map"] / T)
    finally:
        model.load_state_dict(saved)


@pytest.mark.parametrize("name", ["raw_attention", "rollout", "mean_attention"])
def test_class_agnostic_repeat(model_and_images, name):
    model, images = model_and_images
    B = images.shape[0]
    res = tr.METHODS[name](model, images, "all")
    torch.testing.assert_close(res["maps"], res["maps"][:, :1].expand_as(res["maps"]))
    single = tr.METHODS[name](model, images)
    torch.testing.assert_close(res["maps"][:, 0], single["maps"][:, 0])


@pytest.mark.parametrize("name", list(tr.METHODS))
def test_batch_equals_single(model_and_images, name):
    model, images = model_and_images
    B = images.shape[0]
    targets = torch.tensor([[0, 3], [5, 1], [2, 2]])
    batched = tr.METHODS[name](model, images, targets)["maps"]
    for b in range(B):
        single = tr.METHODS[name](model, images[b : b + 1], targets[b : b + 1])["maps"]
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-6)
    # Top class: batch equals single calls too.
    top = tr.METHODS[name](model, images)["maps"]
    for b in range(B):
        torch.testing.assert_close(top[b : b + 1], tr.METHODS[name](model, images[b : b + 1])["maps"],
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gradcam", "generic_attention"])
def test_gradient_methods_batched_over_classes(model_and_images, name):
    model, images = model_and_images
    targets = torch.tensor([[0, 3, 6], [5, 1, 4], [2, 2, 0]])
    batched = tr.METHODS[name](model, images, targets)["maps"]
    for k in range(targets.shape[1]):
        single = tr.METHODS[name](model, images, targets[:, k])["maps"][:, 0]
        torch.testing.assert_close(batched[:, k], single, rtol=1e-4, atol=1e-7)


def _retain_grad_reference(model, images, targets):
    """Attention and its gradient the classic way: retain_grad on hooked tensors + backward."""
    attn = []

    def hook(_m, _i, out):
        out.retain_grad()
        attn.append(out)

    hs = [blk.attn.attn_drop.register_forward_hook(hook) for blk in model.blocks]
    try:
        x = images.clone().requires_grad_(True)
        logits = model(x)
        logits[torch.arange(len(targets)), targets].sum().backward()
    finally:
        for h in hs:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [a.detach().numpy() for a in attn], [a.grad.numpy() for a in attn]


def test_gradcam_and_generic_by_hand(model_and_images):
    model, images = model_and_images
    B, C, L, H, T, P, N = _dims(model, images)
    targets = torch.tensor([1, 4, 6])
    A, G = _retain_grad_reference(model, images, targets)
    # GradCAM: last block, per-head weight = mean of the CLS-row patch gradients.
    a, g = A[-1][:, :, 0, P:], G[-1][:, :, 0, P:]
    cam = np.maximum((a * g.mean(-1, keepdims=True)).mean(1), 0)
    np.testing.assert_allclose(tr.gradcam(model, images, targets)["maps"][:, 0].numpy(), cam,
                               rtol=1e-4, atol=1e-9)
    # Generic attention: R = I; R += mean_h(clamp(g * A)) @ R.
    R = np.tile(np.eye(T), (B, 1, 1))
    for a, g in zip(A, G):
        R = R + np.maximum(a * g, 0).mean(1) @ R
    np.testing.assert_allclose(tr.generic_attention(model, images, targets)["maps"][:, 0].numpy(),
                               R[:, 0, P:], rtol=1e-4, atol=1e-9)


def test_gradient_methods_with_frozen_params(model_and_images):
    model, images = model_and_images
    ref = tr.generic_attention(model, images)["maps"]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        torch.testing.assert_close(tr.generic_attention(model, images)["maps"], ref)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def test_rollout_by_hand_two_blocks():
    model, size = _make("vit")
    assert len(model.blocks) == 2
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
    A = [a.double().numpy() for a in out["attn"]]
    T = A[0].shape[-1]

    def aug(a):
        m = a.mean(1) + np.eye(T)
        return m / m.sum(-1, keepdims=True)

    m0, m1 = aug(A[0]), aug(A[1])
    # start_layer=0: block 1 multiplies on the left of block 0 (Chefer's joint = A_l @ joint).
    expected0 = np.einsum("bij,bjk->bik", m1, m0)[:, 0, 1:]
    expected1 = m1[:, 0, 1:]
    got0 = tr.rollout(model, images, start_layer=0)["maps"][:, 0].double().numpy()
    got1 = tr.rollout(model, images, start_layer=1)["maps"][:, 0].double().numpy()
    np.testing.assert_allclose(got0, expected0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got1, expected1, rtol=1e-5, atol=1e-7)
    # Raw attention is block 1's head-mean CLS row.
    raw = tr.raw_attention(model, images)["maps"][:, 0].double().numpy()
    np.testing.assert_allclose(raw, A[1].mean(1)[:, 0, 1:], rtol=1e-5, atol=1e-7)


def test_bad_arguments(model_and_images):
    model, images = model_and_images
    with pytest.raises(ValueError):
        tr.predicatt(model, images, similarity="l2")
    with pytest.raises(ValueError):
        tr.prediction_map(model, images, scores="bogus")
    with pytest.raises(ValueError):
        tr.predicatt(model, images, targets=torch.zeros(images.shape[0] + 1, dtype=torch.long))
    with pytest.raises(IndexError):
        tr.rollout(model, images, start_layer=len(model.blocks))
