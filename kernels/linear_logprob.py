"""Per-token log-probability straight from hidden states and the LM head, never building the [N, V] logits.

The maths, with h [N, D] hidden states, W [V, D] the head, b [V] an optional bias and y [N] the targets:

    z_n          = h_n W^T + b                                    one [BLOCK_N, BLOCK_V] tile at a time
    lse_n        = log sum_v exp(z_n[v])                          online max / rescaled sum over V tiles
    logp_n       = z_n[y_n] - lse_n                               picked when y_n falls in the tile
    dz_n[v]      = g_n * (1[v == y_n] - exp(z_n[v] - lse_n))       g_n = d loss / d logp_n (from the rank kernel)
    dh           = dz W        dW = dz^T h        db = sum_n dz_n

Naive (`rrhf_fast.reference`): logits matmul 2NVD FLOPs, an [N, V] fp32 logits tensor (4NV bytes; 4 GB at
N = 8192, V = 128256) that log_softmax, the gather and the backward each read and write again, then dh and dW
matmuls, 2NVD each: 6NVD FLOPs and ~7 passes over 4NV bytes (kernels/README.md counts them).

Fused two-pass (Cut-Cross-Entropy style), what this file does:
- forward: 2NVD FLOPs, reads h once per V split and W once per N block, writes O(N) fp32 (lse, logp);
- backward, deterministic (default): one kernel owns a block of rows and recomputes z to accumulate dh
  (4NVD), a second owns a block of vocabulary rows and recomputes z to accumulate dW and db (4NVD): 8NVD,
  each output element written by exactly one program, so two runs are bitwise equal;
- backward, deterministic=False: one kernel per (N tile, V tile) recomputes z once and adds both dh and dW
  with fp32 atomics: 4NVD + 2NVD = 6NVD (8NVD with the forward, the DESIGN §6 figure), but the order of the
  atomic adds varies from run to run, so results agree only to fp32 rounding.
No [N, V] tensor exists in either direction; the extra memory is fp32 accumulators of dh / dW.

hidden and weight may be fp32, bf16 or fp16 (one dtype for both); tl.dot accumulates in fp32, and fp32
inputs use input_precision="ieee" (no tf32) unless allow_tf32=True. fp64 is not supported here: use the
logits-level kernels or the torch path.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST_DOT is set only under TRITON_INTERPRET=1, whose tl.dot
    (triton 3.9) multiplies the raw bits of bf16 / fp16 operands: they go through fp32 first there, which
    is exact (a bf16 or fp16 product fits an fp32), so the interpreter computes what the tensor cores do."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    hidden,  # [N, D] pointer
    weight,  # [V, D] pointer
    bias,  # [V] pointer (unused when HAS_BIAS is False)
    o_n,  # [BLOCK_N] int64 row indices of the tile
    o_v,  # [BLOCK_V] int64 vocabulary indices of the tile
    m_n,  # [BLOCK_N] rows that exist
    m_v,  # [BLOCK_V] columns that exist (and belong to this program's range)
    D,  # hidden size
    stride_hn,  # elements between rows of hidden
    stride_wv,  # elements between rows of weight
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" (exact fp32 products) or "tf32"; ignored for bf16 / fp16
    UPCAST_DOT: tl.constexpr,  # interpreter only, see _mma
):
    """z = h W^T (+ b) for one tile in fp32, -inf in the columns that do not exist (so max / exp ignore them)."""
    o_d = tl.arange(0, BLOCK_D)
    b_z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_d = d0 + o_d < D
        # [BLOCK_N, BLOCK_D]; missing rows read as 0, their logits are never stored
        b_h = tl.load(hidden + o_n[:, None] * stride_hn + d0 + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        # [BLOCK_V, BLOCK_D]
        b_w = tl.load(weight + o_v[:, None] * stride_wv + d0 + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_z = _mma(b_h, tl.trans(b_w), b_z, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        # [BLOCK_V]
        b_z += tl.load(bias + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(m_v[None, :], b_z, float("-inf"))


@triton.jit
def _row_stats(targets, lse, grad_logp, o_n, m_n):
    """[BLOCK_N] targets, lse and upstream gradient of a row tile. Missing rows get target -1 (matches no
    column), lse = +inf and g = 0, so _dlogits_tile gives exactly 0 there."""
    b_y = tl.load(targets + o_n, mask=m_n, other=-1)
    b_lse = tl.load(lse + o_n, mask=m_n, other=float("inf"))
    b_g = tl.load(grad_logp + o_n, mask=m_n, other=0.0)
    return b_y, b_lse, b_g


@triton.jit
def _dlogits_tile(b_z, b_y, b_lse, b_g, o_v, m_n, m_v):
    """dz = g (onehot(y) - exp(z - lse)) for one [BLOCK_N, BLOCK_V] tile, exactly 0 outside the tile's rows
    and columns. Missing rows carry lse = +inf and g = 0, so exp() is 0 there and no 0 * inf NaN can appear."""
    b_p = tl.exp(b_z - b_lse[:, None])
    b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - b_p)
    return tl.where(m_n[:, None] & m_v[None, :], b_dz, 0.0)


@triton.jit
def _linear_logprob_fwd_kernel(
    hidden,  # [N, D] fp32 / bf16 / fp16
    weight,  # [V, D] same dtype as hidden
    bias,  # [V] or a dummy pointer when HAS_BIAS is False
    targets,  # [N] int64
    part_m,  # [SPLIT_V, N] fp32 output: running max of this program's V range
    part_s,  # [SPLIT_V, N] fp32 output: sum of exp(z - max) over the range
    part_zy,  # [SPLIT_V, N] fp32 output: the target logit if it lies in the range, else 0
    N,  # rows (response tokens)
    V,  # vocabulary size
    D,  # hidden size
    stride_hn,  # elements between rows of hidden
    stride_wv,  # elements between rows of weight
    V_PER_SPLIT,  # vocabulary columns per program along grid axis 1 (a multiple of BLOCK_V)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary columns per tile
    BLOCK_D: tl.constexpr,  # hidden-size chunk of each tl.dot
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), SPLIT_V): axis 1 splits the vocabulary when there are too few row blocks to
    # fill the machine; the launcher merges the SPLIT_V partial (max, sum) pairs
    i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    v_start = i_s * V_PER_SPLIT
    v_end = tl.minimum(V, v_start + V_PER_SPLIT)

    # [BLOCK_N]
    b_y = tl.load(targets + o_n, mask=m_n, other=-1)
    b_m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        o_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        m_v = o_v < v_end
        # [BLOCK_N, BLOCK_V]
        b_z = _logits_tile(hidden, weight, bias, o_n, o_v, m_n, m_v, D, stride_hn, stride_wv,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        # every tile holds at least one real column, so b_m_new is finite and exp(-inf - b_m_new) = 0
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_z - b_m_new[:, None]), axis=1)
        b_m = b_m_new
        b_zy += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)

    o_out = i_s * N + o_n
    tl.store(part_m + o_out, b_m, mask=m_n)
    tl.store(part_s + o_out, b_s, mask=m_n)
    tl.store(part_zy + o_out, b_zy, mask=m_n)


@triton.jit
def _linear_logprob_bwd_dh_kernel(
    hidden,  # [N, D]
    weight,  # [V, D]
    bias,  # [V] or a dummy pointer
    targets,  # [N] int64
    lse,  # [N] fp32 from the forward
    grad_logp,  # [N] fp32 upstream gradient
    dh_part,  # [SPLIT_V, N, D] fp32 output, zero-initialised: this program's share of dh
    N, V, D,  # sizes
    stride_hn, stride_wv,  # row strides of hidden and weight
    V_PER_SPLIT,  # vocabulary columns per program along grid axis 1
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), SPLIT_V): this program alone owns dh_part[i_s, its rows, :], so the
    # read-modify-write below has no race and a fixed order: deterministic
    i_n, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_d = tl.arange(0, BLOCK_D)
    v_start = i_s * V_PER_SPLIT
    v_end = tl.minimum(V, v_start + V_PER_SPLIT)

    # [BLOCK_N]
    b_y, b_lse, b_g = _row_stats(targets, lse, grad_logp, o_n, m_n)
    p_dh = dh_part + (i_s * N + o_n[:, None]) * D
    for v0 in range(v_start, v_end, BLOCK_V):
        o_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        m_v = o_v < v_end
        # [BLOCK_N, BLOCK_V]
        b_z = _logits_tile(hidden, weight, bias, o_n, o_v, m_n, m_v, D, stride_hn, stride_wv,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        # dz rounded to the operand dtype for the tensor cores (as a bf16 autograd backward would be)
        b_dz = _dlogits_tile(b_z, b_y, b_lse, b_g, o_v, m_n, m_v).to(weight.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            m_d = d0 + o_d < D
            # [BLOCK_V, BLOCK_D]
            b_w = tl.load(weight + o_v[:, None] * stride_wv + d0 + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
            m_nd = m_n[:, None] & m_d[None, :]
            # [BLOCK_N, BLOCK_D]
            b_dh = tl.load(p_dh + d0 + o_d[None, :], mask=m_nd, other=0.0)
            b_dh = _mma(b_dz, b_w, b_dh, DOT_PRECISION, UPCAST_DOT)
            tl.store(p_dh + d0 + o_d[None, :], b_dh, mask=m_nd)


@triton.jit
def _linear_logprob_bwd_dw_kernel(
    hidden,  # [N, D]
    weight,  # [V, D]
    bias,  # [V] or a dummy pointer
    targets,  # [N] int64
    lse,  # [N] fp32
    grad_logp,  # [N] fp32
    dw_part,  # [SPLIT_N, V, D] fp32 output, zero-initialised: this program's share of dW
    db_part,  # [SPLIT_N, V] fp32 output: this program's share of db (written only when HAS_BIAS)
    N, V, D,  # sizes
    stride_hn, stride_wv,  # row strides of hidden and weight
    N_PER_SPLIT,  # rows per program along grid axis 1 (a multiple of BLOCK_N)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(V, BLOCK_V), SPLIT_N): the mirror image of the dh kernel; this program alone owns
    # dw_part[i_s, its vocabulary rows, :] and db_part[i_s, its vocabulary rows]
    i_v, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    o_d = tl.arange(0, BLOCK_D)
    n_start = i_s * N_PER_SPLIT
    n_end = tl.minimum(N, n_start + N_PER_SPLIT)

    p_dw = dw_part + (i_s * V + o_v[:, None]) * D
    b_db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_end
        # [BLOCK_N]
        b_y, b_lse, b_g = _row_stats(targets, lse, grad_logp, o_n, m_n)
        # [BLOCK_N, BLOCK_V]
        b_z = _logits_tile(hidden, weight, bias, o_n, o_v, m_n, m_v, D, stride_hn, stride_wv,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        b_dz = _dlogits_tile(b_z, b_y, b_lse, b_g, o_v, m_n, m_v)
        b_db += tl.sum(b_dz, axis=0)
        # [BLOCK_V, BLOCK_N]
        b_dzt = tl.trans(b_dz.to(hidden.dtype.element_ty))
        for d0 in range(0, D, BLOCK_D):
            m_d = d0 + o_d < D
            # [BLOCK_N, BLOCK_D]
            b_h = tl.load(hidden + o_n[:, None] * stride_hn + d0 + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            m_vd = m_v[:, None] & m_d[None, :]
            # [BLOCK_V, BLOCK_D]
            b_dw = tl.load(p_dw + d0 + o_d[None, :], mask=m_vd, other=0.0)
            b_dw = _mma(b_dzt, b_h, b_dw, DOT_PRECISION, UPCAST_DOT)
            tl.store(p_dw + d0 + o_d[None, :], b_dw, mask=m_vd)
    if HAS_BIAS:
        tl.store(db_part + i_s * V + o_v, b_db, mask=m_v)


@triton.jit
def _linear_logprob_bwd_atomic_kernel(
    hidden,  # [N, D]
    weight,  # [V, D]
    bias,  # [V] or a dummy pointer
    targets,  # [N] int64
    lse,  # [N] fp32
    grad_logp,  # [N] fp32
    dh,  # [N, D] fp32 output, zero-initialised, accumulated with atomics
    dw,  # [V, D] fp32 output, zero-initialised, accumulated with atomics
    db,  # [V] fp32 output, zero-initialised (used only when HAS_BIAS and COMPUTE_DW)
    N, V, D,  # sizes
    stride_hn, stride_wv,  # row strides of hidden and weight
    HAS_BIAS: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): one logits tile per program, recomputed once and used for
    # both dh and dW; many programs add into the same dh rows and dW rows, hence the atomics
    i_n, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n, m_v = o_n < N, o_v < V
    o_d = tl.arange(0, BLOCK_D)

    # [BLOCK_N]
    b_y, b_lse, b_g = _row_stats(targets, lse, grad_logp, o_n, m_n)
    # [BLOCK_N, BLOCK_V]
    b_z = _logits_tile(hidden, weight, bias, o_n, o_v, m_n, m_v, D, stride_hn, stride_wv,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
    b_dz = _dlogits_tile(b_z, b_y, b_lse, b_g, o_v, m_n, m_v)
    if HAS_BIAS and COMPUTE_DW:
        tl.atomic_add(db + o_v, tl.sum(b_dz, axis=0), mask=m_v)
    b_dz = b_dz.to(hidden.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        m_d = d0 + o_d < D
        if COMPUTE_DH:
            # [BLOCK_V, BLOCK_D]
            b_w = tl.load(weight + o_v[:, None] * stride_wv + d0 + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
            b_dh = _mma(b_dz, b_w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(dh + o_n[:, None] * D + d0 + o_d[None, :], b_dh, mask=m_n[:, None] & m_d[None, :])
        if COMPUTE_DW:
            # [BLOCK_N, BLOCK_D]
            b_h = tl.load(hidden + o_n[:, None] * stride_hn + d0 + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_dw = _mma(tl.trans(b_dz), b_h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(dw + o_v[:, None] * D + d0 + o_d[None, :], b_dw, mask=m_v[:, None] & m_d[None, :])


# ----------------------------------------------------------------------------------------------- launchers

_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    # asked lazily, at the first launch on that device, never at import
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _config(device: torch.device, dtype: torch.dtype, kernel: str) -> dict:
    """Tile sizes and launch options per kernel ("fwd", "dh", "dw", "atomic"), each checked with ptxas for
    sm_90a to compile without register spills.

    The fp32 logits tile is BLOCK_N x BLOCK_V: 64 x 128 (32 registers per thread at 8 warps) or, in the
    deterministic backward, 64 x 256 / 256 x 64. Those two kernels re-read and re-write their fp32
    accumulator rows once per tile of the dimension they reduce over, so that dimension gets the long
    side (256): the dh kernel reduces over V, the dW kernel over N. That halves the accumulator traffic
    per FLOP (128 FLOP per accumulator byte instead of 64). BLOCK_D is 64 in the forward (3 stages of
    8 KB + 16 KB bf16 operand tiles), 32 in the backward, which also holds dz and a [., BLOCK_D] fp32
    accumulator, and 16 in the 256-row dW kernel: each step up spilled registers. fp32 inputs (ieee
    products run on the FMA units, which hold their operands in registers) use 64 x 64 x 32 everywhere.
    Under the interpreter everything is 16 / 32 / 16 (tl.dot's minimum is 16) so that the tiny test shapes
    cross several tiles in every dimension, ragged edges included."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, UPCAST_DOT=False if dtype == torch.float32 else True,
                    num_warps=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, UPCAST_DOT=False, num_warps=8, num_stages=2)
    blocks = {"fwd": (64, 128, 64, 3), "dh": (64, 256, 32, 2), "dw": (256, 64, 16, 2), "atomic": (64, 128, 32, 2)}
    block_n, block_v, block_d, stages = blocks[kernel]
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, UPCAST_DOT=False, num_warps=8, num_stages=stages)


def _split(n_blocks: int, loop_len: int, block: int, device: torch.device, requested, bytes_per_split: int):
    """(split, per_split): how many programs share each owned block's reduction loop over loop_len
    elements, and how many elements (a multiple of block) each takes. On GPU: enough that there are about
    two programs per SM, but no more than the loop has tiles and no more than 256 MB of fp32 partials.
    On CPU: 1 unless the caller (a test) asks. No split is left empty."""
    n_tiles = triton.cdiv(loop_len, block)
    if requested is not None:
        split = max(1, min(int(requested), n_tiles))
    elif device.type != "cuda":
        split = 1
    else:
        want = triton.cdiv(2 * _sm_count(device), max(n_blocks, 1))
        split = max(1, min(want, n_tiles, (256 << 20) // max(bytes_per_split, 1)))
    per_split = triton.cdiv(n_tiles, split) * block
    return triton.cdiv(loop_len, per_split), per_split


def _dot_precision(dtype: torch.dtype, weight_dtype: torch.dtype, allow_tf32: bool) -> str:
    if weight_dtype != dtype:
        raise TypeError(f"hidden ({dtype}) and weight ({weight_dtype}) must share a dtype; cast one of them")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear_logprob kernels take fp32, bf16 or fp16 hidden/weight, got {dtype}; "
                        "use the logits-level kernels or the torch backend for other dtypes")
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def linear_logprob_fwd(hidden, weight, bias, targets, *, split_v=None, allow_tf32=False):
    """(logp [N] fp32, lse [N] fp32) of logits = hidden @ weight.T (+ bias), without materialising them.

    split_v: programs per row block along V (None: chosen from the device); allow_tf32: fp32 inputs use
    tf32 tensor cores instead of exact fp32 products."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous().long()
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    precision = _dot_precision(hidden.dtype, weight.dtype, allow_tf32)
    cfg = _config(device, hidden.dtype, "fwd")
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone()
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    split, v_per_split = _split(n_blocks, V, cfg["BLOCK_V"], device, split_v, 12 * N)
    part = torch.empty(3, split, N, dtype=torch.float32, device=device)
    _linear_logprob_fwd_kernel[(n_blocks, split)](
        hidden, weight, bias if bias is not None else hidden, targets, part[0], part[1], part[2],
        N, V, D, hidden.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, **cfg,
    )
    # merge the splits: lse = logsumexp_s(m_s + log s_s); every split holds a real column, so s_s >= 1
    lse = torch.logsumexp(part[0] + torch.log(part[1]), dim=0)
    logp = part[2].sum(0) - lse
    return logp, lse


def linear_logprob_bwd(
    hidden, weight, bias, targets, lse, grad_logp, compute_dh=True, compute_dw=True,
    *, compute_db=None, deterministic=True, split_v=None, split_n=None, allow_tf32=False,
):
    """(dh [N, D] in hidden.dtype | None, dw [V, D] in weight.dtype | None, db [V] in bias.dtype | None).

    db is returned when a bias is given and compute_db (default: compute_dw) is set; db without dW still
    runs the dW kernel, whose dW is then dropped. deterministic=True (default) runs the two
    race-free kernels (8NVD FLOPs, bitwise reproducible); False runs the single atomic kernel (6NVD,
    reproducible only to fp32 rounding). split_v / split_n override the reduction splits of the dh / dW
    kernels (None: chosen from the device)."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous().long()
    lse = lse.contiguous().float()
    grad_logp = grad_logp.contiguous().float()
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    precision = _dot_precision(hidden.dtype, weight.dtype, allow_tf32)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else hidden
    want_db = has_bias and (compute_dw if compute_db is None else compute_db)
    run_dw = compute_dw or want_db  # db comes out of the dW kernel
    dh = dw = db = None
    if N == 0:
        dh = torch.zeros_like(hidden) if compute_dh else None
        dw = torch.zeros_like(weight) if compute_dw else None
        db = torch.zeros_like(bias) if want_db else None
        return dh, dw, db
    args = (hidden, weight, bias_arg, targets, lse, grad_logp)
    sizes = (N, V, D, hidden.stride(0), weight.stride(0))

    if not deterministic:
        cfg = _config(device, hidden.dtype, "atomic")
        dh32 = torch.zeros(N, D, dtype=torch.float32, device=device) if compute_dh else hidden
        dw32 = torch.zeros(V, D, dtype=torch.float32, device=device) if run_dw else hidden
        # the kernel adds db whenever it computes dW of a biased head, so the buffer must exist then
        db32 = torch.zeros(V, dtype=torch.float32, device=device) if has_bias and run_dw else hidden
        if compute_dh or run_dw:
            grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
            _linear_logprob_bwd_atomic_kernel[grid](
                *args, dh32, dw32, db32, *sizes, HAS_BIAS=has_bias, DOT_PRECISION=precision,
                COMPUTE_DH=compute_dh, COMPUTE_DW=run_dw, **cfg,
            )
        return (dh32.to(hidden.dtype) if compute_dh else None,
                dw32.to(weight.dtype) if compute_dw else None,
                db32.to(bias.dtype) if want_db else None)

    if compute_dh:
        cfg = _config(device, hidden.dtype, "dh")
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        split, v_per_split = _split(n_blocks, V, cfg["BLOCK_V"], device, split_v, 4 * N * D)
        dh_part = torch.zeros(split, N, D, dtype=torch.float32, device=device)
        _linear_logprob_bwd_dh_kernel[(n_blocks, split)](
            *args, dh_part, *sizes, v_per_split, HAS_BIAS=has_bias, DOT_PRECISION=precision, **cfg,
        )
        # the splits are summed in a fixed order, so the result stays deterministic
        dh = (dh_part[0] if split == 1 else dh_part.sum(0)).to(hidden.dtype)
    if run_dw:
        cfg = _config(device, hidden.dtype, "dw")
        v_blocks = triton.cdiv(V, cfg["BLOCK_V"])
        split, n_per_split = _split(v_blocks, N, cfg["BLOCK_N"], device, split_n, 4 * V * D)
        dw_part = torch.zeros(split, V, D, dtype=torch.float32, device=device)
        db_part = torch.zeros(split, V, dtype=torch.float32, device=device)
        _linear_logprob_bwd_dw_kernel[(v_blocks, split)](
            *args, dw_part, db_part, *sizes, n_per_split, HAS_BIAS=has_bias, DOT_PRECISION=precision, **cfg,
        )
        if compute_dw:
            dw = (dw_part[0] if split == 1 else dw_part.sum(0)).to(weight.dtype)
        if want_db:
            db = (db_part[0] if split == 1 else db_part.sum(0)).to(bias.dtype)
    return dh, dw, db
