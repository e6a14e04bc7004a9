"""Train the digit-scene ViT that predmaps ships (`predmaps/assets/vit_digits_patch8_64/`).

    python -m predmaps.train_digits --out predmaps/assets/vit_digits_patch8_64

A small timm-compatible ViT (patch 8 on 64x64 -> an 8x8 grid, class token, token pooling,
10 classes) trained from scratch with AdamW, linear warm-up and cosine decay, on one-digit scenes
(`predmaps.digits.one_digit_scenes`) drawn fresh every step from the train digits: the data is
infinite, and each step sees new backgrounds, colours, positions and warps. It runs on CPU (each
stage's time is in TRAINING.md); the accuracy reported is on one-digit scenes of the held-out test digits.
The result is written with `convert.save_timm` (timm's `model.safetensors` + `config.json`,
which `convert.load(out)` and `timm.create_model(..., img_size=64, patch_size=8, ...)` both read)
together with `TRAINING.md`, the record of the run.
"""

from __future__ import annotations

from predmaps.machine import cpu_name

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvit.config import ViTConfig
from jaxvit import safe_write
from jaxvit.model import ViT
from predmaps import digits, stats

MODEL_NAME = "vit_digits_patch8_64"
EVAL_SEED = 2024  # the seed of the reported test scenes
EVAL_SCENES = 2000


def make_config(embed_dim: int = 128, depth: int = 6, num_heads: int = 4, size: int = 64,
                patch_size: int = 8) -> ViTConfig:
    """The digit ViT's config: timm `VisionTransformer` defaults (class token, token pooling,
    pre-norm blocks, final norm, exact GELU, LayerNorm eps 1e-6) at a small size."""
    return ViTConfig(
        name=MODEL_NAME, img_size=(size, size), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_dim=4 * embed_dim, num_classes=10, class_token=True, global_pool="token",
        mean=digits.DIGIT_MEAN, std=digits.DIGIT_STD, interpolation="bilinear", crop_pct=1.0,
        label_names=digits.LABEL_NAMES)


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix: int = 1) -> np.ndarray:
    """(1, prefix + gh * gw, dim) fixed 2-D sine-cosine position embeddings (MAE's), zeros for the prefix
    tokens: half the channels encode the row, half the column, at geometric frequencies."""
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    emb = np.concatenate([enc(rows), enc(cols)], 1)  # (gh * gw, 4 * quarter)
    emb = np.pad(emb, ((prefix, 0), (0, dim - emb.shape[1])))
    return emb[None].astype(np.float32)


def jax_init(params, key, config: ViTConfig | None = None, sincos: bool = False):
    """Re-draw the block weights as timm's `weight_init="jax"` (the original ViT's): Xavier-uniform
    kernels for qkv, proj, fc1, fc2 (instead of jaxvit's truncated normal 0.02, timm's default) and
    N(0, 1e-6) MLP biases. Small ViTs trained from scratch leave the chance plateau far sooner."""
    xavier = jax.nn.initializers.xavier_uniform()
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keys = iter(jax.random.split(key, len(leaves)))

    def redraw(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        k = next(keys)
        if name.startswith("blocks_") and name.endswith("kernel"):
            return xavier(k, leaf.shape, leaf.dtype)
        if name.startswith("blocks_") and "/mlp/" in name and name.endswith("bias"):
            return 1e-6 * jax.random.normal(k, leaf.shape, leaf.dtype)
        if sincos and name == "pos_embed":
            return jnp.asarray(sincos_pos_embed(config.grid_size, config.embed_dim, leaf.shape[1] - config.num_patches))
        return leaf

    return jax.tree_util.tree_map_with_path(redraw, params)


def _decay_mask(params):
    """Weight decay on matrices and kernels only: not on biases, norms, tokens or position embeddings."""
    def keep(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return leaf.ndim >= 2 and not any(s in name for s in ("pos_embed", "cls_token", "reg_token", "dist_token"))

    return jax.tree_util.tree_map_with_path(keep, params)


def curriculum_difficulty(n: int, seed: int, step: int, curriculum: int) -> np.ndarray:
    """Per-scene difficulty of one step: a ramp from 0 at step 0 with a spread of +-0.25 around it,
    clipped to [0, 1]; the ramp reaches 1 (the test distribution) at 0.8 x `curriculum` steps and
    every scene is at 1 from `curriculum` steps on."""
    if curriculum <= 0:
        return np.ones(n, np.float32)
    ramp = 1.25 * step / curriculum
    u = np.random.default_rng([seed, step, 7]).random(n)
    return np.clip(ramp + 0.5 * (u - 0.5), 0, 1).astype(np.float32)


def _train_batch(n: int, seed: int, step: int, two_digit_frac: float, size: int, curriculum: int = 0,
                 *, patch: int = 8, multilabel: bool = False, cutmix: float = 0.0, mixup: float = 0.0,
                 strong_aug: bool = False):
    """One step's normalised images (n, S, S, 3), scene targets (n, 10) and per-patch targets
    (n, N, 10); deterministic in (seed, step).

    Scene targets: one-hot for one digit; two digits: 0.5 each (softmax) or 1 each (`multilabel`).
    Patch targets (for token labelling): each patch's share of digit pixels on that digit's class,
    the rest spread uniformly over the classes (a patch of background carries no class).
    `cutmix`: the share of scenes that get a patch-aligned box from the next scene of the batch
    pasted in (CutMix); their scene targets mix by the box's area, their patch targets follow the box.
    `mixup`: the share of scenes blended with the next scene (Mixup), targets blended alike.
    `strong_aug`: two random photometric operations per scene and random erasing (`_strong_aug`)."""
    n2 = int(round(n * two_digit_frac)) if step >= curriculum else 0  # two-digit scenes after the curriculum
    step_seed = seed * 1_000_003 + step
    diff = curriculum_difficulty(n - n2, seed, step, curriculum)
    eye = np.eye(10, dtype=np.float32)
    images, labels, masks = digits.one_digit_scenes(n - n2, "train", step_seed, size, difficulty=diff)
    targets = eye[labels]
    cover = stats.patch_cover(masks, patch)  # (n, N)
    dense = cover[..., None] * eye[labels][:, None] + (1 - cover)[..., None] * 0.1
    if n2:
        im2, lab2, m2 = digits.two_digit_scenes(n2, "train", step_seed, size)
        weight = 1.0 if multilabel else 0.5
        t2 = weight * (eye[lab2[:, 0]] + eye[lab2[:, 1]])
        c2 = np.stack([stats.patch_cover(m2[:, j], patch) for j in range(2)], -1)  # (n2, N, 2)
        d2 = (c2[..., :1] * eye[lab2[:, 0]][:, None] + c2[..., 1:] * eye[lab2[:, 1]][:, None]
              + (1 - c2.sum(-1, keepdims=True)) * 0.1)
        images, targets, dense = np.concatenate([images, im2]), np.concatenate([targets, t2]), np.concatenate([dense, d2])
    if strong_aug:
        images, dense = _strong_aug(images, dense, np.random.default_rng([seed, step, 13]), patch)
    x = digits.normalize(images)
    if cutmix > 0:
        x, targets, dense = _cutmix(x, targets, dense, cutmix, np.random.default_rng([seed, step, 11]), patch)
    if mixup > 0:
        x, targets, dense = _mixup(x, targets, dense, mixup, np.random.default_rng([seed, step, 12]))
    return x, targets, dense


def _mixup(x, targets, dense, share, rng, alpha: float = 0.8):
    """Mixup (Zhang et al., 2018; alpha 0.8 as DeiT): `share` of the scenes become lam x scene +
    (1 - lam) x the next scene of the batch, lam ~ Beta(alpha, alpha); targets blend by lam."""
    n = x.shape[0]
    lam = np.where(rng.random(n) < share, rng.beta(alpha, alpha, n), 1.0).astype(np.float32)
    src = np.roll(np.arange(n), -1)
    return (lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[src],
            lam[:, None] * targets + (1 - lam[:, None]) * targets[src],
            lam[:, None, None] * dense + (1 - lam[:, None, None]) * dense[src])


# RandAugment-like photometric operations that keep a digit a digit (no flips or rotations: a
# flipped 2 is no 2; the scenes already vary position, size, warp and polarity).
def _brightness(x, rng):
    return x * rng.uniform(0.5, 1.5)


def _contrast(x, rng):
    return x.mean() + (x - x.mean()) * rng.uniform(0.5, 1.5)


def _solarize(x, rng):
    t = rng.uniform(0.5, 1.0)
    return np.where(x >= t, 1.0 - x, x)


def _posterize(x, rng):
    levels = 2 ** rng.integers(2, 5)
    return np.floor(x * levels) / levels


def _invert(x, rng):
    return 1.0 - x


def _noise(x, rng):
    return x + rng.normal(0.0, 0.08, x.shape)


def _blur(x, rng):
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(pad[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)) / 9.0


def _channel_shuffle(x, rng):
    return x[..., rng.permutation(3)]


PHOTOMETRIC_OPS = (_brightness, _contrast, _solarize, _posterize, _invert, _noise, _blur, _channel_shuffle)


def _strong_aug(images, dense, rng, patch, erase_p: float = 0.25):
    """Strong augmentation, in the spirit of DeiT's recipe: two operations of `PHOTOMETRIC_OPS`
    per scene, then random erasing (Zhong et al., 2020; p 0.25, 2-33% of the image, aspect
    0.3-3.3, filled with uniform noise). Erased pixels carry no class: a patch's token-labelling
    target moves towards uniform by the share of it erased."""
    n, size = images.shape[0], images.shape[1]
    x = images.astype(np.float32) / 255.0
    dense = dense.copy()
    for i in range(n):
        for k in rng.choice(len(PHOTOMETRIC_OPS), 2, replace=False):
            x[i] = np.clip(PHOTOMETRIC_OPS[k](x[i], rng), 0.0, 1.0)
        if rng.random() < erase_p:
            area = rng.uniform(0.02, 1 / 3) * size * size
            aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
            h = int(min(size, max(1, round(np.sqrt(area * aspect)))))
            w = int(min(size, max(1, round(np.sqrt(area / aspect)))))
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            x[i, top:top + h, left:left + w] = rng.random((h, w, 3))
            erased = np.zeros((1, size, size), bool)
            erased[0, top:top + h, left:left + w] = True
            e = stats.patch_cover(erased, patch)[0][:, None]  # (N, 1): each patch's erased share
            dense[i] = (1 - e) * dense[i] + e * 0.1
    return np.round(x * 255.0).astype(np.uint8), dense


def _cutmix(x, targets, dense, share, rng, patch):
    """CutMix (Yun et al., 2019) on a patch grid: a box of a random area (uniform in (0, 1)) from
    the next scene of the batch replaces the same box of `share` of the scenes."""
    n, size = x.shape[0], x.shape[1]
    g = size // patch
    x0, t0, d0 = x, targets, dense.reshape(n, g, g, -1)
    x, targets, dense = x0.copy(), t0.copy(), d0.copy()
    src = np.roll(np.arange(n), -1)
    for i in np.flatnonzero(rng.random(n) < share):
        side = np.sqrt(rng.random())
        h, w = max(1, int(round(side * g))), max(1, int(round(side * g)))
        top, left = rng.integers(0, g - h + 1), rng.integers(0, g - w + 1)
        j = src[i]
        x[i, top * patch:(top + h) * patch, left * patch:(left + w) * patch] = \
            x0[j, top * patch:(top + h) * patch, left * patch:(left + w) * patch]
        dense[i, top:top + h, left:left + w] = d0[j, top:top + h, left:left + w]
        a = h * w / (g * g)
        targets[i] = (1 - a) * t0[i] + a * t0[j]
    return x, targets, dense.reshape(n, g * g, -1)


def _train_forward(module: ViT, images, keep=None):
    """(logits, last block's tokens) of `module`; keep (depth, B): per-scene factors of each block's
    residual update (stochastic depth), None for all 1."""
    x = module.embed(images)
    for i, block in enumerate(module.blocks):
        y, _, _ = block(x, want_cls=False, want_full=False)
        x = y if keep is None else x + keep[i][:, None, None] * (y - x)
    return module.head_logits(x)[1], x


def evaluate(model, params, n: int = EVAL_SCENES, split: str = "test", seed: int = EVAL_SEED,
             batch: int = 250) -> float:
    """Top-1 accuracy on n one-digit scenes of `split` drawn with `seed`."""
    images, labels, _ = digits.one_digit_scenes(n, split, seed, model.config.img_size[0])
    return digits.scene_accuracy(model, params, digits.normalize(images), labels, batch)


def evaluate_two_digit(model, params, n: int = 1000, split: str = "test", seed: int = EVAL_SEED,
                       batch: int = 250) -> float:
    """Fraction of two-digit scenes whose two classes are the model's top two."""
    images, labels, _ = digits.two_digit_scenes(n, split, seed, model.config.img_size[0])
    return digits.scene_accuracy(model, params, digits.normalize(images), labels, batch)


def train(out: str | os.PathLike, *, steps: int = 1500, seed: int = 0, batch: int = 64, lr: float = 1e-3,
          warmup: int = 100, weight_decay: float = 0.05, label_smoothing: float = 0.1, clip: float = 1.0,
          embed_dim: int = 128, depth: int = 6, num_heads: int = 4, two_digit_frac: float = 0.0, curriculum: int = 300,
          eval_scenes: int = EVAL_SCENES, log_every: int = 50, command: str | None = None,
          init: str | os.PathLike | None = None, token_label: float = 0.0, multilabel: bool = False,
          cutmix: float = 0.0, drop_path: float = 0.0, mixup: float = 0.0, strong_aug: bool = False) -> dict:
    """Train, evaluate, save with `convert.save_timm` and write TRAINING.md; returns the record.

    `init`: a checkpoint directory (this script's output) to continue from, with a fresh optimiser
    state and schedule (a warm restart); its architecture replaces embed_dim/depth/num_heads and its
    TRAINING.md is kept in the new record as the earlier stage.

    The recipes of the locality study (docs/digit-locality.md): `token_label` (weight of the
    token-labelling loss, `_train_batch`'s patch targets), `multilabel` (sigmoid loss), `cutmix`
    (share of CutMix scenes), `mixup` (share of Mixup scenes), `strong_aug` (photometric operations
    and random erasing), `drop_path` (stochastic depth's largest rate)."""
    import convert

    t_start = time.time()
    init_key, redraw_key = jax.random.split(jax.random.key(seed))
    earlier = None
    if init is not None:
        _, params = convert.load(init)
        config = _.config
        params = jax.tree_util.tree_map(jnp.asarray, params)
        earlier = (Path(init) / "TRAINING.md").read_text() if (Path(init) / "TRAINING.md").exists() else None
        embed_dim, depth, num_heads = config.embed_dim, config.depth, config.num_heads
    else:
        config = make_config(embed_dim, depth, num_heads)
    size = config.img_size[0]
    # Training uses the materialised attention (faster on CPU); the parameters are the same.
    model = ViT(config, attention="materialized")
    if init is None:
        params = model.init(init_key, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        params = jax_init(params, redraw_key, config)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.01)
    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay, mask=_decay_mask(params)))
    opt_state = tx.init(params)

    rates = np.linspace(0.0, drop_path, depth) if depth > 1 else np.full(depth, drop_path)  # timm's linear rule

    @jax.jit
    def train_step(params, opt_state, x, targets, dense, key):
        # Stochastic depth (Huang et al., 2016): each block's residual update is dropped per scene,
        # kept ones scaled by 1 / keep, the drop rate growing linearly with depth up to `drop_path`.
        keep = 1.0 - jnp.asarray(rates, jnp.float32)
        mask = jax.random.bernoulli(key, keep[:, None], (depth, x.shape[0])) / keep[:, None]

        def loss_fn(p):
            logits, last = model.apply({"params": p}, x, mask if drop_path > 0 else None, method=_train_forward)
            if multilabel:  # sigmoid per class, as ImageNet-21k pre-training
                smooth = targets * (1 - label_smoothing) + 0.5 * label_smoothing
                loss = optax.sigmoid_binary_cross_entropy(logits, smooth).sum(-1).mean()
            else:
                smooth = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
                loss = optax.softmax_cross_entropy(logits, smooth).mean()
            if token_label > 0:  # token labelling: the head on every last-layer patch token
                z = model.apply({"params": p}, last[:, config.num_prefix_tokens:], method=ViT.classify)
                loss = loss + token_label * optax.softmax_cross_entropy(z, dense).mean()
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        acc = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).mean()
        return optax.apply_updates(params, updates), opt_state, loss, acc

    print(f"{MODEL_NAME}: {n_params:,} parameters, embed_dim={embed_dim} depth={depth} heads={num_heads}, "
          f"batch {batch}, {steps} steps, seed {seed}, jax {jax.__version__} on {jax.default_backend()}", flush=True)
    batch_args = dict(patch=config.patch_size, multilabel=multilabel, cutmix=cutmix, mixup=mixup,
                      strong_aug=strong_aug)
    x, t, dense = _train_batch(batch, seed, 0, two_digit_frac, size, curriculum, **batch_args)
    drop_key = jax.random.key(seed + 17)
    window_loss, window_acc, window_t, window_n = [], [], time.time(), 0
    for step in range(steps):
        params, opt_state, loss, acc = train_step(params, opt_state, x, t, dense,
                                                  jax.random.fold_in(drop_key, step))  # dispatched asynchronously
        if step + 1 < steps:
            x, t, dense = _train_batch(batch, seed, step + 1, two_digit_frac, size, curriculum,
                                       **batch_args)  # overlaps the step
        window_loss.append(loss)
        window_acc.append(acc)
        window_n += batch
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss_v, acc_v = float(np.mean(jax.device_get(window_loss))), float(np.mean(jax.device_get(window_acc)))
            now = time.time()
            print(f"step {step + 1:5d}/{steps}  loss {loss_v:.4f}  train acc {acc_v:.3f}  "
                  f"lr {float(schedule(step)):.2e}  "
                  f"difficulty {float(curriculum_difficulty(batch, seed, step, curriculum).mean()):.2f}  {window_n / (now - window_t):6.1f} img/s  "
                  f"elapsed {now - t_start:6.0f}s", flush=True)
            window_loss, window_acc, window_t, window_n = [], [], now, 0
    train_time = time.time() - t_start

    eval_model = ViT(config)
    test_acc = evaluate(eval_model, params, eval_scenes, "test")
    train_acc = evaluate(eval_model, params, eval_scenes, "train")
    two_acc = evaluate_two_digit(eval_model, params, max(eval_scenes // 2, 1), "test")
    wall = time.time() - t_start
    print(f"test accuracy {test_acc:.4f} on {eval_scenes} one-digit scenes of the test digits (seed {EVAL_SEED}); "
          f"train digits {train_acc:.4f}; two-digit test scenes with both classes in the top 2: {two_acc:.4f}",
          flush=True)

    out = Path(out)
    convert.save_timm(params, config, out)
    record = dict(
        command=command or "python -m predmaps.train_digits " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        seed=seed, steps=steps, batch=batch, lr=lr, warmup=warmup, weight_decay=weight_decay,
        label_smoothing=label_smoothing, clip=clip, two_digit_frac=two_digit_frac, curriculum=curriculum, n_params=n_params,
        token_label=token_label, multilabel=multilabel, cutmix=cutmix, drop_path=drop_path, mixup=mixup,
        strong_aug=strong_aug,
        train_time_s=train_time, wall_time_s=wall, test_acc=test_acc, train_acc=train_acc, two_digit_top2=two_acc,
        eval_scenes=eval_scenes, config=config, init=None if init is None else str(init), earlier=earlier)
    _write_record(out, record)
    print(f"saved {out / 'model.safetensors'} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB), "
          f"wall time {wall:.0f}s", flush=True)
    return record


def _curriculum_text(steps: int) -> str:
    if steps <= 0:
        return "none: every scene from the full distribution"
    return (f"scene difficulty ramps from 0 (centred 32 px digit, no warp, untextured background) to 1 (the full "
            f"scene distribution) over the first {steps} steps, with a spread of +-0.25 around the ramp; every "
            f"scene is at 1 from step {steps} on")


def _recipe_text(r: dict) -> str:
    parts = ["sigmoid loss per class" if r.get("multilabel") else "softmax cross-entropy"]
    if r.get("token_label"):
        parts.append(f"token labelling, weight {r['token_label']} (the head on every last-layer patch token, "
                     "towards the class of the digit it covers, uniform on background)")
    if r.get("cutmix"):
        parts.append(f"CutMix on {r['cutmix']:.0%} of the scenes (patch-aligned boxes)")
    if r.get("mixup"):
        parts.append(f"Mixup on {r['mixup']:.0%} of the scenes (Beta(0.8, 0.8))")
    if r.get("strong_aug"):
        parts.append("strong augmentation (two photometric operations per scene, random erasing p 0.25)")
    if r.get("drop_path"):
        parts.append(f"stochastic depth up to {r['drop_path']}")
    return "; ".join(parts)


def _write_record(out: Path, r: dict) -> None:
    cfg: ViTConfig = r["config"]
    size = (out / "model.safetensors").stat().st_size
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import flax
    import sklearn

    text = f"""# {cfg.name}

A {r['n_params']:,}-parameter timm `VisionTransformer` trained {'from scratch' if r.get('init') is None else 'in stages (the earlier ones below)'} on digit scenes
(`predmaps.digits`: the UCI handwritten digits shipped in scikit-learn, on random textured
backgrounds) by `predmaps/train_digits.py`. Input 64x64 RGB, normalised with mean = std = 0.5;
patch 8 (an 8x8 grid of patch tokens), class token, token pooling, 10 classes "0".."9".

## Command

    {r['command']}

## Run

| | |
|---|---|
| date | {date} |
| machine | {os.cpu_count()}-core CPU ({cpu_name()}), {platform.system()} {platform.machine()}, shared with other jobs |
| software | python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, numpy {np.__version__}, scikit-learn {sklearn.__version__} |
| seed | {r['seed']} |
| initial weights | {'jax-style random init (Xavier-uniform block kernels)' if r.get('init') is None else '`' + r['init'] + '` (the earlier stage below), with a fresh optimiser state and schedule'} |
| steps x batch | {r['steps']} x {r['batch']} = {r['steps'] * r['batch']:,} scenes, each drawn fresh from the 1,438 train digits |
| curriculum | {_curriculum_text(r['curriculum'])} |
| two-digit share of each batch (after the curriculum; targets 0.5 each, or 1 each with the sigmoid loss) | {r['two_digit_frac']} |
| recipe | {_recipe_text(r)} |
| optimiser | AdamW, peak lr {r['lr']}, {r['warmup']} warm-up steps then cosine decay to {r['lr'] * 0.01:g}, weight decay {r['weight_decay']} (matrices only), grad-norm clip {r['clip']}, label smoothing {r['label_smoothing']} |
| training time | {r['train_time_s']:.0f} s |
| wall time (training + evaluation + saving) | {r['wall_time_s']:.0f} s |

## Architecture

embed_dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, mlp {cfg.mlp_dim}, qkv bias, exact GELU,
LayerNorm eps {cfg.norm_eps}. In timm:

    timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                      embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, num_classes=10)

`model.safetensors` ({size / 1e6:.2f} MB, float32) loads into it strictly; `convert.load` reads the exact
config from `config.json` (`jaxvit_config`).

## Accuracy

Test accuracy: **{r['test_acc']:.4f}** ({r['eval_scenes']} one-digit scenes of the held-out test digits).

| scenes | accuracy |
|---|---|
| {r['eval_scenes']} one-digit scenes of the 359 held-out **test** digits (`one_digit_scenes({r['eval_scenes']}, "test", seed={EVAL_SEED})`) | **{r['test_acc']:.4f}** |
| {r['eval_scenes']} one-digit scenes of the train digits (seed {EVAL_SEED}) | {r['train_acc']:.4f} |
| {max(r['eval_scenes'] // 2, 1)} two-digit test scenes: both classes are the top two | {r['two_digit_top2']:.4f} |
"""
    if r.get("earlier"):
        # The earlier stage's record, its headings pushed one level down.
        earlier = "\n".join(("#" + line) if line.startswith("#") else line for line in r["earlier"].splitlines())
        text += "\n## Earlier stage (the initial weights of this run)\n\n" + earlier.split("\n", 1)[1].lstrip("\n") + "\n"
    safe_write.write_text(out / "TRAINING.md", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m predmaps.train_digits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (model.safetensors, config.json, TRAINING.md)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--two-digit-frac", type=float, default=0.0,
                    help="share of each batch that is two-digit scenes with 50/50 targets")
    ap.add_argument("--curriculum", type=int, default=300,
                    help="steps over which the scene difficulty ramps up from easy (0: off)")
    ap.add_argument("--token-label", type=float, default=0.0,
                    help="weight of token labelling: the head on every last-layer patch token, trained towards "
                         "the class of the digit it covers (uniform on background); 0: off")
    ap.add_argument("--multilabel", action="store_true", help="sigmoid loss per class (two digits: both 1)")
    ap.add_argument("--cutmix", type=float, default=0.0, help="share of scenes given a CutMix box (0: off)")
    ap.add_argument("--mixup", type=float, default=0.0, help="share of scenes blended with another (Mixup; 0: off)")
    ap.add_argument("--strong-aug", action="store_true",
                    help="two photometric operations per scene and random erasing (DeiT-style strong augmentation)")
    ap.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth: the deepest block's drop rate")
    ap.add_argument("--eval-scenes", type=int, default=EVAL_SCENES)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--init", default=None,
                    help="continue from this checkpoint directory (fresh optimiser and schedule)")
    a = ap.parse_args(argv)
    train(a.out, steps=a.steps, seed=a.seed, batch=a.batch, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
          label_smoothing=a.label_smoothing, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads,
          two_digit_frac=a.two_digit_frac, curriculum=a.curriculum, eval_scenes=a.eval_scenes, log_every=a.log_every,
          init=a.init, token_label=a.token_label, multilabel=a.multilabel, cutmix=a.cutmix, drop_path=a.drop_path,
          mixup=a.mixup, strong_aug=a.strong_aug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
