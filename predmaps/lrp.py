"""LRP baselines of Chefer et al. 2021b ("Transformer Interpretability Beyond Attention
Visualization", CVPR 2021), batched and jittable, on jaxvit parameters.

Three methods, each `(model, params, images, targets, ...) -> dict` with
``maps`` (B, K, N) float32 (N patch tokens, row-major, prefix tokens dropped),
``classes`` (B, K) int32 and ``logits`` (B, C) float32:

* `transattr`: Transformer Attribution ("transformer_attribution", legacy name "grad", in
  Chefer's `ViT_LRP.VisionTransformer.relprop`): per block the LRP relevance of the attention
  probabilities times d(logit_c)/d(attention), clamped at 0, mean over heads; rollout with the
  identity added and no row normalisation, from `start_layer`; class-token row.
* `full_lrp`: relevance propagated to the input pixels ("full"), summed over channels; also
  pooled to patches (sum over each patch's pixels) for ``maps``; ``pixel_maps`` (B, K, H, W)
  is what Chefer's evaluation stores for "full_lrp".
* `partial_lrp`: Voita et al.'s partial LRP ("last_layer"): the last block's attention
  relevance, clamped at 0, mean over heads, class-token row.

How the relevance is propagated (learned from Chefer's `modules/layers_ours.py` and
`modules/layers_lrp.py`, re-written as explicit array functions):

* the pass starts from one-hot(class) on the logits (not the logit value);
* Linear layers (qkv, proj, fc1, fc2, head): alpha-beta rule with positive / negative weight and
  input splits, biases ignored, alpha = 1, beta = 0 by default. Two rule sets exist in Chefer's
  code and both are offered through ``rule``:
    - ``"ours"`` (`layers_ours`, used by Chefer for Transformer Attribution): the positive
      parts px.pw and nx.nw share one denominator (px pw + nx nw), and residual adds are
      re-normalised (split by contribution, then each branch scaled so that the two sums are in
      the ratio |a_sum| : |b_sum| and add up to the incoming sum; sums per image);
    - ``"orig"`` (`layers_lrp`, `ViT_orig_LRP`, used by Chefer's evaluation scripts for
      "full_lrp" and "lrp_last_layer"): each part has its own denominator and residual adds
      are the plain z-rule split x_i * R / (x_0 + x_1).
* LayerNorm (norm1/2, final norm, fc_norm, norm_pre, q/k norms and the attention / MLP scale
  norms), GELU, softmax, dropout, LayerScale and the constant 1/2 of DeiT's averaged heads: pass
  relevance through unchanged;
* the two attention matmuls: z-rule for a product of two inputs, R_i = X_i * dZ/dX_i^T (R / Z),
  then halved for each input (Chefer's `cam /= 2`). q.k^T uses the unscaled q (the 1/sqrt(d)
  factor is outside the einsum in Chefer's model);
* the clone before each residual branch: sum of the two relevances (X * (R1/X + R2/X));
* class-token pooling: R at token 0, X_0 * R / X_0;
* patch embedding (a convolution over 3 input channels): Chefer's z^B (bounded) rule with the
  bounds L, H = min, max of the image (each image its own);
* every division is Chefer's `safe_divide`: a / (b + 1e-9) where b != 0, else 0.

Beyond Chefer's ViT (which has none of these): LayerScale passes relevance through; register
tokens and the DeiT distillation token are ordinary tokens and are dropped from the maps with the
class token; DeiT distilled heads, whose logits are (head(x_cls) + head_dist(x_dist)) / 2, are
treated as a residual add of the two halves (split by contribution under the active rule), then
each head's Linear rule to its token. Models without a class token (or pooling other than the
class token) are refused: these methods read the class-token row; so are heads reading the class token
and the patch-token mean (head_input='token_and_patch_mean', DINOv2's classifiers).

The computation runs in float32 whatever the model's compute dtype (float64 when the images are
float64 and jax_enable_x64 is on: the parity tests use it), with matmuls at full precision
(Precision.HIGHEST, no TF32 on GPU: the rules divide by pre-activations, which amplifies
rounding). The forward is the model's own `ViT.apply` (a float32, materialized-attention,
HIGHEST-precision clone), which sows every layer's input into its `intermediates` collection;
then the relevance pass runs vmapped over the K target classes, and for `transattr` one
vector-Jacobian product per class (vmapped) through the model's attention perturbations gives the
attention gradients. Memory grows with K (for transattr: K x L x B x H x T x T relevances and
gradients); explain many classes in chunks. Large batches run in sub-batches (`lax.map`) sized to
keep one pass near `_PASS_BYTES` (8 GiB): ViT-B/16 at K=1 takes at most 17 images per pass.
Everything is batched (Chefer's code handles one image; its sums in the residual re-normalisation
are taken per image here, which is what it computes at batch size 1).

The public functions check their arguments, then run a jitted implementation (the model, ``rule``,
``alpha`` and boolean options static); they also work inside the caller's jit, e.g.
``jax.jit(transattr, static_argnums=0, static_argnames=("rule", "alpha"))``. ``start_layer`` may
be traced (one compilation serves every start layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.model import INTERMEDIATES, patchify
from predmaps.core import BATCHED_VJP_OK, zeros_varying_like

__all__ = ["RULES", "attention_relevance", "forward", "full_lrp", "partial_lrp", "relprop", "transattr"]

RULES = ("ours", "orig")
_EPS = 1e-9
# Full float32 matmuls (no TF32 / bf16 passes on GPU): the relevance rules divide by
# pre-activations, which amplifies matmul rounding.
_PREC = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_PREC)


def _einsum(eq, a, b):
    return jnp.einsum(eq, a, b, precision=_PREC)


# ----------------------------------------------------------------------------- checks


def _check(model, rule: str | None = None):
    """What LRP's explicit forward and relevance rules need of the model (and the rule, when given)."""
    from predmaps.request import check

    check(model, "lrp", None, None if rule is None else {"rule": rule})


# ----------------------------------------------------------------------------- forward


def _dtype(images):
    """float32, or float64 for float64 images (only possible with jax_enable_x64)."""
    return jnp.float64 if getattr(images, "dtype", None) == jnp.float64 and jax.config.x64_enabled else jnp.float32


def _unpatchify(x, grid, p):
    """(B, N, p*p) -> (B, H, W)."""
    b = x.shape[0]
    gh, gw = grid
    return x.reshape(b, gh, gw, p, p).transpose(0, 1, 3, 2, 4).reshape(b, gh * p, gw * p)


def forward(model, params, images, attn_delta=None):
    """`model.apply` (a `jaxvit.ViT`) with its layers' inputs sown -> (logits (B, C), activations).

    The model runs as a copy in float32 (float64 for float64 images under x64) whatever its compute
    dtype, with materialized attention, XLA kernels and HIGHEST matmul precision.
    `attn_delta`: None or a list of L entries, each None or an array (B, H, T, T) added to that
    block's attention probabilities through the model's 'perturbations' collection (zeros: the
    gradient w.r.t. them is d(output)/d(attention)).
    The activations are the inputs of every layer that relevance passes through (a pytree, the
    model's sown `INTERMEDIATES` under the names the rules use): `tokens` the last block's output,
    `blocks[i]["x"]` block i's input, `blocks[i]["attn"]` its attention probabilities (B, H, T, T),
    `blocks[i]["q"]` (B, H, T, dh), and so on.
    """
    _check(model)  # it reads the class token out: a pooled model's logits would be silently wrong
    cfg = model.config
    dt = _dtype(images)
    variables = {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, dt), params)}
    if attn_delta is not None and any(a is not None for a in attn_delta):
        like = next(a for a in attn_delta if a is not None)
        deltas = [jnp.zeros_like(like) if a is None else a for a in attn_delta]  # flax wants every block's
        variables["perturbations"] = {f"blocks_{i}": {"attn": {"attn": a}} for i, a in enumerate(deltas)}
    explainer = model.clone(dtype=dt, attention="materialized", kernels="xla", precision=_PREC)
    out, state = explainer.apply(variables, jnp.asarray(images, dt), mutable=[INTERMEDIATES])
    sown = jax.tree_util.tree_map(lambda v: v[0], state[INTERMEDIATES], is_leaf=lambda v: isinstance(v, tuple))
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731 -- (B, T, H, dh) -> (B, H, T, dh)
    blocks = []
    for i in range(cfg.depth):
        s = sown[f"blocks_{i}"]
        att = s["attn"]
        blocks.append({"x": s["x"], "n1": s["attn_in"], "q": heads_first(att["q"]), "k": heads_first(att["k"]),
                       "v": heads_first(att["v"]), "attn": att["probs"], "o": att["proj_in"], "y1": s["attn_out"],
                       "xm": s["mid"], "n2": s["mlp_in"], "hid": s["mlp"]["fc2_in"], "y2": s["mlp_out"]})
    acts = {"images": sown["images"], "patches": sown.get("patches"), "pos_embed": sown.get("posemb"),
            "blocks": blocks, "tokens": out.tokens[:, -1], "xn": sown["head_in"]}
    if cfg.distilled:
        acts["z_halves"] = (sown["logits_cls"] / 2, sown["logits_dist"] / 2)
    else:
        acts["pooled"] = sown["pooled"]
    return out.logits, acts


# ----------------------------------------------------------------------------- rules


def _sd(a, b):
    """Chefer's safe_divide: a / (b + 1e-9) where b != 0, else 0 (and a / 1e-9 where b = -1e-9).

    Chefer's denominator clamp(b, min=eps) + clamp(b, max=eps) is b + eps to the last bit."""
    den = b + _EPS
    return jnp.where(b != 0, a / jnp.where(den == 0, _EPS, den), 0)


def _linear(x, w, r, rule, alpha):
    """alpha-beta rule for y = x @ w (w (I, O)), bias ignored; r (..., O) -> (..., I)."""
    pw, nw = jnp.maximum(w, 0), jnp.minimum(w, 0)
    px, nx = jnp.maximum(x, 0), jnp.minimum(x, 0)

    def part(w1, w2):  # w1 pairs with x+, w2 with x-
        z1, z2 = _mm(px, w1), _mm(nx, w2)
        if rule == "ours":  # one denominator for both parts
            s1 = s2 = _sd(r, z1 + z2)
        else:  # "orig": each part normalised on its own
            s1, s2 = _sd(r, z1), _sd(r, z2)
        return px * _mm(s1, w1.T) + nx * _mm(s2, w2.T)

    act = part(pw, nw)
    if isinstance(alpha, (int, float)) and alpha == 1:
        return act
    return alpha * act - (alpha - 1) * part(nw, pw)


def _add(x0, x1, r, rule):
    """Residual add y = x0 + x1 -> (r0, r1); per-image re-normalisation under rule 'ours'."""
    s = _sd(r, x0 + x1)
    a, b = x0 * s, x1 * s
    if rule == "orig":
        return a, b
    axes = tuple(range(1, r.ndim))
    a_sum, b_sum = a.sum(axes, keepdims=True), b.sum(axes, keepdims=True)
    r_sum = r.sum(axes, keepdims=True)
    tot = jnp.abs(a_sum) + jnp.abs(b_sum)
    a_fact = _sd(jnp.abs(a_sum), tot) * r_sum
    b_fact = _sd(jnp.abs(b_sum), tot) * r_sum
    return a * _sd(a_fact, a_sum), b * _sd(b_fact, b_sum)


def _clone(x, r0, r1):
    return x * (_sd(r0, x) + _sd(r1, x))


def _matmul_relprop(eq_fwd, eq_0, eq_1, x0, x1, r):
    """z-rule for Z = einsum(eq_fwd, x0, x1): (x0 * dZ/dx0^T S, x1 * dZ/dx1^T S), S = R / Z.

    eq_0 / eq_1: the einsums (S, x1) -> dx0 and (S, x0) -> dx1 of the backward pass."""
    s = _sd(r, _einsum(eq_fwd, x0, x1))
    return x0 * _einsum(eq_0, s, x1), x1 * _einsum(eq_1, s, x0)


def _patch_conv_zb(images, kernel, r_patches, p):
    """z^B rule for the patch convolution; images (B, H, W, C), r_patches (B, N, D) ->
    pixel relevance per patch (B, N, p*p*C)."""
    d = kernel.shape[-1]
    w = kernel.reshape(-1, d)
    pw, nw = jnp.maximum(w, 0), jnp.minimum(w, 0)
    lo = images.min(axis=(1, 2, 3))[:, None, None]
    hi = images.max(axis=(1, 2, 3))[:, None, None]
    xp = patchify(images, p)
    za = _mm(xp, w) - lo * pw.sum(0) - hi * nw.sum(0) + _EPS
    s = r_patches / za
    return xp * _mm(s, w.T) - lo * _mm(s, pw.T) - hi * _mm(s, nw.T)


# ----------------------------------------------------------------------------- relevance pass


def relprop(model, params, acts, r_logits, *, rule: str = "ours", alpha=1.0, to_input: bool = False):
    """The LRP pass from relevance `r_logits` (B, C) on the logits (one-hot in Chefer's use).

    Returns dict(attn_cams=[L x (B, H, T, T)] (relevance at each block's attention
    probabilities, after Chefer's halving), tokens=(B, T, D) relevance at the first block's
    input, and with `to_input` pixels=(B, N, p*p*C) relevance at the image, per patch).
    """
    cfg = model.config
    _check(model, rule)
    dt = acts["images"].dtype
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dt), params)
    r_logits = jnp.asarray(r_logits, dt)
    xn = acts["xn"]
    b, t, d = xn.shape

    def select(tok, r_tok):  # IndexSelect relprop, token `tok`
        x_tok = xn[:, tok]
        return jnp.zeros_like(xn).at[:, tok].set(x_tok * _sd(r_tok, x_tok))

    if cfg.distilled:
        zc, zd = acts["z_halves"]
        rc, rd = _add(zc, zd, r_logits, rule)
        r = (select(0, _linear(xn[:, 0], params["head"]["kernel"], rc, rule, alpha))
             + select(1, _linear(xn[:, 1], params["head_dist"]["kernel"], rd, rule, alpha)))
    else:
        r = select(0, _linear(acts["pooled"], params["head"]["kernel"], r_logits, rule, alpha))

    h, dh = cfg.num_heads, cfg.dim_head
    cams = [None] * cfg.depth
    for i in reversed(range(cfg.depth)):
        s, bp = acts["blocks"][i], params[f"blocks_{i}"]
        r_res, r_mlp = _add(s["xm"], s["y2"], r, rule)
        r_mlp = _linear(s["hid"], bp["mlp"]["fc2"]["kernel"], r_mlp, rule, alpha)
        r_mlp = _linear(s["n2"], bp["mlp"]["fc1"]["kernel"], r_mlp, rule, alpha)
        r = _clone(s["xm"], r_res, r_mlp)

        r_res, r_att = _add(s["x"], s["y1"], r, rule)
        r_att = _linear(s["o"], bp["attn"]["proj"]["kernel"], r_att, rule, alpha)
        r_att = jnp.swapaxes(r_att.reshape(b, t, h, dh), 1, 2)  # (B, H, T, dh)
        r_attn, r_v = _matmul_relprop("bhij,bhjd->bhid", "bhid,bhjd->bhij", "bhid,bhij->bhjd",
                                      s["attn"], s["v"], r_att)
        r_attn, r_v = r_attn / 2, r_v / 2
        cams[i] = r_attn
        r_q, r_k = _matmul_relprop("bhid,bhjd->bhij", "bhij,bhjd->bhid", "bhij,bhid->bhjd",
                                   s["q"], s["k"], r_attn)
        r_q, r_k = r_q / 2, r_k / 2
        r_qkv = jnp.stack([r_q, r_k, r_v], axis=1)  # (B, 3, H, T, dh)
        r_qkv = jnp.moveaxis(r_qkv, 3, 1).reshape(b, t, 3 * h * dh)
        r_att = _linear(s["n1"], bp["attn"]["qkv"]["kernel"], r_qkv, rule, alpha)
        r = _clone(s["x"], r_res, r_att)

    out = {"attn_cams": cams, "tokens": r}
    if to_input:
        npre = cfg.num_prefix_tokens
        pe = acts["pos_embed"]
        if pe is None:
            r_patch = r[:, npre:]
        elif cfg.no_embed_class:
            r_patch, _ = _add(acts["patches"], pe, r[:, npre:], rule)
        else:
            r_emb, _ = _add(acts["patches"], pe, r, rule)
            r_patch = r_emb[:, npre:]
        out["pixels"] = _patch_conv_zb(acts["images"], params["patch_embed"]["kernel"], r_patch, cfg.patch_size)
    return out


# ----------------------------------------------------------------------------- methods


def _num_tokens(cfg, images):
    return cfg.num_prefix_tokens + (images.shape[1] // cfg.patch_size) * (images.shape[2] // cfg.patch_size)


def _core(model, params, images, targets, *, rule, alpha, grad_blocks=(), to_input=False):
    """One forward (with a vjp when gradients at the attention of `grad_blocks` are wanted),
    then the relevance pass and the gradients vmapped over the K classes (leading axis K)."""
    cfg = model.config
    _check(model, rule)
    grads = None
    if grad_blocks:
        t = _num_tokens(cfg, images)
        zeros = {i: zeros_varying_like((images.shape[0], cfg.num_heads, t, t), _dtype(images), images)
                 for i in grad_blocks}
        fwd = lambda dl: forward(model, params, images, [dl.get(i) for i in range(cfg.depth)])
        logits, vjp_fn, acts = jax.vjp(fwd, zeros, has_aux=True)
    else:
        logits, acts = forward(model, params, images)
    classes, onehots = _one_hots(logits, targets)
    rel = jax.vmap(lambda r: relprop(model, params, acts, r, rule=rule, alpha=alpha, to_input=to_input))(onehots)
    if grad_blocks:
        grads_for = lambda ct: vjp_fn(ct)[0]  # noqa: E731
        # {block: (K, B, H, T, T)}; class by class where a batched vjp miscompiles (core.BATCHED_VJP_OK)
        grads = jax.vmap(grads_for)(onehots) if BATCHED_VJP_OK else jax.lax.map(grads_for, onehots)
    return logits, classes, rel, grads


# Images per pass: the batch runs in sub-batches (lax.map) sized so that one pass's float32
# activations, relevances and gradients stay near this many bytes. Every image is independent here, so
# the maps do not depend on it beyond float32 rounding (a GEMM's summation order may change with
# its row count, so maps of one image computed in batches of different sizes agree to rounding, not
# bit for bit). One pass for a whole large batch ran out of GPU memory (bench/NOTES.md).
_PASS_BYTES = 8 << 30


def _sub_batch(cfg, images, k: int) -> int:
    """Images per pass for K classes: an upper estimate of a pass's bytes per image is 2 + 2K copies
    of the forward's saved activations (x, norms, q, k, v, outputs: ~10 T x D; the MLP's T x mlp_dim;
    the attention's H x T x T per block), at the images' dtype."""
    t = _num_tokens(cfg, images)
    per_block = 10 * t * cfg.embed_dim + t * cfg.mlp_dim + cfg.num_heads * t * t
    per_image = cfg.depth * per_block * jnp.dtype(_dtype(images)).itemsize * (2 + 2 * k)
    return max(1, _PASS_BYTES // per_image)


def _by_sub_batch(impl):
    """impl(model, params, images, targets, ...) run over sub-batches of `_sub_batch` images when the
    batch is larger (padded with copies of the last image, then sliced off); outputs are pytrees with
    the batch axis first. Per-example target classes (B, K) are split with the images."""
    @functools.wraps(impl)
    def run(model, params, images, targets, *args, **kwargs):
        b = images.shape[0]
        chunk = _sub_batch(model.config, images, targets.k)
        if b <= chunk:
            return impl(model, params, images, targets, *args, **kwargs)
        n = -(-b // chunk)
        chunk = -(-b // n)  # the same number of passes, the least padding
        edge = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], n * chunk - b, axis=0)]).reshape(
            (n, chunk) + a.shape[1:])
        per_example = targets.classes is not None and targets.classes.shape[0] == b
        xs = (edge(images), edge(targets.classes) if per_example else None)
        body = lambda x: impl(model, params, x[0], targets.replace(classes=x[1]) if per_example else targets,
                              *args, **kwargs)
        out = jax.lax.map(body, xs)
        return jax.tree_util.tree_map(lambda o: o.reshape((n * chunk,) + o.shape[2:])[:b], out)

    return run


def _one_hots(logits, targets):
    classes = targets.resolve(logits)
    onehot = jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype)  # (B, K, C)
    return classes, jnp.moveaxis(onehot, 1, 0)  # (K, B, C)


def _head_mean_clamped(cam):
    return jnp.maximum(cam, 0).mean(axis=-3)


def _validate(model, images, rule):
    _check(model, rule)
    cfg = model.config
    if getattr(images, "ndim", None) != 4 or images.shape[-1] != cfg.in_chans:
        raise ValueError(f"images must be (B, H, W, {cfg.in_chans}) channels-last; got shape "
                         f"{getattr(images, 'shape', None)}")


def attention_relevance(model, params, images, targets, *, rule: str = "ours", alpha: float = 1.0,
                        grads: bool = True):
    """Per-block attention relevance and gradients, the ingredients of `transattr`.

    Returns dict(cams (B, K, L, H, T, T): LRP relevance at every block's attention probabilities
    (Chefer's `get_attn_cam()`), grads (B, K, L, H, T, T): d(logit_c)/d(attention probabilities)
    (Chefer's `get_attn_gradients()`; only with `grads=True`), classes (B, K), logits (B, C)).
    """
    _validate(model, images, rule)
    return _attention_relevance(model, params, images, targets, rule=rule, alpha=alpha, grads=grads)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule", "alpha", "grads"))
@_by_sub_batch
def _attention_relevance(model, params, images, targets, *, rule, alpha, grads):
    depth = model.config.depth
    logits, classes, rel, g = _core(model, params, images, targets, rule=rule, alpha=alpha,
                                    grad_blocks=tuple(range(depth)) if grads else ())
    out = {"cams": jnp.moveaxis(jnp.stack(rel["attn_cams"], axis=2), 0, 1), "classes": classes, "logits": logits}
    if grads:
        out["grads"] = jnp.moveaxis(jnp.stack([g[i] for i in range(depth)], axis=2), 0, 1)
    return out


def transattr(model, params, images, targets, start_layer=1, *, rule: str = "ours", alpha: float = 1.0):
    """Chefer's Transformer Attribution (2021b), as `generate_LRP(method="transformer_attribution")`.

    Per block l: cam_l = mean over heads of max(grad_l * relevance_l, 0) (B, T, T), with
    grad_l = d(logit_c)/d(attention probabilities of block l) and relevance_l the LRP relevance
    there; R = prod over l >= start_layer of (I + cam_l) (later blocks on the left), no row
    normalisation; map = R[0, P:].

    `start_layer` defaults to 1: what Chefer's evaluation scripts (perturbation and segmentation
    tests) pass; `generate_LRP`'s own default, used by its demo notebook, is 0. May be traced.
    Returns dict(maps (B, K, N), classes (B, K), logits (B, C)).
    """
    _validate(model, images, rule)
    depth = model.config.depth
    if isinstance(start_layer, (int, np.integer)) and not 0 <= start_layer < depth:
        raise ValueError(f"start_layer={start_layer} is outside the model's blocks 0..{depth - 1}")
    return _transattr(model, params, images, targets, start_layer, rule=rule, alpha=alpha)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule", "alpha"))
@_by_sub_batch
def _transattr(model, params, images, targets, start_layer, *, rule, alpha):
    cfg = model.config
    logits, classes, rel, grads = _core(model, params, images, targets, rule=rule, alpha=alpha,
                                        grad_blocks=tuple(range(cfg.depth)))
    cams = rel["attn_cams"]
    # Row 0 of (I + A_{L-1}) ... (I + A_s): carry the class-token row from the last block down.
    k, b, _, t, _ = cams[0].shape
    row = jnp.zeros((k, b, t), logits.dtype).at[..., 0].set(1.0)
    for i in reversed(range(cfg.depth)):
        a = _head_mean_clamped(grads[i] * cams[i])  # (K, B, T, T)
        step = _einsum("kbi,kbij->kbj", row, a)
        row = row + jnp.where(i >= start_layer, step, jnp.zeros_like(step))
    maps = jnp.moveaxis(row[..., cfg.num_prefix_tokens:], 0, 1)
    return {"maps": maps, "classes": classes, "logits": logits}


def full_lrp(model, params, images, targets, *, rule: str = "orig", alpha: float = 1.0):
    """Full LRP to the input (Chefer's "full"): pixel relevance summed over channels.

    Returns dict(maps (B, K, N): pixel relevance summed over each patch, pixel_maps (B, K, H, W):
    what Chefer's "full_lrp" evaluation uses directly (no upsampling), classes (B, K), logits (B, C)).
    `rule` defaults to "orig" (`ViT_orig_LRP` / `layers_lrp`), the model Chefer's evaluation
    scripts use for "full_lrp".
    """
    _validate(model, images, rule)
    return _full_lrp(model, params, images, targets, rule=rule, alpha=alpha)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule", "alpha"))
@_by_sub_batch
def _full_lrp(model, params, images, targets, *, rule, alpha):
    cfg = model.config
    logits, classes, rel, _ = _core(model, params, images, targets, rule=rule, alpha=alpha, to_input=True)
    pix = rel["pixels"]  # (K, B, N, p*p*C)
    k, b, n, _ = pix.shape
    p = cfg.patch_size
    pix = pix.reshape(k, b, n, p * p, cfg.in_chans).sum(-1)  # sum over channels
    grid = (images.shape[1] // p, images.shape[2] // p)
    pixel_maps = _unpatchify(pix.reshape(k * b, n, p * p), grid, p).reshape(k, b, grid[0] * p, grid[1] * p)
    return {"maps": jnp.moveaxis(pix.sum(-1), 0, 1), "pixel_maps": jnp.moveaxis(pixel_maps, 0, 1),
            "classes": classes, "logits": logits}


def partial_lrp(model, params, images, targets, *, rule: str = "orig", alpha: float = 1.0, grad: bool = False):
    """Partial LRP (Voita et al.), Chefer's "last_layer": the last block's attention relevance,
    clamped at 0, mean over heads, class-token row, patch columns.

    `grad=True` is Chefer's `is_ablation` variant (relevance times gradient before the clamp).
    `rule` defaults to "orig", the model Chefer's evaluation scripts use for "lrp_last_layer".
    Returns dict(maps (B, K, N), classes (B, K), logits (B, C)).
    """
    _validate(model, images, rule)
    return _partial_lrp(model, params, images, targets, rule=rule, alpha=alpha, grad=grad)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule", "alpha", "grad"))
@_by_sub_batch
def _partial_lrp(model, params, images, targets, *, rule, alpha, grad):
    cfg = model.config
    last = cfg.depth - 1
    logits, classes, rel, grads = _core(model, params, images, targets, rule=rule, alpha=alpha,
                                        grad_blocks=(last,) if grad else ())
    cam = rel["attn_cams"][last]  # (K, B, H, T, T)
    if grad:
        cam = cam * grads[last]
    maps = _head_mean_clamped(cam)[..., 0, cfg.num_prefix_tokens:]  # (K, B, N)
    return {"maps": jnp.moveaxis(maps, 0, 1), "classes": classes, "logits": logits}
