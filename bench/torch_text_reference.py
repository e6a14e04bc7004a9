"""Torch reference of the text maps (predmaps/text.py) on Hugging Face `transformers` models.

The way a torch user would write them on `BertForSequenceClassification`,
`RobertaForSequenceClassification` or `DistilBertForSequenceClassification`:

* the model loaded with ``attn_implementation="eager"``, so the attention probabilities exist;
* forward hooks on the embeddings module and on every encoder layer capture x^(0..L), and on the
  classifier capture the logits; the attention probabilities come from ``output_attentions=True``
  (transformers computes them inside a function, not a module, so no hook can reach them; the
  returned tensors are the ones that multiply v, in the autograd graph, in eval mode);
* nu per token with the model's own head modules (BERT's pooler dense + tanh then classifier,
  RoBERTa's classifier dense + tanh + out_proj, DistilBERT's pre_classifier + ReLU + classifier);
* autograd for GradCAM.

Maps are (B, K, T), zero at special tokens and padding, like predmaps.text. Definitions:
/work/shared/method.md and predmaps/text.py's docstrings.
"""

from __future__ import annotations

import torch

__all__ = ["forward_with_internals", "token_logits", "content_mask", "predicatt", "prediction_map", "raw_attention",
           "mean_attention", "rollout", "gradcam", "generic_attention", "METHODS"]


def _family(model) -> str:
    return model.config.model_type  # "bert", "roberta", "distilbert"


def _encoder_layers(model):
    if _family(model) == "distilbert":
        return model.distilbert.transformer.layer
    return getattr(model, _family(model)).encoder.layer


def forward_with_internals(model, input_ids, attention_mask, token_type_ids=None):
    """-> logits (B, C), tokens (B, L+1, T, D), attn tuple of L (B, H, T, T) tensors in the graph."""
    base = getattr(model, _family(model))
    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [base.embeddings.register_forward_hook(grab)]
    hooks += [layer.register_forward_hook(grab) for layer in _encoder_layers(model)]
    try:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        if token_type_ids is not None and _family(model) != "distilbert":
            kwargs["token_type_ids"] = token_type_ids
        out = model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out.logits, torch.stack(captured, dim=1), out.attentions


def token_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """nu(x_i) for tokens (..., D) with the model's own head modules -> (..., C)."""
    family = _family(model)
    if family == "bert":
        return model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(tokens)))
    if family == "roberta":
        return model.classifier.out_proj(torch.tanh(model.classifier.dense(tokens)))
    if family == "distilbert":
        return model.classifier(torch.relu(model.pre_classifier(tokens)))
    raise ValueError(f"unsupported model type {family!r}")


def content_mask(model, input_ids, attention_mask) -> torch.Tensor:
    """(B, T) float: 1 at the text's own tokens, 0 at padding and the special tokens."""
    cfg = model.config
    special = {getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None),
               getattr(cfg, "sep_token_id", None), getattr(cfg, "cls_token_id", None)} - {None}
    keep = attention_mask.bool().clone()
    keep[:, 0] = False  # [CLS] / <s>
    last = attention_mask.sum(-1) - 1  # [SEP] / </s>: the last real token
    keep[torch.arange(len(keep)), last] = False
    for s in special:
        keep &= input_ids != s
    return keep.float()


def _resolve(logits, target):
    if target == "top":
        return logits.argmax(-1, keepdim=True)
    return torch.as_tensor(target).reshape(len(logits), -1)


def _psi(model, tokens, classes, mask):
    p = torch.softmax(token_logits(model, tokens), dim=-1)  # (B, T, C)
    return torch.gather(p, 2, classes[:, None, :].expand(-1, p.shape[1], -1)).transpose(1, 2) * mask[:, None]


def predicatt(model, input_ids, attention_mask, target="top", layer=-1):
    """PredicAtt_layer(c) over the content tokens: -> (maps (B, K, T), alpha~ (B, K, L, H), psi, a~)."""
    with torch.no_grad():
        logits, tokens, attn = forward_with_internals(model, input_ids, attention_mask)
        mask = content_mask(model, input_ids, attention_mask)
        classes = _resolve(logits, target)
        psi = _psi(model, tokens[:, layer], classes, mask)  # (B, K, T)
        a_cls = torch.stack([a[:, :, 0] for a in attn], dim=1) * mask[:, None, None]  # (B, L, H, T)
        alpha = torch.einsum("blht,bkt->bklh", a_cls, psi)
        b, k, l, h = alpha.shape
        alpha_t = torch.softmax(alpha.reshape(b, k, l * h), dim=-1).reshape(b, k, l, h)
        a_tilde = torch.einsum("bklh,blht->bkt", alpha_t, a_cls)
    return a_tilde * psi, alpha_t, psi, a_tilde


def prediction_map(model, input_ids, attention_mask, target="top", layer=-1):
    with torch.no_grad():
        logits, tokens, _ = forward_with_internals(model, input_ids, attention_mask)
        return _psi(model, tokens[:, layer], _resolve(logits, target), content_mask(model, input_ids, attention_mask))


def raw_attention(model, input_ids, attention_mask):
    """Last layer's first-token row, mean over heads: (B, T)."""
    with torch.no_grad():
        _, _, attn = forward_with_internals(model, input_ids, attention_mask)
        return attn[-1][:, :, 0].mean(1) * content_mask(model, input_ids, attention_mask)


def mean_attention(model, input_ids, attention_mask):
    with torch.no_grad():
        _, _, attn = forward_with_internals(model, input_ids, attention_mask)
        rows = torch.stack([a[:, :, 0] for a in attn], dim=1)
        return rows.mean((1, 2)) * content_mask(model, input_ids, attention_mask)


def rollout(model, input_ids, attention_mask, start_layer=0):
    """Abnar & Zuidema: per layer mean over heads + I, rows normalised, multiplied; first-token row."""
    with torch.no_grad():
        _, _, attn = forward_with_internals(model, input_ids, attention_mask)
        eye = torch.eye(attn[0].shape[-1])
        mats = [(a.mean(1) + eye) / (a.mean(1) + eye).sum(-1, keepdim=True) for a in attn]
        joint = mats[start_layer]
        for m in mats[start_layer + 1:]:
            joint = m @ joint
        return joint[:, 0] * content_mask(model, input_ids, attention_mask)


def gradcam(model, input_ids, attention_mask, target="top"):
    """Last layer: per head, weight = mean over content tokens of d logit_c / dA's first row; map =
    mean over heads of A_CLS * weight, clamped at 0. -> (B, K, T), one backward pass per class. (Chefer's BERT
    generate_attn_gradcam means over all T x T entries instead: same positive tokens, tests/test_text_benchmark.py.)"""
    logits, _, attn = forward_with_internals(model, input_ids, attention_mask)
    mask = content_mask(model, input_ids, attention_mask)
    classes = _resolve(logits.detach(), target)
    a = attn[-1]
    maps = []
    for k in range(classes.shape[1]):
        score = logits.gather(1, classes[:, k:k + 1]).sum()
        (g,) = torch.autograd.grad(score, a, retain_graph=True)
        weight = (g[:, :, 0] * mask[:, None]).sum(-1, keepdim=True) / mask.sum(-1)[:, None, None]
        maps.append(((a[:, :, 0] * weight).mean(1)).clamp(min=0) * mask)
    return torch.stack(maps, dim=1).detach()


def generic_attention(model, input_ids, attention_mask, target="top"):
    """Chefer et al. 2021a: R = I; per layer R += mean_h(clamp(grad * A, 0)) @ R; the first token's row
    (the full T x T products, as their code). -> (B, K, T)."""
    logits, _, attn = forward_with_internals(model, input_ids, attention_mask)
    mask = content_mask(model, input_ids, attention_mask)
    classes = _resolve(logits.detach(), target)
    t = attn[0].shape[-1]
    maps = []
    for k in range(classes.shape[1]):
        score = logits.gather(1, classes[:, k:k + 1]).sum()
        grads = torch.autograd.grad(score, attn, retain_graph=True)
        r = torch.eye(t).expand(len(logits), t, t)
        for a, g in zip(attn, grads):
            r = r + (g * a).clamp(min=0).mean(1) @ r
        maps.append(r[:, 0] * mask)
    return torch.stack(maps, dim=1).detach()


METHODS = {"predicatt": predicatt, "prediction_map": prediction_map, "raw_attention": raw_attention,
           "mean_attention": mean_attention, "rollout": rollout, "gradcam": gradcam,
           "generic_attention": generic_attention}
