"""fc1 + bias + exact GELU as one Mosaic GPU (Hopper wgmma) kernel: the probe's `headline_mosaic_mlp` (issue 29).

The exact (erf) GELU that timm's ViTs compute is its own pass over fc1's (B T, 4D) output under XLA, since
cuBLASLt's GELU epilogue is the tanh form; jaxvit's Triton `dense_act` takes the GELU into the GEMM at a lower
GEMM rate than cuBLAS's (bench/NOTES.md has both costs). This kernel is the same
function on Hopper's own GEMM path: TMA loads of x and w tiles into swizzled shared memory, pipelined over K,
`wgmma` into a float32 register accumulator, and an epilogue that adds the bias, applies GELU in float32 and
rounds once to bf16 (`jaxvit.kernels.dense_act_reference`'s function), staged through shared memory and stored
by TMA. Not a model option: the probe patches it into `ViT(kernels="pallas_mlp")`'s fc1 while it traces, until
a GPU says whether it pays (bench/NOTES.md).

Checked here (CPU): `interpret=True` runs the kernel in jax's Mosaic GPU interpreter (jax 0.10 and 0.11) against
the reference; lowered for CUDA it is one Mosaic GPU custom call (jax 0.10 and 0.11). On other platforms
`dense_gelu` computes the reference, as jaxvit's kernels do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

SWIZZLE = 128  # bytes: the widest wgmma shared-memory swizzle; a K step is one swizzle row of bf16 (64)


@dataclasses.dataclass(frozen=True)
class Tile:
    """Output tile (block_m x block_n) per compute warpgroup, `stages` K steps of loads in flight, `wgs` compute
    warpgroups per program: 1, which also issues the loads (`emit_pipeline`), or 2 beside a third that only loads
    (warp specialisation, `emit_pipeline_warp_specialized`), each computing its own block_n columns."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 4
    wgs: int = 1

    @property
    def block_k(self) -> int:
        return SWIZZLE // 2  # bf16 elements per swizzle row

    @property
    def program_n(self) -> int:
        return self.block_n * self.wgs


# One warpgroup holds its (block_m, block_n) float32 accumulator: 128 registers per thread at 128x128 or 64x256
# (128x256 would spill). Shared memory per program: 4 stages of 128x128 take 160 KiB (one program per SM), 2 stages
# 96 KiB (two per SM, so one program's epilogue overlaps the other's loads); warp-specialised 2 x 128x128 with 3
# stages 208 KiB.
TILES = {"128x128": Tile(), "128x128s2": Tile(stages=2), "64x256": Tile(64, 256, 4),
         "ws2x128x128": Tile(stages=3, wgs=2)}


def supported(k: int, n: int, dtype, tile: Tile = Tile()) -> bool:
    """Whether the kernel tiles a (K, N) bf16 weight: K a multiple of the K step, N of block_n."""
    return jnp.dtype(dtype) == jnp.bfloat16 and k % tile.block_k == 0 and n % tile.program_n == 0


def reference(x, w, b):
    """What the kernel computes: GELU_erf(x @ w + b) in float32 from bf16 inputs, rounded once."""
    from jaxvit.kernels import dense_act_reference

    return dense_act_reference(x, w, b, "gelu")


def _gelu(y):
    return 0.5 * y * (1.0 + jax.lax.erf(y * (2 ** -0.5)))


def _bias_row(b_smem, interpreted: bool):
    """The bias tile in registers, in the accumulator's column layout so it broadcasts over rows there. The
    interpreter has no layouts (and jax 0.10's no rule for layout_cast): there a plain load, the same values."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if interpreted:
        return b_smem[...]
    return plgpu.layout_cast(b_smem[...], plgpu.Layout.WGMMA.reduce(0))


def _swizzled():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE)


def _epilogue(acc, o_gmem, o_smem, b_smem, bias_ready, rows, cols, interpreted):
    """o[rows, cols] = GELU(acc + b[cols]) from the float32 accumulator's value `acc`, one bf16 rounding, through
    shared memory and TMA. The kernels issue the bias tile's copy (`bias_ready`) before their GEMM, so it lands
    during it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.barrier_wait(bias_ready)
    bias = _bias_row(b_smem, interpreted).astype(jnp.float32)
    o_smem[...] = _gelu(acc + jax.lax.broadcast_in_dim(bias, acc.shape, (1,))).astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, cols])
    plgpu.wait_smem_to_gmem(0)


def _kernel(x_gmem, w_gmem, b_gmem, o_gmem, o_smem, b_smem, bias_ready, *, tile: Tile, k_steps: int, interpreted):
    """One warpgroup per program: it issues the TMA loads (`emit_pipeline`) and the wgmmas."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
    # n is the grid's minor axis: programs running at once share x's row block (from L2), and w (4.5 MiB at
    # ViT-B) stays in L2
    j, i = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    cols = pl.ds(j * bn, bn)
    plgpu.copy_gmem_to_smem(b_gmem.at[cols], b_smem.at[0], bias_ready.at[0])

    def gemm(acc):  # the register accumulator in its own scope (the interpreter wants it apart from SMEM's)
        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc, x_smem, w_smem)
            plgpu.wgmma_wait(1)  # one wgmma in flight; the specs' delay_release keeps its operands loaded

        plgpu.emit_pipeline(
            step, grid=(k_steps,), max_concurrent_steps=tile.stages,
            in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (i, k), transforms=_swizzled(), delay_release=1),
                      plgpu.BlockSpec((bk, bn), lambda k: (k, j), transforms=_swizzled(), delay_release=1)],
        )(x_gmem, w_gmem)
        plgpu.wgmma_wait(0)
        return acc[...]

    acc = pl.run_scoped(gemm, plgpu.ACC((bm, bn), jnp.float32))
    _epilogue(acc, o_gmem, o_smem.at[0], b_smem.at[0], bias_ready.at[0], pl.ds(i * bm, bm), cols, interpreted)


def _kernel_ws(x_gmem, w_gmem, b_gmem, o_gmem, o_smem, b_smem, bias_ready, *, tile: Tile, k_steps: int,
               interpreted):
    """Warp-specialised: a memory warpgroup issues the TMA loads of x's (block_m, K step) and w's (K step,
    wgs x block_n) tiles; `tile.wgs` compute warpgroups each run the wgmmas of their block_n columns and the
    epilogue (the pipeline's compute context), so loads never wait behind an epilogue."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
    j, i = jax.lax.axis_index("n"), jax.lax.axis_index("m")

    def compute(run_pipeline):  # on the compute warpgroups only
        wg = jax.lax.axis_index("wg")
        cols = pl.ds(j * tile.program_n + wg * bn, bn)
        plgpu.copy_gmem_to_smem(b_gmem.at[cols], b_smem.at[wg], bias_ready.at[wg])
        acc = pl.run_scoped(lambda acc: run_pipeline(acc)[...], plgpu.ACC((bm, bn), jnp.float32))
        _epilogue(acc, o_gmem, o_smem.at[wg], b_smem.at[wg], bias_ready.at[wg], pl.ds(i * bm, bm), cols,
                  interpreted)

    def step(_, x_smem, w_smem, acc):
        plgpu.wgmma(acc, x_smem, w_smem.at[:, pl.ds(jax.lax.axis_index("wg") * bn, bn)])
        plgpu.wgmma_wait(0)  # the memory warpgroup refills this slot once every compute warpgroup is done with it
        return acc

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(k_steps,), max_concurrent_steps=tile.stages, memory_registers=40, wg_axis="wg",
        num_compute_wgs=tile.wgs, compute_context=compute,
        in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (i, k), transforms=_swizzled()),
                  plgpu.BlockSpec((bk, tile.program_n), lambda k: (k, j), transforms=_swizzled())],
    )(x_gmem, w_gmem)


def interpret_params(**kw):
    """Parameters of jax's Mosaic GPU interpreter (public from jax 0.11; jax 0.10 has it under jax._src)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if hasattr(plgpu, "InterpretGPUParams"):
        return plgpu.InterpretGPUParams(**kw)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(**kw)


def _call(x, w, b, *, tile: Tile, interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    rows, k = x.shape
    n = w.shape[1]
    padded = -(-rows // tile.block_m) * tile.block_m  # TMA tiles whole blocks; zero rows, sliced off below
    xp = jnp.pad(x, ((0, padded - rows), (0, 0))) if padded != rows else x
    kwargs = {"interpret": interpret_params() if interpret is True else interpret} if interpret else {}
    if tile.wgs > 1:  # the compute warpgroups and one more for the loads
        kwargs.update(num_threads=tile.wgs + 1, thread_name="wg")
    call = plgpu.kernel(
        functools.partial(_kernel_ws if tile.wgs > 1 else _kernel, tile=tile, k_steps=k // tile.block_k,
                          interpreted=bool(interpret)),
        out_type=jax.ShapeDtypeStruct((padded, n), x.dtype),
        scratch_types=[plgpu.SMEM((tile.wgs, tile.block_m, tile.block_n), x.dtype, transforms=_swizzled()),
                       plgpu.SMEM((tile.wgs, tile.block_n), b.dtype),
                       plgpu.Barrier(num_barriers=tile.wgs)],
        grid=(n // tile.program_n, padded // tile.block_m),  # the first axis is launched fastest (CUDA's x)
        grid_names=("n", "m"),
        # per-lane semantics: Mosaic's warpgroup layout inference has no rule for erf
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **kwargs,
    )
    out = call(xp, w, b)
    return out[:rows] if padded != rows else out


def dense_gelu(x, w, b, tile: Tile = Tile(), interpret=False):
    """GELU_erf(x @ w + b): x (..., K) bf16, w (K, N), b (N,) -> (..., N) bf16, as one Mosaic GPU kernel where
    lowered for CUDA, `reference` elsewhere; `interpret` (True or `interpret_params(...)`): the kernel in jax's
    Mosaic GPU interpreter, anywhere."""
    if x.shape[-1:] != w.shape[:1] or b.shape != w.shape[1:]:
        raise ValueError(f"dense_gelu: x {x.shape}, w {w.shape} and b {b.shape} do not chain as (..., K) @ (K, N) + (N,)")
    k, n = w.shape
    if not supported(k, n, x.dtype, tile):
        raise ValueError(f"dense_gelu: weight {w.shape} with {jnp.dtype(x.dtype).name} inputs does not fit the tile "
                         f"{tile}; x must be bfloat16, K a multiple of {tile.block_k} and N of {tile.block_n}")
    lead = x.shape[:-1]
    x2, w, b = x.reshape(-1, k), w.astype(x.dtype), b.astype(x.dtype)

    def kernel(x2, w, b):
        return _call(x2, w, b, tile=tile, interpret=interpret)

    if interpret:
        out = kernel(x2, w, b)
    else:
        out = jax.lax.platform_dependent(x2, w, b, cuda=kernel, default=reference)
    return out.reshape(*lead, n)
