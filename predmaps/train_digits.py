"""Train the digit-scene ViT that predmaps ships (`predmaps/assets/vit_digits_patch8_64/`).

    python -m predmaps.train_digits --out predmaps/assets/vit_digits_patch8_64

A small timm-compatible ViT (patch 8 on 64x64 -> an 8x8 grid, class token, token pooling,
10 classes) trained from scratch with AdamW, linear warm-up and cosine decay, on one-digit scenes
(`predmaps.digits.one_digit_scenes`) drawn fresh every step from the train digits: the data is
infinite, and each step sees new backgrounds, colours, positions and warps. It runs on CPU in
about a quarter of an hour; the accuracy reported is on one-digit scenes of the held-out test digits.
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
from jaxvit.model import ViT
from predmaps import digits

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


def _train_batch(n: int, seed: int, step: int, two_digit_frac: float, size: int, curriculum: int = 0):
    """Normalised images and soft targets (n, 10) for one step; deterministic in (seed, step)."""
    n2 = int(round(n * two_digit_frac)) if step >= curriculum else 0  # two-digit scenes after the curriculum
    step_seed = seed * 1_000_003 + step
    diff = curriculum_difficulty(n - n2, seed, step, curriculum)
    images, labels, _ = digits.one_digit_scenes(n - n2, "train", step_seed, size, difficulty=diff)
    targets = np.eye(10, dtype=np.float32)[labels]
    if n2:
        im2, lab2, _ = digits.two_digit_scenes(n2, "train", step_seed, size)
        t2 = 0.5 * (np.eye(10, dtype=np.float32)[lab2[:, 0]] + np.eye(10, dtype=np.float32)[lab2[:, 1]])
        images, targets = np.concatenate([images, im2]), np.concatenate([targets, t2])
    return digits.normalize(images), targets


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
          init: str | os.PathLike | None = None) -> dict:
    """Train, evaluate, save with `convert.save_timm` and write TRAINING.md; returns the record.

    `init`: a checkpoint directory (this script's output) to continue from, with a fresh optimiser
    state and schedule (a warm restart); its architecture replaces embed_dim/depth/num_heads and its
    TRAINING.md is kept in the new record as the earlier stage."""
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

    @jax.jit
    def train_step(params, opt_state, x, targets):
        def loss_fn(p):
            logits = model.apply({"params": p}, x).logits
            smooth = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
            return optax.softmax_cross_entropy(logits, smooth).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        acc = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).mean()
        return optax.apply_updates(params, updates), opt_state, loss, acc

    print(f"{MODEL_NAME}: {n_params:,} parameters, embed_dim={embed_dim} depth={depth} heads={num_heads}, "
          f"batch {batch}, {steps} steps, seed {seed}, jax {jax.__version__} on {jax.default_backend()}", flush=True)
    x, t = _train_batch(batch, seed, 0, two_digit_frac, size, curriculum)
    window_loss, window_acc, window_t, window_n = [], [], time.time(), 0
    for step in range(steps):
        params, opt_state, loss, acc = train_step(params, opt_state, x, t)  # dispatched asynchronously
        if step + 1 < steps:
            x, t = _train_batch(batch, seed, step + 1, two_digit_frac, size, curriculum)  # overlaps the step
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


def _write_record(out: Path, r: dict) -> None:
    cfg: ViTConfig = r["config"]
    size = (out / "model.safetensors").stat().st_size
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import flax
    import sklearn

    text = f"""# {cfg.name}

A {r['n_params']:,}-parameter timm `VisionTransformer` trained {'from scratch' if r.get('init') is None else 'in two stages'} on digit scenes
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
| two-digit share of each batch (after the curriculum, 50/50 targets) | {r['two_digit_frac']} |
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
    from jaxvit import safe_write

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
    ap.add_argument("--eval-scenes", type=int, default=EVAL_SCENES)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--init", default=None,
                    help="continue from this checkpoint directory (fresh optimiser and schedule)")
    a = ap.parse_args(argv)
    train(a.out, steps=a.steps, seed=a.seed, batch=a.batch, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
          label_smoothing=a.label_smoothing, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads,
          two_digit_frac=a.two_digit_frac, curriculum=a.curriculum, eval_scenes=a.eval_scenes, log_every=a.log_every,
          init=a.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
