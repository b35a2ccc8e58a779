"""Per-token log-probability from materialised logits: log-softmax and target gather in one pass.

The maths, for row n of the [N, V] logits z with target y_n:

    lse_n        = log sum_v exp(z_n[v])                  online over V blocks: m <- max(m, max z), s <- s e^(m_old - m) + sum e^(z - m)
    logp_n       = z_n[y_n] - lse_n
    dz_n[v]      = g_n * (1[v == y_n] - exp(z_n[v] - lse_n))     g_n = d loss / d logp_n

The naive PyTorch version (`rrhf_fast.reference.token_logprobs_from_logits`) upcasts the logits, writes a
full [N, V] fp32 log_softmax and gathers from it: 4NV bytes read (fp32 logits), 4NV written, 4NV read by the
gather, and its backward writes and reads further [N, V] fp32 tensors. Here the forward reads the logits
once (NV * elem bytes) and writes 8N bytes; the backward reads them once and writes dlogits once (in place
if asked, so no second [N, V] buffer exists). Both are memory-bound: about 5NV FLOPs against NV loads.

Accumulation is in fp32, or fp64 for fp64 logits (then logp and lse come back as fp64 too).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _logprob_fwd_kernel(
    logits,  # [N, V] pointer, any float dtype, rows stride_n apart, unit stride along V
    targets,  # [N] int64 target token of each row
    logp,  # [N] output: z[y] - lse, in ACC_DTYPE
    lse,  # [N] output: logsumexp of the row, in ACC_DTYPE
    stride_n,  # elements between consecutive rows of logits
    V,  # vocabulary size (row length)
    BLOCK_V: tl.constexpr,  # columns read per step of the online logsumexp
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 logits
):
    # one program per row; int64 so that i_n * stride_n cannot wrap when N * V > 2^31
    i_n = tl.program_id(0).to(tl.int64)
    p_row = logits + i_n * stride_n
    o_v = tl.arange(0, BLOCK_V)

    # scalar running max and rescaled sum; the first block always holds a real column, so b_m is finite
    # after it and exp(-inf - b_m) = 0 for masked columns never produces a NaN
    b_m = tl.full((), float("-inf"), ACC_DTYPE)
    b_s = tl.zeros((), ACC_DTYPE)
    for i_v in range(0, V, BLOCK_V):
        m_v = i_v + o_v < V
        p_z = p_row + i_v + o_v
        # [BLOCK_V]
        b_z = tl.load(p_z, mask=m_v, other=float("-inf")).to(ACC_DTYPE)
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_z - b_m_new), axis=0)
        b_m = b_m_new
    b_lse = b_m + tl.log(b_s)

    # the target logit is one scalar load, not a masked reduction over the row
    p_y = targets + i_n
    b_y = tl.load(p_y)
    p_zy = p_row + b_y
    b_zy = tl.load(p_zy).to(ACC_DTYPE)
    p_logp, p_lse = logp + i_n, lse + i_n
    tl.store(p_logp, b_zy - b_lse)
    tl.store(p_lse, b_lse)


@triton.jit
def _logprob_bwd_kernel(
    logits,  # [N, V] pointer, read; may be the same buffer as dlogits (in place)
    dlogits,  # [N, V] output in logits' dtype, rows stride_n apart
    targets,  # [N] int64
    lse,  # [N] logsumexp from the forward (fp32 or fp64)
    grad_logp,  # [N] upstream gradient d loss / d logp
    stride_n,  # elements between consecutive rows (same for logits and dlogits)
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # columns handled by one program
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 logits
):
    # grid (N, cdiv(V, BLOCK_V)): every element is read and written by exactly one program, which is what
    # makes the in-place form safe and the result deterministic
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    p_lse, p_g, p_y = lse + i_n, grad_logp + i_n, targets + i_n
    p_z = logits + i_n * stride_n + o_v
    p_dz = dlogits + i_n * stride_n + o_v

    b_lse = tl.load(p_lse).to(ACC_DTYPE)
    b_g = tl.load(p_g).to(ACC_DTYPE)
    b_y = tl.load(p_y)
    # [BLOCK_V]
    b_z = tl.load(p_z, mask=m_v, other=float("-inf")).to(ACC_DTYPE)
    b_dz = b_g * (tl.where(o_v == b_y, 1.0, 0.0) - tl.exp(b_z - b_lse))
    tl.store(p_dz, b_dz.to(dlogits.dtype.element_ty), mask=m_v)


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _fwd_block_v(V: int, device: torch.device) -> int:
    # GPU: 4096 columns per step keep 16 KB of fp32 in flight per program (enough to hide HBM latency with
    # 8 warps) while a 128k vocabulary still needs only ~32 steps. The interpreter gets 32 so that the small
    # test rows cross several blocks and the online rescaling is exercised.
    cap = 4096 if device.type == "cuda" else 32
    return min(cap, triton.next_power_of_2(V))


def logprob_fwd(logits: torch.Tensor, targets: torch.Tensor):
    """[N, V] logits, [N] targets -> (logp [N], lse [N]), fp32 (fp64 for fp64 logits)."""
    logits = logits.contiguous()
    targets = targets.contiguous().long()
    N, V = logits.shape
    tl_acc, torch_acc = _acc_dtype(logits.dtype)
    logp = torch.empty(N, dtype=torch_acc, device=logits.device)
    lse = torch.empty(N, dtype=torch_acc, device=logits.device)
    if N == 0:
        return logp, lse
    _logprob_fwd_kernel[(N,)](
        logits, targets, logp, lse, logits.stride(0), V,
        BLOCK_V=_fwd_block_v(V, logits.device), ACC_DTYPE=tl_acc,
        num_warps=8 if logits.is_cuda else 1,
    )
    return logp, lse


def logprob_bwd(logits, targets, lse, grad_logp, inplace: bool = False):
    """dlogits [N, V] in logits' dtype: grad_logp[n] * (onehot(targets[n]) - softmax(logits[n])).

    With inplace=True the logits buffer is overwritten and returned (logits must then be contiguous, or the
    result lands in a contiguous copy that is returned instead)."""
    logits_c = logits.contiguous()
    targets = targets.contiguous().long()
    lse = lse.contiguous()
    grad_logp = grad_logp.contiguous()
    N, V = logits_c.shape
    tl_acc, _ = _acc_dtype(logits_c.dtype)
    dlogits = logits_c if inplace else torch.empty_like(logits_c)
    if N == 0:
        return dlogits
    # GPU: 1024 columns (4 warps x 32 lanes x 8 elements) per program gives N * V / 1024 programs, plenty to
    # fill the machine; the interpreter uses 64 to keep the per-program numpy work small but multi-block.
    block_v = min(1024 if logits_c.is_cuda else 64, triton.next_power_of_2(V))
    grid = (N, triton.cdiv(V, block_v))
    _logprob_bwd_kernel[grid](
        logits_c, dlogits, targets, lse, grad_logp, logits_c.stride(0), V,
        BLOCK_V=block_v, ACC_DTYPE=tl_acc, num_warps=4 if logits_c.is_cuda else 1,
    )
    return dlogits


# The head's loops (rrhf_fast.head) keep their [rows, V] logits buffer in the matmul's dtype for these
# kernels: they read it as it is and do the softmax maths in fp32 registers (half the traffic of an fp32
# buffer for bf16 logits).
UPCAST_LOGITS = False


def logprob_step_(logits, targets, grad_of_logp):
    """One chunk of the one-sweep loss (as rrhf_fast.torch_ops.logprob_step_): logprob_fwd, then the upstream
    gradient grad_of_logp(logp) (None: a forward only), then logprob_bwd written over the logits.

    Returns (lse [rows], dz [rows, V] in logits' dtype, or None)."""
    logp, lse = logprob_fwd(logits, targets)
    grad_logp = grad_of_logp(logp)
    if grad_logp is None:
        return lse, None
    return lse, logprob_bwd(logits, targets, lse, grad_logp, inplace=True)
