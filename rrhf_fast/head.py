"""The chunked loops over the LM head, shared by every backend: no [N, V] tensor ever exists.

Each loop walks the N rows in chunks; a chunk's logits z = h W^T (+ b) come from one ATen matmul (cuBLAS on
a GPU) into one [rows, V] buffer, the elementwise and ranking work on that buffer comes from an `ops`
module, and two more matmuls turn dz into dh and dW. `ops` is rrhf_fast.torch_ops (backend "torch", any
device) or rrhf_fast.kernels (backend "triton": CUDA, or CPU tensors under TRITON_INTERPRET=1); both have
the same functions with the same signatures, so the loops never ask which one they got:

    logprob_fwd(logits, targets) -> (logp, lse)           logprob_bwd(logits, targets, lse, grad_logp, inplace)
    rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty, margin, sft_reduction, *, max_group_size)
    rank_bwd(cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, length_penalty,
             sft_reduction, *, n_tokens, max_group_size)
    logprob_step_(logits, targets, grad_of_logp) -> (lse, dz)      one chunk of the one-sweep loop
    UPCAST_LOGITS                                           keep the buffer in the compute dtype (True) or in
                                                            the matmul's dtype (False)

The loops:

    linear_rrhf_fwd      the training path (rrhf_loss). Chunks hold whole groups, so a chunk's ranking term is
                         complete once its logits are; the forward also computes the gradient for d loss = 1:
                         logits once, dz = g (onehot - softmax) in place, dh = dz W, dW += dz^T h. 6NVD
                         FLOPs, the floor.
    linear_logprob_fwd / linear_logprob_bwd
                         per-token log-probabilities and their backward for any upstream gradient, two-pass:
                         the forward keeps only logsumexp, the backward recomputes the logits. 8NVD. Used by
                         sequence_scores and by gradients that reach rank_loss, sft_loss or scores.

Maths: DESIGN.md section 2 and kernels/README.md.
"""

from typing import NamedTuple

import torch

# A chunk of logits holds about this many elements (64 MiB in fp32, 512 rows of a 32k vocabulary): small
# enough to keep the peak far below the naive path's several [N, V] tensors, large enough that each chunk's
# matmuls run near full speed.
CHUNK_ELEMENTS = 1 << 24
# On a GPU each chunk also costs one read and write of the fp32 [V, D] dW accumulator (2 GB at V = 128256,
# D = 4096), and short chunks leave the matmuls' row dimension too small to fill the chip: fewer, larger
# chunks: 2^28 bf16 logits = 512 MiB, 2093 rows at V = 128256. On an H100 at N = 8192, D = 4096 the one-sweep
# head took 3.1x / 1.4x / 1.19x the 6NVD floor with 2^25 / 2^27 / 2^28 (benchmarks/tune_head.py, NOTES.md).
CUDA_CHUNK_ELEMENTS = 1 << 28

# bf16 / fp16 products accumulated straight into an fp32 tensor by one cuBLAS call (torch >= 2.8, CUDA only)
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of the softmax and ranking maths for inputs like `t`: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def row_chunks(num_rows: int, vocab: int, device: torch.device):
    """(start, end) runs of rows whose [rows, vocab] buffer holds about one chunk's elements."""
    rows = max(1, _chunk_elements(device) // max(vocab, 1))
    for start in range(0, num_rows, rows):
        yield start, min(start + rows, num_rows)


def _group_chunks(seq_offsets, group_offsets, max_rows):
    """Split the groups into runs whose tokens fit `max_rows` (a larger group gets a run of its own).

    Yields (first_group, end_group, first_token, end_token) with Python ints.
    """
    first = 0
    num_groups = len(group_offsets) - 1
    while first < num_groups:
        end = first + 1
        start_token = seq_offsets[group_offsets[first]]
        while end < num_groups and seq_offsets[group_offsets[end + 1]] - start_token <= max_rows:
            end += 1
        yield first, end, start_token, seq_offsets[group_offsets[end]]
        first = end


def _buffer_dtype(ops, hidden) -> torch.dtype:
    # The kernels read the buffer in its own dtype and do the softmax maths in fp32 registers, so it can stay in
    # the matmul's dtype (half the traffic for bf16, as in any HF model's logits); the torch ops work on the
    # buffer in place with torch maths and need it in the compute dtype.
    return compute_dtype(hidden) if ops.UPCAST_LOGITS else hidden.dtype


def _chunk_logits(hidden_chunk, weight, bias, dtype):
    # The matmul runs in the inputs' dtype (bf16 on a GPU stays on tensor cores); softmax maths in `dtype`.
    logits = (hidden_chunk @ weight.T).to(dtype)
    return logits if bias is None else logits.add_(bias.to(dtype))


def _multiply_out(dz, h, weight, dh_out, dw_acc, db_acc):
    """dh_out = dz @ W, dw_acc += dz^T @ h and db_acc += sum of dz's rows for one chunk (each may be None).

    dw_acc and db_acc accumulate in their own dtype (fp32, or fp64), whatever dtype dz has.
    """
    if db_acc is not None:
        db_acc += dz.sum(0, dtype=db_acc.dtype)
    dz = dz.to(h.dtype)  # low-precision inputs multiply in their own dtype, as on tensor cores
    if dw_acc is not None and dw_acc.dtype == dz.dtype:
        dw_acc.addmm_(dz.T, h)  # in place: no [V, D] temporary per chunk
    elif dw_acc is not None and dw_acc.is_cuda and _ADDMM_OUT_DTYPE:
        # fp32 accumulation inside cuBLAS: no low-precision [V, D] product and fp32 copy of it per chunk
        torch.addmm(dw_acc, dz.T, h, out_dtype=dw_acc.dtype, out=dw_acc)
    elif dw_acc is not None:
        dw_acc += (dz.T @ h).to(dw_acc.dtype)
    if dh_out is not None:
        torch.mm(dz, weight, out=dh_out)


def _head_grads(hidden, weight, bias, want_dh, want_dw, want_db, dtype):
    """Zeroed dh [N, D] (hidden's dtype), dw [V, D] and db [V] (accumulators in `dtype`), None where not wanted."""
    dh = torch.zeros_like(hidden) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_dw else None
    db = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if want_db and bias is not None else None
    return dh, dw, db


def _in_param_dtypes(dh, dw, db, weight, bias):
    return dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


def linear_logprob_fwd(hidden, weight, bias, targets, ops):
    """[N, D] hidden, [V, D] weight, [V] bias or None, [N] targets -> ([N] logp, [N] lse) in fp32 (fp64 for fp64)."""
    dtype = compute_dtype(hidden)
    logp = hidden.new_empty(hidden.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in row_chunks(hidden.shape[0], weight.shape[0], hidden.device):
        logits = _chunk_logits(hidden[start:end], weight, bias, _buffer_dtype(ops, hidden))  # [rows, V]
        logp[start:end], lse[start:end] = ops.logprob_fwd(logits, targets[start:end])
    return logp, lse


def linear_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp, ops, compute_dh=True, compute_dw=True):
    """Gradients of sum_n grad_logp[n] * logp[n] -> (dh [N, D] or None, dw [V, D] or None, db [V] or None)."""
    grad_logp = grad_logp.to(lse.dtype)
    dh, dw, db = _head_grads(hidden, weight, bias, compute_dh, compute_dw, True, lse.dtype)
    for start, end in row_chunks(hidden.shape[0], weight.shape[0], hidden.device):
        h, rows = hidden[start:end], slice(start, end)
        logits = _chunk_logits(h, weight, bias, _buffer_dtype(ops, hidden))  # [rows, V]
        dz = ops.logprob_bwd(logits, targets[rows], lse[rows], grad_logp[rows], inplace=True)
        _multiply_out(dz, h, weight, None if dh is None else dh[rows], dw, db)
    return _in_param_dtypes(dh, dw, db, weight, bias)


class Sweep(NamedTuple):
    """What linear_rrhf_fwd returns."""

    scores: torch.Tensor  # [C] length-normalised log-probability of every candidate
    rank: torch.Tensor  # [G] pairwise hinge sum of every group
    sft: torch.Tensor  # [G] SFT term of every group
    coef: torch.Tensor  # [C] net count of active hinge pairs (the rank ops' backward input)
    best: torch.Tensor  # [G] global index of each group's best-rewarded candidate
    lse: torch.Tensor  # [N] logsumexp of every token's logits (the two-pass backward's input)
    grads: tuple  # (dh, dw, db) of d loss = 1, each None where not asked for


def linear_rrhf_fwd(hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, options, ops, grads=(True, True, True)):
    """The whole RRHF loss from the head in one sweep over the vocabulary, with its gradient for d loss = 1.

    Chunks hold whole groups, so each chunk's ranking term is complete once its logits are: the chunk's
    logits are computed once (2 ND V_chunk), turned into log-probabilities, scored and ranked, turned in place
    into dz = g (onehot - softmax), and multiplied out into dh and dW. That is the 6NVD floor with one
    [rows, V] buffer. `options` is a rrhf_fast.loss.LossOptions; `grads` says which of (dh, dw, db) to
    compute; none computes the loss alone (2NVD). Returns a Sweep.
    """
    dtype = compute_dtype(hidden)
    seq_offsets, group_offsets = cu_seqlens.tolist(), cu_groups.tolist()
    num_groups = len(group_offsets) - 1
    dh, dw, db = _head_grads(hidden, weight, bias, *grads, dtype)
    wants_grad = any(g is not None for g in (dh, dw, db))
    per_token, per_candidate, per_group = [], [], []

    max_rows = max(1, _chunk_elements(hidden.device) // weight.shape[0])
    for g0, g1, t0, t1 in _group_chunks(seq_offsets, group_offsets, max_rows):
        c0, c1 = group_offsets[g0], group_offsets[g1]
        local_seqlens = cu_seqlens[c0 : c1 + 1] - t0
        local_groups = cu_groups[g0 : g1 + 1] - c0
        # host-side sizes for the rank ops: no device read to size their tiles or outputs
        max_group_size = max(group_offsets[g + 1] - group_offsets[g] for g in range(g0, g1))

        def grad_of_logp(logp):
            scores, rank, sft, coef, best = ops.rank_fwd(
                logp,
                local_seqlens,
                rewards[c0:c1].to(logp.dtype),
                local_groups,
                options.length_penalty,
                options.margin,
                options.sft_reduction,
                max_group_size=max_group_size,
            )
            per_candidate.append((scores, coef))
            per_group.append((rank, sft, best + c0))
            if not wants_grad:
                return None
            return ops.rank_bwd(
                local_seqlens,
                local_groups,
                coef,
                best,
                torch.zeros_like(scores),
                torch.tensor(options.rank_weight / num_groups, dtype=coef.dtype, device=coef.device),
                torch.tensor(options.sft_weight / num_groups, dtype=coef.dtype, device=coef.device),
                options.length_penalty,
                options.sft_reduction,
                n_tokens=t1 - t0,
                max_group_size=max_group_size,
            )

        h = hidden[t0:t1]
        logits = _chunk_logits(h, weight, bias, _buffer_dtype(ops, hidden))  # [rows, V]
        lse, dz = ops.logprob_step_(logits, targets[t0:t1], grad_of_logp)
        del logits  # dz is the same buffer (or none): nothing else may hold it past this chunk
        per_token.append(lse)
        if dz is None:
            continue
        _multiply_out(dz, h, weight, None if dh is None else dh[t0:t1], dw, db)
        del dz  # free this chunk's buffer before the next one is allocated

    scores, coef = (torch.cat(parts) for parts in zip(*per_candidate))
    rank, sft, best = (torch.cat(parts) for parts in zip(*per_group))
    return Sweep(scores, rank, sft, coef, best, torch.cat(per_token), _in_param_dtypes(dh, dw, db, weight, bias))
