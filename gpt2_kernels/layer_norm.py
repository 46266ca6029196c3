"""Fused LayerNorm, plain and with the residual add, forward and backward, in Triton.

Contract
--------
``layer_norm(x, weight, bias, eps) -> y``
``add_layer_norm(x, residual, weight, bias, eps) -> (y, z)`` with ``z = x + residual``, ``y = LN(z)``

    mean = (1/N) sum_j z_j,   var = (1/N) sum_j (z_j - mean)^2,   rstd = 1 / sqrt(var + eps)
    xhat = (z - mean) * rstd,  y = xhat * weight + bias

over the last dimension (size N) of any leading shape. The fused variant reads x and the residual
stream once, writes the new residual stream z and its normalisation y in the same pass, so a
pre-LN block updates and normalises its residual stream in one kernel.

The statistics are computed on shifted data, with each row's first element as the pivot p = z_0:

    s = (1/N) sum_j (z_j - p),   mean = p + s,   var = (1/N) sum_j ((z_j - p) - s)^2,
    xhat = ((z - p) - s) * rstd

p cancels in z - mean, but keeps the sums small. Unshifted, a row near a large common offset (1000
+ small noise) loses its spread in the fp32 sum of z: the mean is off by ulps of the offset, which
rstd magnifies (y off by ~1e-2 at a spread of 1e-2), and a constant row gets a var of rounding
errors instead of 0 (y off by ~1 at eps=1e-12). Shifted, z - p is exact for such rows, so a
constant row gets var = 0 and y = bias exactly.

* dtypes: x and residual float16, bfloat16 or float32 (they may differ; z then takes the promoted
  dtype, as ``x + residual`` would); weight/bias any of those. y has z's dtype (x's for
  ``layer_norm``). z is rounded to its dtype before it is normalised, exactly as
  ``F.layer_norm(x + residual)`` does, so y is the normalisation of the z that is returned.
  Statistics (mean, rstd, saved for backward) and all arithmetic are float32.
* weight/bias of any stride (a view such as ``w[::2]``): the launchers copy one whose stride isn't
  1 (they are 1-D, of size N); dweight/dbias come back shaped like them.
* N up to 65536 bytes per row (16384 in float32, 32768 in half precision): the row lives in
  registers, so each element is read and written once. Larger rows raise a ValueError.
* bias=None is supported (no bias term, no dbias).
* CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, for tests).

Operators (registered when this module is imported; see gpt2_kernels/utils.py for why ``custom_op``)
-------------------------------------------------------------------------------------------
The public functions validate their inputs (the ValueErrors of the launcher; CPU tensors only
under the interpreter) and run the PyTorch custom operators (in plain eager mode their
implementations and autograd formulas directly: gpt2_kernels/utils.py, call_op)

    gpt2_suite::layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps)
        -> (Tensor y, Tensor mean, Tensor rstd)
    gpt2_suite::add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps)
        -> (Tensor y, Tensor z, Tensor mean, Tensor rstd)

whose autograd formulas call

    gpt2_suite::layer_norm_backward(Tensor dy, Tensor z, Tensor weight, Tensor? bias, Tensor mean,
        Tensor rstd, Tensor? dz_out) -> (Tensor dz, Tensor dweight, Tensor dbias)

(returns unnamed in the schemas; dbias is empty, shape (0,), without a bias, since a schema has no
optional outputs; mean and rstd are non-differentiable and not returned by the public functions).
On CUDA the ops run the launchers below; on CPU they run them too under the interpreter, and
otherwise the same math in plain PyTorch (fp32 inside), so an exported or compiled graph holding
the ops has a meaning off-GPU. Their fake implementations allocate exactly as the launchers do
(y, z, dz contiguous; mean, rstd (M,) fp32; dweight, dbias (N,) contiguous). torch.compile and
torch.export keep each op as one opaque node. No FLOP formula: FlopCounterMode counts no FLOPs for
F.layer_norm either, so a triton model and a torch one report the same totals.

Algorithm: each forward program normalises a tile of ROWS whole rows held in registers (Triton
tutorial 05; LayerNorm itself: Ba et al. 2016, arXiv:1607.06450). The shifted statistics: Chan,
Golub & LeVeque, "Algorithms for computing the sample variance", The American Statistician 37, 1983.

Backward derivation (same symbols as the code)
----------------------------------------------
With g = dy * weight (gradient reaching xhat) and xhat = (z - mean) * rstd:

    dz = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))      (row-wise; c2 = mean_j(g), c1 = mean_j(g xhat))
    dweight = sum_rows dy * xhat,   dbias = sum_rows dy

The backward recomputes xhat from z and the saved fp32 mean, which is p + s rounded to fp32: the
true mean to half an ulp of |mean|, and that half ulp times rstd is again the error the pivot
removed (3e-3 in xhat for 1000 + N(0, 1e-2) rows). So it shifts once more, with the saved mean as
the pivot: zc = z - mean (exact near the mean), xhat = (zc - mean_j(zc)) * rstd, mean_j(zc) being
the saved mean's rounding error (0 for a constant row, whose saved mean is exact).

For ``add_layer_norm``, z is also an output, so its incoming gradient dz_out adds to dz, and both
inputs receive it: dx = dresidual = dz + dz_out (cast to each input's dtype).
dweight/dbias are reduced deterministically: each backward program owns a contiguous range of
rows, accumulates fp32 partial sums in registers and writes one row of a (programs, N) fp32
buffer; a second small kernel sums that buffer's rows in a fixed order (fp32) and stores the
result in the weight's (bias's) dtype, in one launch for both. No atomics, no locks.

Tuning: ROWS and num_warps are autotuned per row size from LN_CONFIGS (H100/A100), or from
LN_SHORT_CONFIGS when GPT2_SUITE_AUTOTUNE=short is set before this module is imported; one pinned
config under the interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import utils

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_BYTES = 65536  # one row of x must fit in a program's registers


# ROWS rows per program (forward) or per step (backward) x num_warps. Several rows per program
# pay off for GPT-2-sized rows (768..1600); one row, many warps, for rows of several thousand.
LN_CONFIGS = [
    triton.Config({"ROWS": rows}, num_warps=w)
    for rows, w in [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]
]
# The short list (GPT2_SUITE_AUTOTUNE=short, gpt2_kernels/utils.py): 4 of LN_CONFIGS that compile
# without spills at 768 to 8192 (results/compiler/resources.md) and leave every row size a config
# after pruning: several rows on 4 or 8 warps for GPT-2 widths, one row on 4 or 16 for long rows.
LN_SHORT_CONFIGS = [triton.Config({"ROWS": rows}, num_warps=w) for rows, w in [(1, 4), (4, 4), (4, 8), (1, 16)]]
LN_TUNED = utils.autotune_choice(LN_CONFIGS, LN_SHORT_CONFIGS)  # fixed when this module is imported
# Under the interpreter every program costs milliseconds of Python, whatever its size: many rows.
LN_INTERPRET_CONFIG = triton.Config({"ROWS": 16}, num_warps=4)
# The dweight/dbias reduction: a fixed tile, (partial rows per step, columns per program).
DWDB_ROWS, DWDB_COLS = 32, 64


def _prune_tiles(max_per_thread: int):
    """early_config_prune: tiles of at most 16384 elements (or one row, if longer) with at most
    max_per_thread elements per thread, and at least 2 unless the program is a single warp.
    The backward keeps five row tiles live (z, dy, x-hat, g, dz) against the forward's two, so it
    gets half the forward's 64: at 64, ptxas spills it on sm_90 (`python -m benchmarks.resources`).
    Rows too long for any config (beyond 16384 elements in the backward) get one row on 16 warps."""

    def prune(configs, named_args, **kwargs):
        block_n = {**named_args, **kwargs}["BLOCK_N"]
        kept = []
        for config in configs:
            elements = config.kwargs["ROWS"] * block_n
            per_thread = elements / (32 * config.num_warps)
            if (elements <= max(16384, block_n) and per_thread <= max_per_thread
                    and (per_thread >= 2 or config.num_warps == 1)):
                kept.append(config)
        return kept or [triton.Config({"ROWS": 1}, num_warps=16)]

    return prune


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _residual_stream(X, RESIDUAL, RESIDUAL_OUT, x_offsets, res_offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """z in fp32 at the given offsets: x, or x + residual rounded to the residual stream's dtype
    (RESIDUAL_OUT's) first, so that the kernel normalises exactly the z it returns."""
    z = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        z += tl.load(RESIDUAL + res_offsets, mask=mask, other=0.0).to(tl.float32)
        z = z.to(RESIDUAL_OUT.dtype.element_ty).to(tl.float32)
    return z


@triton.autotune(
    configs=utils.autotune_configs(LN_TUNED, LN_INTERPRET_CONFIG),
    key=["N", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": _prune_tiles(64)},
)
@triton.jit
def _layer_norm_fwd_kernel(
    X, RESIDUAL, W, B, Y, RESIDUAL_OUT, MEAN, RSTD,
    stride_x_row, stride_res_row, stride_y_row, stride_res_out_row,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid * ROWS, pid * ROWS + ROWS): normalise, save mean and rstd."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # row offsets in int64: M * stride may exceed 2^31
    x_rows = rows64 * stride_x_row
    res_rows = rows64 * stride_res_row
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = row_mask[:, None] & (cols < N)
    z = _residual_stream(X, RESIDUAL, RESIDUAL_OUT, x_rows[:, None] + cols, res_rows[:, None] + cols, mask,
                         HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(RESIDUAL_OUT + rows64[:, None] * stride_res_out_row + cols,
                 z.to(RESIDUAL_OUT.dtype.element_ty), mask=mask)
    # The pivot p = z_0, read again (a cached load) rather than picked out of the tile by a reduction.
    pivot = _residual_stream(X, RESIDUAL, RESIDUAL_OUT, x_rows, res_rows, row_mask, HAS_RESIDUAL)
    z_shifted = tl.where(mask, z - pivot[:, None], 0.0)  # z - p
    s = tl.sum(z_shifted, axis=1) / N  # mean - p
    zc = tl.where(mask, z_shifted - s[:, None], 0.0)  # z - mean
    var = tl.sum(zc * zc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, pivot + s, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = zc * rstd[:, None] * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=utils.autotune_configs(LN_TUNED, LN_INTERPRET_CONFIG),
    key=["N", "HAS_DRESIDUAL"],
    prune_configs_by={"early_config_prune": _prune_tiles(32)},
)
@triton.jit
def _layer_norm_bwd_kernel(
    Z, W, DY, DZ, DRESIDUAL_OUT, DW_PARTIAL, DB_PARTIAL, MEAN, RSTD,
    stride_z_row, stride_dy_row, stride_dz_row, stride_dres_row,
    M, N, rows_per_program,
    HAS_DRESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...) of dz, ROWS at a time, plus this program's fp32
    dweight/dbias partial sums (one row of DW_PARTIAL / DB_PARTIAL)."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)[None, :]
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for block_start in range(row_start, row_end, ROWS):
        rows = block_start + tl.arange(0, ROWS)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)[:, None]
        mask = row_mask[:, None] & (cols < N)
        z = tl.load(Z + rows64 * stride_z_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        # Shifted by the saved mean, then by its rounding error mean_j(zc) (see the header).
        zc = tl.where(mask, z - mean[:, None], 0.0)
        zc = tl.where(mask, zc - (tl.sum(zc, axis=1) / N)[:, None], 0.0)
        xhat = zc * rstd[:, None]
        g = dy * w
        c1 = tl.sum(xhat * g, axis=1) / N  # mean_j(g * xhat)
        c2 = tl.sum(g, axis=1) / N  # mean_j(g)
        dz = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRESIDUAL:
            dz += tl.load(DRESIDUAL_OUT + rows64 * stride_dres_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DZ + rows64 * stride_dz_row + cols, dz.to(DZ.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    partial = pid.to(tl.int64) * N + tl.arange(0, BLOCK_N)
    tl.store(DW_PARTIAL + partial, dw, mask=tl.arange(0, BLOCK_N) < N)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + partial, db, mask=tl.arange(0, BLOCK_N) < N)


@triton.jit
def _layer_norm_dwdb_kernel(
    DW_PARTIAL, DB_PARTIAL, DW, DB, programs, N,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """Columns [pid * COLS, ...) of dweight (and dbias): the sum over the (programs, N) fp32
    partials, ROWS at a time in a fixed order, in fp32, stored in DW's (DB's) dtype."""
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_mask = cols < N
    dw = tl.zeros([ROWS, COLS], tl.float32)
    db = tl.zeros([ROWS, COLS], tl.float32)
    for row_start in range(0, programs, ROWS):
        rows = row_start + tl.arange(0, ROWS)
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < programs)[:, None] & col_mask[None, :]
        dw += tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers: validate, allocate, launch
# ----------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (M, N) with unit column stride, a view when possible."""
    return utils.unit_last_stride(x.reshape(-1, x.shape[-1]))


def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """y's (and z's) dtype: x's, or the promotion of x's and the residual's, as x + residual has."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _fwd_outputs(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(y, z, mean, rstd), allocated: y (and z, None without residual) contiguous, shaped like x;
    mean, rstd fp32 of shape (M,), M = the rows of x. The launcher, the CPU implementation and the
    fake implementation all allocate here, so their outputs' strides agree by construction."""
    m = math.prod(x.shape[:-1])
    shape, dtype = (m, x.shape[-1]), _out_dtype(x, residual)
    y = utils.empty(shape, dtype, x.device).view(x.shape)
    z = utils.empty(shape, dtype, x.device).view(x.shape) if residual is not None else None
    return y, z, utils.empty((m,), torch.float32, x.device), utils.empty((m,), torch.float32, x.device)


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layer_norm supports float16, bfloat16 and float32, got {name}.dtype={x.dtype}")
    utils.check_device("layer_norm", name, x, "torch.nn.functional.layer_norm")


def _check_inputs(x, residual, weight, bias) -> None:
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            if name == "weight":
                raise ValueError("layer_norm: weight is required (use torch.ones(N) for none)")
            continue
        _check_tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"add_layer_norm: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"layer_norm: {name} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
    out_dtype = _out_dtype(x, residual)
    max_n = MAX_FUSED_BYTES // out_dtype.itemsize
    if n > max_n:
        raise ValueError(
            f"layer_norm supports a normalised size up to {max_n} for {out_dtype} "
            f"(one row must fit in registers), got {n}"
        )


def layer_norm_fwd(x, weight, bias, eps: float, residual=None):
    """Validate and launch the forward kernel. Returns (y, z, mean, rstd): y shaped like x, z the
    new residual stream x + residual (None without residual), mean/rstd fp32 of shape (M,)."""
    _check_inputs(x, residual, weight, bias)
    weight, bias = utils.unit_last_stride(weight), utils.unit_last_stride(bias)
    n = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    y, z, mean, rstd = _fwd_outputs(x, residual)
    y2 = y.view(m, n)
    residual2 = z2 = None
    if residual is not None:
        residual2 = _rows(residual)
        z2 = z.view(m, n)
    if m > 0 and n > 0:
        with utils.launch_device(x):
            _layer_norm_fwd_kernel[lambda meta: (triton.cdiv(m, meta["ROWS"]),)](
                x2, residual2 if residual2 is not None else x2, weight, bias if bias is not None else weight,
                y2, z2 if z2 is not None else y2, mean, rstd,
                x2.stride(0), residual2.stride(0) if residual2 is not None else 0,
                y2.stride(0), z2.stride(0) if z2 is not None else 0,
                m, n, eps,
                HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                BLOCK_N=triton.next_power_of_2(n),
            )
    return y, z, mean, rstd


def _num_programs(m: int, device: torch.device) -> int:
    """Backward programs: a few per SM on a GPU (each reduces a contiguous range of rows)."""
    if device.type == "cuda":
        return min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(m, 4)


def layer_norm_bwd(dy, z, weight, bias, mean, rstd, dz_out=None):
    """Launch the backward kernel and the final partial sums. z is the normalised input (x, or the
    new residual stream); dz_out the gradient reaching z directly (add_layer_norm's second output).
    Returns (dz, dweight, dbias): dz shaped like z and in its dtype, dweight/dbias shaped (N,) like
    weight/bias and in their dtypes; dbias None without bias (an empty tensor from the op, whose
    schema has no optional outputs)."""
    weight = utils.unit_last_stride(weight)
    n = z.shape[-1]
    z2 = _rows(z)
    dy2 = _rows(dy)
    m = z2.shape[0]
    dz = utils.empty((m, n), z.dtype, z.device)
    dres2 = _rows(dz_out) if dz_out is not None else None
    programs = max(_num_programs(m, z.device), 1)
    rows_per_program = triton.cdiv(m, programs) if m else 1
    programs = triton.cdiv(m, rows_per_program) if m else 1
    dw_partial = utils.empty((programs, n), torch.float32, z.device)
    db_partial = utils.empty((programs, n), torch.float32, z.device) if bias is not None else None
    if m == 0 or n == 0:
        dw_partial.zero_()
        if db_partial is not None:
            db_partial.zero_()
    else:
        with utils.launch_device(z):
            _layer_norm_bwd_kernel[(programs,)](
                z2, weight, dy2, dz, dres2 if dres2 is not None else dz,
                dw_partial, db_partial if db_partial is not None else dw_partial, mean, rstd,
                z2.stride(0), dy2.stride(0), dz.stride(0), dres2.stride(0) if dres2 is not None else 0,
                m, n, rows_per_program,
                HAS_DRESIDUAL=dres2 is not None, HAS_BIAS=bias is not None,
                BLOCK_N=triton.next_power_of_2(n),
            )
    dweight, dbias = _sum_partials(dw_partial, db_partial, weight.dtype, bias.dtype if bias is not None else None)
    return dz.view(z.shape), dweight, dbias


def _sum_partials(dw_partial, db_partial, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None):
    """(dweight, dbias): the column sums of the (programs, N) fp32 partials (db_partial None without
    a bias), in a fixed order, in fp32, returned in weight's and bias's dtypes; one launch for both."""
    programs, n = dw_partial.shape
    dweight = utils.empty((n,), weight_dtype, dw_partial.device)
    dbias = utils.empty((n,), bias_dtype, dw_partial.device) if db_partial is not None else None
    if n > 0:
        with utils.launch_device(dw_partial):
            _layer_norm_dwdb_kernel[(triton.cdiv(n, DWDB_COLS),)](
                dw_partial, db_partial if db_partial is not None else dw_partial,
                dweight, dbias if dbias is not None else dweight, programs, n,
                HAS_BIAS=db_partial is not None, ROWS=DWDB_ROWS, COLS=DWDB_COLS,
            )
    return dweight, dbias


# ----------------------------------------------------------------------------------------------
# Custom operators: torch.ops.gpt2_suite.layer_norm, .add_layer_norm and .layer_norm_backward
# ----------------------------------------------------------------------------------------------


def _layer_norm_fwd_math(x, weight, bias, eps: float, residual=None):
    """layer_norm_fwd in plain PyTorch, fp32 inside: the ops' CPU implementation without the
    interpreter. Same outputs, layout and dtypes as the kernel's."""
    y, z, mean, rstd = _fwd_outputs(x, residual)
    n = x.shape[-1]
    if z is not None:
        z.copy_(x + residual)  # rounded to the stream's dtype before it is normalised, as the kernel does
    z32 = (z if z is not None else x).float().reshape(-1, n)
    pivot = z32[:, :1]  # the shifted statistics of the module docstring
    s = (z32 - pivot).mean(-1, keepdim=True)  # mean - p
    zc = (z32 - pivot) - s  # z - mean
    rstd.copy_(torch.rsqrt((zc * zc).mean(-1) + eps))
    mean.copy_((pivot + s).view(-1))
    y32 = zc * rstd[:, None] * weight.float()
    y.copy_((y32 + bias.float() if bias is not None else y32).view(x.shape))
    return y, z, mean, rstd


def _layer_norm_bwd_math(dy, z, weight, bias, mean, rstd, dz_out=None):
    """layer_norm_bwd in plain PyTorch, fp32 inside, by the derivation in the module docstring."""
    n = z.shape[-1]
    z32, dy32 = z.float().reshape(-1, n), dy.float().reshape(-1, n)
    zc = z32 - mean[:, None]  # shifted by the saved mean, then by its rounding error, as the kernel
    xhat = (zc - zc.mean(-1, keepdim=True)) * rstd[:, None]
    g = dy32 * weight.float()  # the gradient reaching xhat
    c1 = (g * xhat).mean(-1, keepdim=True)
    c2 = g.mean(-1, keepdim=True)
    dz32 = (g - (xhat * c1 + c2)) * rstd[:, None]
    if dz_out is not None:
        dz32 = dz32 + dz_out.float().reshape(-1, n)
    dweight = (dy32 * xhat).sum(0).to(weight.dtype)
    dbias = dy32.sum(0).to(bias.dtype) if bias is not None else None
    return dz32.to(z.dtype).view(z.shape), dweight, dbias


def _fwd_cpu(x, weight, bias, eps, residual=None):
    """On CPU: our kernels under the interpreter, else the same math in PyTorch."""
    fwd = layer_norm_fwd if utils.interpreting() else _layer_norm_fwd_math
    return fwd(x, weight, bias, eps, residual)


# The ops' implementations: layer_norm returns (y, mean, rstd), add_layer_norm (y, z, mean, rstd).
def _norm_fwd(x, weight, bias, eps):
    y, _, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
    return y, mean, rstd


def _norm_fwd_cpu(x, weight, bias, eps):
    y, _, mean, rstd = _fwd_cpu(x, weight, bias, eps)
    return y, mean, rstd


def _norm_fwd_fake(x, weight, bias, eps):
    y, _, mean, rstd = _fwd_outputs(x, None)
    return y, mean, rstd


def _add_norm_fwd(x, residual, weight, bias, eps):
    return layer_norm_fwd(x, weight, bias, eps, residual)


def _add_norm_fwd_cpu(x, residual, weight, bias, eps):
    return _fwd_cpu(x, weight, bias, eps, residual)


def _add_norm_fwd_fake(x, residual, weight, bias, eps):
    return _fwd_outputs(x, residual)


def _no_bias_grad(weight: torch.Tensor) -> torch.Tensor:
    """The backward op's third output without a bias: empty (a schema has no optional outputs)."""
    return torch.empty((0,), dtype=weight.dtype, device=weight.device)


def _bwd(dy, z, weight, bias, mean, rstd, dz_out):
    dz, dweight, dbias = layer_norm_bwd(dy, z, weight, bias, mean, rstd, dz_out)
    return dz, dweight, dbias if dbias is not None else _no_bias_grad(weight)


def _bwd_cpu(dy, z, weight, bias, mean, rstd, dz_out):
    bwd = layer_norm_bwd if utils.interpreting() else _layer_norm_bwd_math
    dz, dweight, dbias = bwd(dy, z, weight, bias, mean, rstd, dz_out)
    return dz, dweight, dbias if dbias is not None else _no_bias_grad(weight)


def _bwd_fake(dy, z, weight, bias, mean, rstd, dz_out):
    def like(t):  # as the launcher returns them: contiguous, shaped and typed like t
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(z), like(weight), like(bias) if bias is not None else _no_bias_grad(weight)


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _add_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps = inputs
    _y, z, mean, rstd = output
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.save_for_backward(z, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _normalised_grads(ctx, dy, dz_out):
    """(dz, dweight, dbias) through torch.ops.gpt2_suite.layer_norm_backward (utils.call_op)."""
    z, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:  # only the residual stream was used downstream
        dy = torch.zeros_like(z)
    dz, dweight, dbias = utils.call_op("layer_norm_backward", dy, z, weight, bias, mean, rstd, dz_out)
    return dz, dweight, dbias if bias is not None else None


def _norm_backward(ctx, dy, _dmean, _drstd):
    dz, dweight, dbias = _normalised_grads(ctx, dy, None)
    return dz, dweight, dbias, None


def _add_norm_backward(ctx, dy, dz_out, _dmean, _drstd):
    dz, dweight, dbias = _normalised_grads(ctx, dy, dz_out)
    # z = x + residual: both receive dz (the same tensor when dtypes agree, as for torch's add).
    return dz.to(ctx.x_dtype), dz.to(ctx.residual_dtype), dweight, dbias, None


utils.define_op(
    "layer_norm_backward",
    "(Tensor dy, Tensor z, Tensor weight, Tensor? bias, Tensor mean, Tensor rstd, Tensor? dz_out)"
    " -> (Tensor, Tensor, Tensor)",
    cuda=_bwd, cpu=_bwd_cpu, fake=_bwd_fake,
)
utils.define_op(
    "layer_norm",
    "(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    cuda=_norm_fwd, cpu=_norm_fwd_cpu, fake=_norm_fwd_fake,
    backward=_norm_backward, setup_context=_norm_setup_context,
)
utils.define_op(
    "add_layer_norm",
    "(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    cuda=_add_norm_fwd, cpu=_add_norm_fwd_cpu, fake=_add_norm_fwd_fake,
    backward=_add_norm_backward, setup_context=_add_norm_setup_context,
)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, like F.layer_norm(x, (N,), weight, bias, eps).
    Runs torch.ops.gpt2_suite.layer_norm (its mean and rstd outputs stay internal; in plain eager mode
    without the dispatcher: utils.call_op)."""
    _check_inputs(x, None, weight, bias)  # here, before the op: its CPU implementation would accept CPU tensors
    y, _, _ = utils.call_op("layer_norm", x, weight, bias, float(eps))
    return y


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LN(x + residual), x + residual) in one pass over the residual stream.
    Runs torch.ops.gpt2_suite.add_layer_norm (in plain eager mode without the dispatcher: utils.call_op)."""
    _check_inputs(x, residual, weight, bias)
    y, z, _, _ = utils.call_op("add_layer_norm", x, residual, weight, bias, float(eps))
    return y, z

