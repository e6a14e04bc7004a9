"""The variants `bench.gpu_probe` times: the ViT-B/16 headline (or bare forward) with one lever changed each.

Each variant is a name (`VARIANTS`); `build_variant(name, ...)` gives its jitted function, params and a context
that patches jaxvit for it while it is traced (earlier implementations kept for before/after timings, levers
not yet in the library) and puts jaxvit back after. Per-compile XLA options of a variant: `COMPILE_OPTIONS`.
bench/NOTES.md has what each one measured.
"""

from __future__ import annotations

from jaxvit.model import KERNEL_IMPLS, LayerNorm

_LAYER_NORM = LayerNorm.__call__  # jaxvit's own, for the LayerNorms the ln_fold variant leaves in place

MODEL_NAMES = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224",
               "vit_l16": "vit_large_patch16_224", "tiny": None}


# XLA options of single compiles (jax's compile(compiler_options=...)), so they time in the default's process:
# cuBLASLt GEMMs, whose epilogue can take fc1's tanh GELU (the legacy cuBLAS call cannot), without and with it;
# at batch 1, command buffers (CUDA graphs) around every region of 1+ ops (default 5), regions' independent ops
# run concurrently, and no command buffers at all (what graphs give there). bench/NOTES.md has the flags' docs.
_CUBLASLT = {"xla_gpu_enable_cublaslt": True}


_ALL_TRITON = {"xla_gpu_experimental_all_fusions_with_triton": True}


COMPILE_OPTIONS = {"headline_cublaslt": _CUBLASLT, "headline_gelu_tanh_cublaslt": _CUBLASLT,
                   "headline_stack": _CUBLASLT, "headline_materialized_all_triton": _ALL_TRITON,
                   "headline_graph_min1": {"xla_gpu_graph_min_graph_size": 1},
                   "headline_graph_concurrent": {"xla_gpu_graph_min_graph_size": 1,
                                                 "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
                   "headline_no_graphs": {"xla_gpu_enable_command_buffer": ""}}


# the headline with fp8 block GEMMs (ViT(gemm=...)), loaded as the benchmark loads fp8 rows: e4m3 weights stored
# once, input scales calibrated on other images (bench.models.load_jax); "gemms" counts the cuBLASLt fp8 calls.
# fp8 GEMMs are cuBLASLt calls with or without the flag, so tanh GELU may go into fp8 fc1's epilogue without it
FP8_VARIANTS = {"headline_fp8": "fp8", "headline_fp8_mlp": "fp8_mlp", "headline_fp8_gelu_tanh": "fp8"}


# The levers that each won or may win alone, together, so the targets read off one variant each (the gains of
# levers on different kernels should add; a probe says whether they do): tanh GELU in fc1's cuBLASLt epilogue
# with the Pallas LayerNorm and prediction-map normaliser (the H200's tuned tiles, 2026-12-04), in bf16 and with
# fp8 GEMMs; at batch 1 (compile option above) materialised attention under the all-Triton fusion flag.
STACK_VARIANTS = {"headline_stack": dict(gelu="tanh", kernels="pallas_layernorm_head", gemm="dtype"),
                  "headline_fp8_stack": dict(gelu="tanh", kernels="pallas_layernorm_head", gemm="fp8"),
                  "headline_materialized_all_triton": dict(attention="materialized"),
                  "headline_mosaic_stack": dict(kernels="pallas")}  # + the Mosaic fc1 below
STACK_TILES = "layer_norm=8,8;head=128,256,64,8,3"


# fc1 + bias + exact GELU as one Mosaic GPU (Hopper wgmma) kernel (bench/mosaic_mlp.py), by tile, in place of the
# Triton dense_act that ViT(kernels="pallas_mlp") runs: the exact-GELU default's GELU pass gone into fc1 at (if the
# kernel reaches it) cuBLAS's rate; and the exact-GELU stack, that with the Pallas LayerNorm and normaliser (on the
# warp-specialised tile, the design jax's own Hopper matmul reaches cuBLAS's rate with).
MOSAIC_VARIANTS = {"headline_mosaic_mlp_ws": "ws2x128x128", "headline_mosaic_mlp": "128x128",
                   "headline_mosaic_mlp_s2": "128x128s2", "headline_mosaic_mlp_64x256": "64x256",
                   "headline_mosaic_stack": "ws2x128x128"}


# the headline with each ViT(kernels=...) other than XLA's: headline_pallas, headline_pallas_mlp, ...
PALLAS_VARIANTS = tuple(f"headline_{k}" for k in KERNEL_IMPLS if k != "xla")


VARIANTS = ("headline", "forward", "headline_fused_qkv", "headline_old_gelu", "headline_conv_patch", "headline_cls_einsum",
            "headline_f32_patch",
            "headline_ln_twopass", "headline_fp32w", "headline_one_gemm_normaliser", "headline_materialized",
            "headline_own_attn", "forward_fp32w", "forward_scan", "headline_gelu_tanh", "headline_ln_fold") \
    + tuple(COMPILE_OPTIONS) \
    + tuple(FP8_VARIANTS) + PALLAS_VARIANTS + tuple(STACK_VARIANTS) \
    + tuple(v for v in MOSAIC_VARIANTS if v not in STACK_VARIANTS)


DEFAULT_VARIANTS = ("headline", "forward", "headline_fused_qkv", "headline_old_gelu", "headline_conv_patch",
                    "headline_cls_einsum", "headline_ln_twopass", "headline_one_gemm_normaliser")


def config_for(key: str):
    from jaxvit import ViTConfig, get_config

    if key == "tiny":
        return ViTConfig(name="tiny", img_size=(32, 32), patch_size=8, embed_dim=64, depth=2, num_heads=2,
                         mlp_dim=128, num_classes=10)
    return get_config(MODEL_NAMES[key])


def random_params(model, size, seed=0):
    """Unit-fan-in normal weights (the init's zero head would make every class tie)."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, leaf in zip(keys, leaves):
        scale = leaf.shape[0] ** -0.5 if len(leaf.shape) >= 2 else 0.1
        if len(leaf.shape) == 4:  # conv kernel (kh, kw, cin, cout): fan-in kh*kw*cin
            scale = (leaf.shape[0] * leaf.shape[1] * leaf.shape[2]) ** -0.5
        out.append(jax.random.normal(k, leaf.shape, jnp.float32) * scale)
    return jax.tree_util.tree_unflatten(treedef, out)


def _einsum_cls_logits(q0, k):
    """The earlier class-token row: a dot with batch dims (b, h) over k in (B, T, H, dh)."""
    import jax.numpy as jnp

    return jnp.einsum("bhd,bkhd->bhk", q0, k, preferred_element_type=jnp.float32)


def _activation_jax_gelu(name):
    """The earlier GELU: jax.nn.gelu(approximate=False), erfc in the input dtype."""
    import jax

    import jaxvit.model as jm

    return (lambda x: jax.nn.gelu(x, approximate=False)) if name == "gelu" else jm.activation(name)


def _f32_patch_embed(self, images):
    """The earlier patch embedding: the patchify GEMM in float32 whatever the compute dtype."""
    import jax.numpy as jnp

    from jaxvit.model import patchify

    p, c = self.patch_size, images.shape[-1]
    kernel = self.get_variable("params", "kernel")
    x = patchify(images.astype(jnp.float32), p) @ kernel.reshape(p * p * c, self.features)
    return x + self.get_variable("params", "bias") if self.use_bias else x


def _conv_patch_embed(self, images):
    """The earlier patch embedding: a stride-p float32 conv (flax nn.Conv semantics), same params."""
    import jax
    import jax.numpy as jnp

    p = self.patch_size
    kernel = self.get_variable("params", "kernel")
    x = jax.lax.conv_general_dilated(images.astype(jnp.float32), kernel, (p, p), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = x.reshape(x.shape[0], -1, self.features)
    if self.use_bias:
        x = x + self.get_variable("params", "bias")
    return x


def _cudnn_fused_attention(q, k, v, scale, dtype):
    """cuDNN attention whatever `_cudnn_attention` says (for the fused-qkv variant)."""
    import jax

    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def _layer_norm_two_pass(self, x):
    """The earlier half-precision LayerNorm: var = mean((x - mean)^2), as in float32."""
    import jax
    import jax.numpy as jnp

    scale, bias = self.get_variable("params", "scale"), self.get_variable("params", "bias")
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


def ln_fold_params(params, depth: int, dtype):
    """params with each block's norm2 folded into fc1 (bench/ln_fold_numerics.py has the algebra): beside fc1's
    kernel, `kernel_folded` = diag(gamma) W in the compute dtype, `colsum` its column sums and `shift` = beta W + b
    (float32), computed once as a converted checkpoint would store them."""
    import jax.numpy as jnp

    out = dict(params)
    for i in range(depth):
        blk = dict(params[f"blocks_{i}"])
        fc1 = dict(blk["mlp"]["fc1"])
        gamma, beta = blk["norm2"]["scale"], blk["norm2"]["bias"]
        w = fc1["kernel"].astype(jnp.float32)
        folded = (gamma[:, None] * w).astype(dtype)
        fc1.update(kernel_folded=folded, colsum=folded.astype(jnp.float32).sum(0),
                   shift=beta @ w + fc1["bias"].astype(jnp.float32))
        blk["mlp"] = {**blk["mlp"], "fc1": fc1}
        out[f"blocks_{i}"] = blk
    return out


def _norm2_deferred(self, x):
    """LayerNorm with norm2 left to fc1 (`_ln_folded_mlp`): the residual stream passes through unnormalised."""
    return x if self.name == "norm2" else _LAYER_NORM(self, x)


def _ln_folded_mlp(self, x):
    """The MLP on the raw residual stream x (B, T, D), norm2 folded into fc1 (`ln_fold_params`):
    rstd * (x W' - mu colsum(W')) + shift, then GELU, in one elementwise pass over fc1's bf16 output; fc2 as Dense."""
    import jax
    import jax.numpy as jnp

    import jaxvit.model as jm

    fc1, fc2 = self.variables["params"]["fc1"], self.variables["params"]["fc2"]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)  # one-pass statistics, as the model's half-precision LayerNorm
    rstd = jax.lax.rsqrt(jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
                         + self.config.norm_eps)
    xw = jnp.dot(x.astype(self.dtype), fc1["kernel_folded"])
    h = jm.activation(self.config.act)(rstd * (xw.astype(jnp.float32) - mean * fc1["colsum"]) + fc1["shift"])
    h = h.astype(self.dtype)
    return jnp.dot(h, fc2["kernel"].astype(self.dtype)) + fc2["bias"].astype(self.dtype)


def variant_kernels(name: str) -> str:
    """The `ViT.kernels` a probe variant runs with: headline_pallas_mlp -> 'pallas_mlp', a stack's own, others
    'xla'."""
    if name in STACK_VARIANTS:
        return STACK_VARIANTS[name].get("kernels", "xla")
    if name in MOSAIC_VARIANTS:
        return "pallas_mlp"
    return name[len("headline_"):] if name in PALLAS_VARIANTS else "xla"


def variant_options(name: str, tiles: str = "") -> dict:
    """The `jaxvit.ViT` options (attention, kernels, kernel_tiles, gelu, gemm) a probe variant runs with;
    `tiles` for the headline_pallas* variants, a stack's own tiles for the stacks."""
    from jaxvit.kernels import Tiles

    stack = STACK_VARIANTS.get(name, {})
    return dict(attention=stack.get("attention", "materialized" if name == "headline_materialized" else "fused"),
                kernels=variant_kernels(name), kernel_tiles=Tiles.parse(STACK_TILES if "kernels" in stack else tiles),
                gelu=stack.get("gelu", "tanh" if "_gelu_tanh" in name else "erf"),
                gemm=stack.get("gemm", FP8_VARIANTS.get(name, "dtype")))


def _mosaic_dense_act(tile_name: str):
    """jaxvit.kernels.dense_act with the exact GELU as bench.mosaic_mlp's kernel where its tile fits, else the
    Triton kernel it replaces."""
    import jaxvit.kernels as K
    from bench import mosaic_mlp

    triton, tile = K.dense_act, mosaic_mlp.TILES[tile_name]

    def dense_act(x, w, b, act="identity", config=None, interpret=False):
        if act == "gelu" and not interpret and mosaic_mlp.supported(*w.shape, x.dtype, tile):
            return mosaic_mlp.dense_gelu(x, w, b, tile)
        return triton(x, w, b, act, config, interpret)

    return dense_act


def build_variant(name, cfg, dtype, params32, tiles: str = ""):
    """(jitted fn, params, context manager) for one variant; `tiles` (jaxvit.kernels.Tiles text) for the
    headline_pallas* variants."""
    import contextlib

    import jax

    import jaxvit
    import jaxvit.model as jm
    import predmaps.core as core
    from bench.models import HEADLINE, jax_function

    model = jaxvit.ViT(cfg, dtype=dtype, **variant_options(name, tiles))
    cast = not name.endswith("_fp32w") and dtype != jax.numpy.float32
    params = jaxvit.cast_params(params32, dtype) if cast else params32
    if model.gemm != "dtype":
        params = fp8_params(model, params)
    if name == "headline_ln_fold":
        params = ln_fold_params(params, cfg.depth, dtype)
    if name == "forward_scan":
        fn, params = jax.jit(scanned_forward(model)), scan_params(params, cfg.depth)
    else:
        fn = jax.jit(jax_function(model, "forward" if name.startswith("forward") else HEADLINE))

    @contextlib.contextmanager
    def ctx():
        saved = (jm._fused_attention, core._NORMALISER_CHUNK, jm._cls_logits, jm.activation,
                 jm.PatchEmbed.__call__, jm.LayerNorm.__call__, jm._cudnn_attention, jm.Mlp.__call__,
                 jm.pallas_kernels.dense_act)
        if name in MOSAIC_VARIANTS:
            jm.pallas_kernels.dense_act = _mosaic_dense_act(MOSAIC_VARIANTS[name])
        if name == "headline_own_attn":
            jm._fused_attention = jm._heads_first_attention
        if name == "headline_one_gemm_normaliser":
            core._NORMALISER_CHUNK = 1 << 20
        if name == "headline_cls_einsum":
            jm._cls_logits = _einsum_cls_logits
        if name == "headline_old_gelu":
            jm.activation = _activation_jax_gelu
        if name == "headline_conv_patch":
            jm.PatchEmbed.__call__ = _conv_patch_embed
        if name == "headline_f32_patch":
            jm.PatchEmbed.__call__ = _f32_patch_embed
        if name == "headline_fused_qkv":  # one qkv GEMM split afterwards; cuDNN attention all the same
            jm._cudnn_attention = lambda dt: False
            jm._fused_attention = _cudnn_fused_attention
        if name == "headline_ln_twopass":
            jm.LayerNorm.__call__ = _layer_norm_two_pass
        if name == "headline_ln_fold":
            jm.LayerNorm.__call__, jm.Mlp.__call__ = _norm2_deferred, _ln_folded_mlp
        try:
            yield
        finally:
            (jm._fused_attention, core._NORMALISER_CHUNK, jm._cls_logits, jm.activation,
             jm.PatchEmbed.__call__, jm.LayerNorm.__call__, jm._cudnn_attention, jm.Mlp.__call__,
             jm.pallas_kernels.dense_act) = saved

    return fn, params, ctx


def fp8_params(model, params):
    """`params` (compute-dtype block weights) with e4m3 weights and calibrated input scales: the benchmark's fp8
    rows' (`bench.models.fp8_params`)."""
    import jax.numpy as jnp

    from bench import models
    from jaxvit import fp8

    if not fp8.active(model.gemm, model.dtype):
        raise ValueError(f"the fp8 variants need --dtype bf16 (fp8 GEMMs act in half precision only); "
                         f"got {jnp.dtype(model.dtype).name}")
    return models.fp8_params(model, params)


def scan_params(params, depth):
    """{'blocks': every block's parameters stacked on a leading axis, 'rest': the others}."""
    import jax
    import jax.numpy as jnp

    blocks = [params[f"blocks_{i}"] for i in range(depth)]
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    return {"blocks": jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *blocks), "rest": rest}


def scanned_forward(model):
    """The bare forward (logits) with the blocks under `lax.scan` over stacked parameters (the
    `nn.scan` question: one compiled block instead of L), on `scan_params`' layout. Same ops per
    block as the unrolled `ViT.__call__`."""
    import jax

    import jaxvit.model as jm

    block = jm.Block(model.config, model.dtype, model.attention, model.kernels, model.kernel_tiles)

    def forward(p, images):
        x = model.apply({"params": p["rest"]}, images, method=model.embed)

        def body(x, block_params):
            y, _, _ = block.apply({"params": block_params}, x, want_cls=False, want_full=False)
            return y, None

        x, _ = jax.lax.scan(body, x, p["blocks"])
        return {"logits": model.apply({"params": p["rest"]}, x, method=model.head_logits)[1]}

    return forward


def jaxvit_model(cfg):
    import jax.numpy as jnp

    import jaxvit

    return jaxvit.ViT(cfg, dtype=jnp.float32)
