"""Why GradCAM's map for the predicted class is empty on the shipped text model (docs/text-benchmark.md).

    python -m bench.text_gradcam_sign [--sentences 1000]

On the benchmark's sentences (seed 2024), with transformers' BertForSequenceClassification and autograd,
last layer, [CLS] row, predicted class: how often each GradCAM variant has a positive word; how often the
per-head weight w_h (mean gradient over the content columns) has the sign of <A_h, g_h> = d logit / d
lambda_h, lambda_h scaling head h's [CLS] context; and the predicted logit with the last layer's [CLS]
attention output scaled by lambda (all heads); and, with predmaps.text's GradCAM, the map of the class that
was not predicted, and on mixed sentences own > other (text_scenes' score) per kind of class.
"""

from __future__ import annotations

import argparse

import numpy as np

from predmaps import sentiment
from predmaps.evaluation.text_scenes import DEFAULT_MODEL, DEFAULT_SEED


def measure(kind: str, n: int) -> None:
    import torch
    import transformers

    from convert.hf_text import load_text
    from predmaps import text as ptext
    from predmaps.evaluation.text_scenes import class_masses

    model, params, tok = load_text(DEFAULT_MODEL)
    sents = sentiment.generate(n, kind, DEFAULT_SEED)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL,
                                                                         attn_implementation="eager").eval()
    batch = tok([s.text for s in sents])
    ids, am = torch.as_tensor(batch.input_ids).long(), torch.as_tensor(batch.attention_mask).long()
    content, real = batch.content_mask, batch.attention_mask.astype(bool)
    sa = hf.bert.encoder.layer[-1].attention.self
    lam = {"v": 1.0}

    def scale_cls(_module, _inputs, out):  # the last layer's [CLS] context (all heads) times lambda
        ctx = out[0].clone()
        ctx[:, 0] = ctx[:, 0] * lam["v"]
        return (ctx,) + tuple(out[1:])

    hook = sa.register_forward_hook(scale_cls)
    out = hf(input_ids=ids, attention_mask=am, output_attentions=True)
    pred = out.logits.argmax(-1)
    grads = torch.autograd.grad(out.logits.gather(1, pred[:, None]).sum(), out.attentions)
    per_layer = []
    for a_l, g_l in zip(out.attentions, grads):  # GradCAM's formula on every layer's [CLS] row
        a, g = a_l.detach().numpy()[:, :, 0], g_l.numpy()[:, :, 0]  # (B, H, T)
        w = (g * content[:, None]).sum(-1, keepdims=True) / content.sum(-1)[:, None, None]
        per_layer.append(np.mean((((a * w).mean(1) * content) > 0).any(-1)))
    w_all = (g * real[:, None]).sum(-1, keepdims=True) / real.sum(-1)[:, None, None]
    spread = np.sqrt((((g - w_all) ** 2) * real[:, None]).sum(-1, keepdims=True) / real.sum(-1)[:, None, None])
    ag = (a * g).sum(-1)

    def any_pos(m):
        return np.mean(((m * content) > 0).any(-1))

    print(f"== {n} {kind} sentences, predicted class, last layer, [CLS] row")
    print(f"  any positive word: GradCAM (clamp(mean_h(A w_h))) {any_pos((a * w).mean(1)):.3f}; "
          f"Chefer's BERT pooling (w over all T columns) {any_pos((a * w_all).mean(1)):.3f}; "
          f"clamp before the head mean {any_pos(np.maximum(a * w, 0).mean(1)):.3f}; "
          f"mean_h(clamp(g A)) {any_pos(np.maximum(g * a, 0).mean(1)):.3f}; GradCAM's formula at layers "
          f"0..{len(per_layer) - 1}: {' / '.join(f'{p:.3f}' for p in per_layer)}")
    print(f"  w_h < 0: {np.mean(w < 0):.3f}; all heads w_h < 0: {np.mean((w < 0).all(1)):.3f}; "
          f"w_h quantiles 5/50/95%: {np.round(np.quantile(w, [0.05, 0.5, 0.95]), 4).tolist()}")
    print(f"  |mean_j g| / std_j g over the columns, median: {np.median(np.abs(w_all) / spread):.2f}; "
          f"sign(w_h) == sign(<A_h, g_h>): {np.mean(np.sign(w[..., 0]) == np.sign(ag)):.3f}; "
          f"sum_h <A_h, g_h> < 0: {np.mean(ag.sum(1) < 0):.3f}")
    on_cls, on_special = a[..., 0].mean(), (a * (real & ~content)[:, None]).sum(-1).mean()  # special: [CLS] + [SEP]
    print(f"  [CLS] row attention on [CLS] / [SEP] / words (mean over heads): {on_cls:.3f} / "
          f"{on_special - on_cls:.3f} / {(a * content[:, None]).sum(-1).mean():.3f}")
    with torch.no_grad():
        for v in (0.0, 0.5, 0.9, 1.0, 1.1, 1.5):
            lam["v"] = v
            z = hf(input_ids=ids, attention_mask=am).logits
            margin = z.gather(1, pred[:, None])[:, 0] - z.gather(1, 1 - pred[:, None])[:, 0]
            print(f"  lambda {v:.1f}: predicted logit {z.gather(1, pred[:, None]).mean():.3f}, "
                  f"margin {margin.mean():.3f}, still predicted {(margin > 0).float().mean():.3f}")
    hook.remove()
    ex = ptext.explain_text(model, params, batch, method="gradcam", target="all")
    p = np.asarray(pred)
    other = np.asarray(ex.maps)[np.arange(len(p)), 1 - p]
    w0, w1 = hf.classifier.weight.detach()
    print(f"  predmaps GradCAM, class not predicted: any positive word {np.mean((other > 0).any(-1)):.3f}; "
          f"cosine of the classifier's two rows {float(torch.nn.functional.cosine_similarity(w0, w1, dim=0)):.3f}")
    if kind == "mixed":
        masses = np.stack([class_masses(wm.maps, s.word_classes) for s, wm in zip(sents, ptext.word_maps(ex, batch))])
        for name, c in (("predicted", p), ("not predicted", 1 - p)):
            own, oth = masses[np.arange(len(c)), c, c], masses[np.arange(len(c)), c, 1 - c]
            print(f"  own > other, map of the {name} class: "
                  f"{np.mean(np.where(own > oth, 1.0, np.where(own == oth, 0.5, 0.0))):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.text_gradcam_sign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=1000)
    args = ap.parse_args(argv)
    for kind in ("single", "mixed"):
        measure(kind, args.sentences)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
