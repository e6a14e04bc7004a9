"""Torch reference implementation of Prediction Maps, PredicAtt and the attention baselines.

This is the straightforward way a torch user would write the methods on a timm ViT:

* fused attention switched off on every block (``blk.attn.fused_attn = False``) so timm
  materialises the attention probabilities;
* forward hooks on ``blk.attn.attn_drop`` capture them as ``(B, H, T, T)`` tensors (dropout is
  the identity in eval mode, so its output *is* the softmax output and stays in the autograd
  graph: the tensor that multiplies ``v``);
* a forward-pre-hook on the first block captures ``x^(0)`` and forward hooks on every block
  capture ``x^(1..L)``;
* autograd (``torch.autograd.grad`` w.r.t. the captured attention tensors) for the gradient
  baselines.

It serves two purposes: a baseline users can benchmark the JAX implementation against, and the
parity reference for our tests. Definitions follow ``method.md`` (the project's precise
restatement of the paper); comments marked ``[method.md]`` point at the choice made there, and
comments marked ``[Chefer]`` point at the public Transformer-Explainability code
(hila-chefer/Transformer-Explainability, baselines/ViT/ViT_explanation_generator.py) and
Transformer-MM-Explainability (generic attention) whose definitions the baselines reproduce.

Everything is batched: no Python loop over images or classes (loops over layers only).
Maps are returned on the token grid, flattened: ``(B, K, N)`` with ``N = gh * gw`` patch tokens.
No min-max normalisation or upsampling is applied here (the evaluation protocol does that).

Run ``python bench/torch_reference.py`` for a quick self-check on a random-init ViT-Tiny.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "prepare",
    "forward_with_internals",
    "head_fn",
    "prediction_matrix",
    "resolve_targets",
    "predicatt",
    "prediction_map",
    "mean_attention",
    "weighted_attention",
    "raw_attention",
    "rollout",
    "gradcam",
    "generic_attention",
    "METHODS",
    "main",
]


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def _is_distilled(model: nn.Module) -> bool:
    return getattr(model, "head_dist", None) is not None


def _num_prefix(model: nn.Module) -> int:
    # timm: class token + register tokens (+ distillation token for distilled DeiT, which sets
    # num_prefix_tokens = 2).
    return int(getattr(model, "num_prefix_tokens", 1))


def _check_class_token(model: nn.Module) -> None:
    if not getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None):
        raise ValueError("these methods need a class token (row 0 of the attention matrix)")


def prepare(model: nn.Module) -> nn.Module:
    """Eval mode and non-fused attention on every block, so attention probabilities exist.

    Idempotent: calling it again changes nothing.
    """
    model.eval()
    for blk in model.blocks:
        attn = blk.attn
        if not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
            raise TypeError(f"unsupported attention module {type(attn).__name__}")
        attn.fused_attn = False
    return model


def forward_with_internals(model: nn.Module, images: torch.Tensor) -> dict:
    """One forward pass that also records tokens and attention probabilities via hooks.

    Returns a dict with
      ``logits``: (B, C) model output;
      ``tokens``: list of L+1 tensors (B, T, D): x^(0) (input of the first block, i.e. after
        patch embedding, position embedding and ``norm_pre``) and the output of every block;
      ``attn``: list of L tensors (B, H, T, T), softmax(q k^T / sqrt(d_H)) of every block.

    Gradients flow through the recorded tensors if grad mode is on (they are the tensors used in
    the forward pass, not copies).
    """
    prepare(model)
    tokens: list[torch.Tensor] = []
    attn: list[torch.Tensor] = []
    handles = []

    def pre_hook(_mod, args):
        tokens.append(args[0])

    def block_hook(_mod, _inp, out):
        tokens.append(out)

    def attn_hook(_mod, _inp, out):
        attn.append(out)

    try:
        handles.append(model.blocks[0].register_forward_pre_hook(pre_hook))
        for blk in model.blocks:
            handles.append(blk.register_forward_hook(block_hook))
            handles.append(blk.attn.attn_drop.register_forward_hook(attn_hook))
        logits = model(images)
    finally:
        for h in handles:
            h.remove()
    L = len(model.blocks)
    assert len(tokens) == L + 1 and len(attn) == L, (len(tokens), len(attn))
    return {"logits": logits, "tokens": tokens, "attn": attn}


def head_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """nu(t): the classifier head applied to any token tensor (..., D) -> (..., C).

    [method.md] token-pooled timm ViT: head(norm(t)); avg-pooled: head(fc_norm(t)); we write it
    as head(fc_norm(norm(t))) with absent modules as identity (timm makes the unused one an
    nn.Identity). Distilled DeiT at eval: (head(norm t) + head_dist(norm t)) / 2 - the same
    token through both heads (the model itself feeds the class token to ``head`` and the
    distillation token to ``head_dist``; nu is the per-token version of that average).
    The final norm is re-applied per token (fresh LayerNorm statistics per token).
    """
    if getattr(model, "attn_pool", None) is not None:
        raise NotImplementedError("attention-pooled heads (global_pool='map') have no per-token nu")
    norm = getattr(model, "norm", None)
    norm = nn.Identity() if norm is None else norm
    fc_norm = getattr(model, "fc_norm", None)
    fc_norm = nn.Identity() if fc_norm is None else fc_norm
    head = model.head
    if _is_distilled(model):
        head_dist = model.head_dist

        def nu(t: torch.Tensor) -> torch.Tensor:
            z = fc_norm(norm(t))
            return (head(z) + head_dist(z)) / 2

    else:

        def nu(t: torch.Tensor) -> torch.Tensor:
            return head(fc_norm(norm(t)))

    return nu


def prediction_matrix(model: nn.Module, tokens_l: torch.Tensor, scores: str = "probs") -> torch.Tensor:
    """Psi^(l): (B, N, C) = softmax(nu(x_i^(l))) over classes, for the N patch tokens.

    The ``model.num_prefix_tokens`` prefix tokens (class, registers, distillation) are dropped.
    ``scores="logits"`` keeps nu(x_i) without softmax [method.md option].
    """
    z = head_fn(model)(tokens_l[:, _num_prefix(model):])
    if scores == "probs":
        return z.softmax(dim=-1)
    if scores == "logits":
        return z
    raise ValueError(f"scores must be 'probs' or 'logits', got {scores!r}")


def resolve_targets(targets, logits: torch.Tensor | None, batch: int, num_classes: int,
                    device=None) -> torch.Tensor:
    """Targets -> (B, K) int64 class indices.

    None or "top": the top predicted class (K=1, needs ``logits``); "all": every class
    (K=C); an int tensor (B,): one class per example (K=1); an int tensor (B, K): those classes.
    """
    if targets is None or (isinstance(targets, str) and targets == "top"):
        if logits is None:
            raise ValueError("top-class targets need logits")
        return logits.argmax(dim=-1, keepdim=True)
    if isinstance(targets, str):
        if targets == "all":
            return torch.arange(num_classes, device=device).expand(batch, num_classes)
        raise ValueError(f"unknown targets {targets!r}")
    t = torch.as_tensor(targets, device=device).long()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"targets must be (B,) or (B, K) with B={batch}, got {tuple(t.shape)}")
    return t


def _layer_index(layer: int, L: int) -> int:
    # Layers 0..L (0 = x^(0), the input of the first block); negatives count from the end.
    idx = layer + (L + 1) if layer < 0 else layer
    if not 0 <= idx <= L:
        raise IndexError(f"layer {layer} out of range for {L} blocks (valid: {-(L + 1)}..{L})")
    return idx


def _cls_attention(model: nn.Module, attn: list[torch.Tensor]) -> torch.Tensor:
    """A_CLS^(l,h): (B, L, H, N): class-token row (row 0), patch columns (prefix columns dropped)."""
    P = _num_prefix(model)
    return torch.stack([a[:, :, 0, P:] for a in attn], dim=1)


def _gather_classes(psi: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """psi (B, N, C), classes (B, K) -> (B, K, N): column c of Psi for every target."""
    B, N, _ = psi.shape
    K = classes.shape[1]
    return torch.gather(psi, 2, classes[:, None, :].expand(B, N, K)).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Prediction maps and PredicAtt (gradient-free)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predicatt(model: nn.Module, images: torch.Tensor, targets=None, layer: int = -1,
              similarity: str = "dot", scores: str = "probs") -> dict:
    """PredicAtt_i(c) = A~(c) * Psi^(i)(c) (paper Eq. 3-5, [method.md]).

    alpha_{l,h} = <A_CLS^(l,h), Psi^(i)(c)> for all L*H heads (``similarity="cosine"`` divides
    by both norms), alpha~ = one softmax over all L*H values jointly, A~(c) = sum alpha~ A_CLS.

    Returns ``maps`` (B, K, N), ``classes`` (B, K), ``alpha`` (B, K, L, H) (alpha~, sums to 1
    over L*H), ``weighted_attention`` (B, K, N) = A~(c), ``prediction_map`` (B, K, N) =
    Psi^(i)(c), ``logits`` (B, C).
    """
    _check_class_token(model)
    out = forward_with_internals(model, images)
    logits, tokens, attn = out["logits"], out["tokens"], out["attn"]
    B, C = logits.shape
    L = len(attn)
    H = attn[0].shape[1]
    classes = resolve_targets(targets, logits, B, C, device=logits.device)
    K = classes.shape[1]

    psi = prediction_matrix(model, tokens[_layer_index(layer, L)], scores=scores)  # (B, N, C)
    psi_c = _gather_classes(psi, classes)  # (B, K, N)
    a_cls = _cls_attention(model, attn)  # (B, L, H, N)

    sim = torch.einsum("blhn,bkn->bklh", a_cls, psi_c)
    if similarity == "cosine":
        # [method.md] paper A.2 option: divide by both norms.
        a_norm = a_cls.norm(dim=-1)  # (B, L, H)
        p_norm = psi_c.norm(dim=-1)  # (B, K)
        sim = sim / (a_norm[:, None] * p_norm[:, :, None, None]).clamp_min(1e-12)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    # [method.md] one softmax over all L*H heads jointly, not per layer.
    alpha = sim.reshape(B, K, L * H).softmax(dim=-1).reshape(B, K, L, H)
    weighted = torch.einsum("bklh,blhn->bkn", alpha, a_cls)
    maps = weighted * psi_c
    return {
        "maps": maps,
        "classes": classes,
        "alpha": alpha,
        "weighted_attention": weighted,
        "prediction_map": psi_c,
        "logits": logits,
    }


@torch.no_grad()
def prediction_map(model: nn.Module, images: torch.Tensor, targets=None, layer: int = -1,
                   scores: str = "probs") -> dict:
    """Prediction map of class c at layer l: column c of Psi^(l) (paper Eq. 2). (B, K, N)."""
    out = forward_with_internals(model, images)
    logits, tokens = out["logits"], out["tokens"]
    B, C = logits.shape
    classes = resolve_targets(targets, logits, B, C, device=logits.device)
    psi = prediction_matrix(model, tokens[_layer_index(layer, len(model.blocks))], scores=scores)
    return {"maps": _gather_classes(psi, classes), "classes": classes, "logits": logits}


def _repeat_agnostic(m: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class-agnostic (B, N) map -> (B, K, N), the same map for each target."""
    return m[:, None, :].expand(-1, classes.shape[1], -1).contiguous()


@torch.no_grad()
def mean_attention(model: nn.Module, images: torch.Tensor, targets=None) -> dict:
    """Ablation (i) of the paper's Table 4: (1/LH) sum_{l,h} A_CLS^(l,h). Class-agnostic."""
    _check_class_token(model)
    out = forward_with_internals(model, images)
    logits = out["logits"]
    classes = resolve_targets(targets, logits, logits.shape[0], logits.shape[1], logits.device)
    m = _cls_attention(model, out["attn"]).mean(dim=(1, 2))
    return {"maps": _repeat_agnostic(m, classes), "classes": classes, "logits": logits}


def weighted_attention(model: nn.Module, images: torch.Tensor, targets=None, layer: int = -1,
                       similarity: str = "dot", scores: str = "probs") -> dict:
    """Ablation (ii) of the paper's Table 4: the class-specific weighted attention A~(c) alone."""
    out = predicatt(model, images, targets, layer=layer, similarity=similarity, scores=scores)
    return {"maps": out["weighted_attention"], "classes": out["classes"], "logits": out["logits"]}


# --------------------------------------------------------------------------------------------
# Baselines (Chefer et al. 2021b protocol)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def raw_attention(model: nn.Module, images: torch.Tensor, targets=None) -> dict:
    """Raw attention: last block, mean over heads, class-token row, patch columns. Class-agnostic."""
    _check_class_token(model)
    out = forward_with_internals(model, images)
    logits = out["logits"]
    classes = resolve_targets(targets, logits, logits.shape[0], logits.shape[1], logits.device)
    m = out["attn"][-1].mean(dim=1)[:, 0, _num_prefix(model):]
    return {"maps": _repeat_agnostic(m, classes), "classes": classes, "logits": logits}


@torch.no_grad()
def rollout(model: nn.Module, images: torch.Tensor, targets=None, start_layer: int = 1) -> dict:
    """Attention rollout (Abnar & Zuidema), as in Chefer's ``compute_rollout_attention``.

    Per block: mean over heads of the full (T x T) attention, + identity, rows divided by their
    sum; joint = A_start, then joint = A_l @ joint for l = start+1..L-1 (later blocks on the
    left). Map = class-token row, patch columns. ``start_layer`` is a 0-based block index
    (Chefer's evaluation uses 1 [method.md]). Class-agnostic.
    """
    _check_class_token(model)
    out = forward_with_internals(model, images)
    logits, attn = out["logits"], out["attn"]
    classes = resolve_targets(targets, logits, logits.shape[0], logits.shape[1], logits.device)
    L = len(attn)
    if not 0 <= start_layer < L:
        raise IndexError(f"start_layer {start_layer} out of range for {L} blocks")
    T = attn[0].shape[-1]
    eye = torch.eye(T, dtype=attn[0].dtype, device=attn[0].device)
    joint = None
    for l in range(start_layer, L):
        a = attn[l].mean(dim=1) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    m = joint[:, 0, _num_prefix(model):]
    return {"maps": _repeat_agnostic(m, classes), "classes": classes, "logits": logits}


def _attention_and_grads(model: nn.Module, images: torch.Tensor, targets, blocks: str = "last"):
    """Attention of the chosen blocks and d(sum_b logit_{b, c_b}) / dA, batched over K targets.

    For K > 1 targets the batch is repeated K times (row k*B + b is example b, target k), so one
    forward and one backward give every (example, target) gradient; no loop over images or
    classes. Returns (attn list of (K*B, H, T, T), grad list, classes (B, K), logits (B, C)).
    """
    B = images.shape[0]
    C = model.num_classes
    if targets is None or (isinstance(targets, str) and targets == "top"):
        K, classes = 1, None
    else:
        classes = resolve_targets(targets, None, B, C, device=images.device)
        K = classes.shape[1]
    x = images.detach().repeat(K, 1, 1, 1) if K > 1 else images.detach()
    # Gradients must reach the attention even if the parameters were frozen by the caller.
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = forward_with_internals(model, x)
        logits_all = out["logits"]
        if classes is None:
            classes = logits_all.argmax(dim=-1, keepdim=True)
        flat = classes.transpose(0, 1).reshape(K * B)  # row k*B + b -> classes[b, k]
        # [Chefer] one_hot * output summed: gradient of the target *logit* (pre-softmax).
        objective = logits_all.gather(1, flat[:, None]).sum()
        attn = out["attn"] if blocks == "all" else out["attn"][-1:]
        grads = torch.autograd.grad(objective, attn)
    attn = [a.detach() for a in attn]
    return attn, list(grads), classes, logits_all[:B].detach()


def _unflatten_k(m: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """(K*B, N) with row k*B + b -> (B, K, N)."""
    return m.reshape(K, B, -1).transpose(0, 1).contiguous()


def gradcam(model: nn.Module, images: torch.Tensor, targets=None) -> dict:
    """GradCAM for ViT as in Chefer's ``generate_cam_attn`` (without its min-max normalisation).

    Last block attention A (H heads) and g = d logit_c / dA. Per head, weight = mean over the
    patch entries of the class-token row of g; map = mean over heads of A_CLS * weight, clamped
    at 0 [method.md].
    """
    _check_class_token(model)
    P = _num_prefix(model)
    B = images.shape[0]
    attn, grads, classes, logits = _attention_and_grads(model, images, targets, blocks="last")
    K = classes.shape[1]
    a = attn[0][:, :, 0, P:]  # (KB, H, N)
    w = grads[0][:, :, 0, P:].mean(dim=-1, keepdim=True)  # (KB, H, 1)
    m = (a * w).mean(dim=1).clamp(min=0)
    return {"maps": _unflatten_k(m, B, K), "classes": classes, "logits": logits}


def generic_attention(model: nn.Module, images: torch.Tensor, targets=None) -> dict:
    """Generic attention explainability (Chefer 2021a), self-attention rule, for ViT.

    R = I (T x T); for each block l = 1..L: cam = mean over heads of clamp(g * A, min=0), with
    g = d logit_c / dA^(l); R = R + cam @ R. Map = R[class token, patch columns].
    [Chefer] follows ``avg_heads`` + ``apply_self_attention_rules`` of
    Transformer-MM-Explainability (ViT example).
    """
    _check_class_token(model)
    P = _num_prefix(model)
    B = images.shape[0]
    attn, grads, classes, logits = _attention_and_grads(model, images, targets, blocks="all")
    K = classes.shape[1]
    KB, _, T, _ = attn[0].shape
    R = torch.eye(T, dtype=attn[0].dtype, device=attn[0].device).expand(KB, T, T)
    for a, g in zip(attn, grads):
        cam = (g * a).clamp(min=0).mean(dim=1)
        R = R + cam @ R
    m = R[:, 0, P:]
    return {"maps": _unflatten_k(m, B, K), "classes": classes, "logits": logits}


METHODS: dict[str, Callable[..., dict]] = {
    "predicatt": predicatt,
    "prediction_map": prediction_map,
    "mean_attention": mean_attention,
    "weighted_attention": weighted_attention,
    "raw_attention": raw_attention,
    "rollout": rollout,
    "gradcam": gradcam,
    "generic_attention": generic_attention,
}


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def main() -> None:
    import timm

    torch.manual_seed(0)
    model = prepare(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(images)
        out = forward_with_internals(model, images)
    assert torch.allclose(out["logits"], ref, atol=1e-5)
    nu_logits = head_fn(model)(out["tokens"][-1][:, 0])
    print(f"nu(final CLS) vs logits: max |diff| = {(nu_logits - ref).abs().max().item():.2e}")
    for name, fn in METHODS.items():
        for targets in (None, torch.tensor([[1, 2, 3], [4, 5, 6]])):
            t0 = time.perf_counter()
            res = fn(model, images, targets)
            dt = time.perf_counter() - t0
            k = "top" if targets is None else "K=3"
            print(f"{name:20s} {k:4s} maps {tuple(res['maps'].shape)}  {dt * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
