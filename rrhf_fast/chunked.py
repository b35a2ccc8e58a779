"""The RRHF loss in pure PyTorch, chunked so that no [N, V] tensor ever exists: the CPU fast path.

It computes what the Triton kernels compute, with the same six functions and signatures, so `loss.py`
drives either through the same autograd.Functions:

    linear_logprob_fwd / linear_logprob_bwd   logits = h W^T + b in row chunks -> logp, lse   (and back)
    logprob_fwd / logprob_bwd                 the same from given logits
    rank_fwd / rank_bwd                       scores, pairwise hinge, SFT term, per-token upstream gradient

The fused-linear form is two-pass: the forward keeps only logsumexp per token (O(N) memory) and the backward
recomputes each chunk's logits, turns them into dz = g (onehot - softmax) in place and multiplies out
dh = dz W and dW += dz^T h. That is 8NVD FLOPs against the naive 6NVD, in exchange for a working set of one
[rows, V] chunk instead of several [N, V] tensors. Maths: DESIGN.md section 2, kernels/README.md.
"""

import torch

# A chunk of logits holds about this many fp32 elements (32 MiB): small enough to stay near the cache and to
# keep the peak far below the naive path's, large enough that each chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _row_chunks(num_rows: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, num_rows, rows):
        yield start, min(start + rows, num_rows)


def _chunk_logits(hidden_chunk, weight, bias, dtype):
    # The matmul runs in the inputs' dtype (bf16 on a GPU stays on tensor cores); softmax maths in `dtype`.
    logits = (hidden_chunk @ weight.T).to(dtype)
    return logits if bias is None else logits.add_(bias.to(dtype))


def _logp_lse(logits, targets):
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, targets[:, None])[:, 0] - lse, lse


def _softmax_grad_(logits, targets, lse, grad_logp):
    """Overwrite [rows, V] logits with dz = g * (onehot(target) - softmax), using the saved logsumexp."""
    dz = logits.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])
    dz[torch.arange(dz.shape[0], device=dz.device), targets] += grad_logp
    return dz


def linear_logprob_fwd(hidden, weight, bias, targets):
    """[N, D] hidden, [V, D] weight, [V] bias or None, [N] targets -> ([N] logp, [N] lse) in fp32 (fp64 for fp64)."""
    dtype = _compute_dtype(hidden)
    logp = hidden.new_empty(hidden.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in _row_chunks(hidden.shape[0], weight.shape[0]):
        logits = _chunk_logits(hidden[start:end], weight, bias, dtype)  # [rows, V]
        logp[start:end], lse[start:end] = _logp_lse(logits, targets[start:end])
    return logp, lse


def linear_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp, compute_dh=True, compute_dw=True):
    """Gradients of sum_n grad_logp[n] * logp[n] -> (dh [N, D] or None, dw [V, D] or None, db [V] or None)."""
    dtype = lse.dtype
    grad_logp = grad_logp.to(dtype)
    dh = torch.empty_like(hidden) if compute_dh else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if compute_dw else None
    db = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if bias is not None else None
    for start, end in _row_chunks(hidden.shape[0], weight.shape[0]):
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias, dtype)  # [rows, V]
        dz = _softmax_grad_(logits, targets[start:end], lse[start:end], grad_logp[start:end])
        if db is not None:
            db += dz.sum(0)
        dz = dz.to(hidden.dtype)
        if compute_dh:
            dh[start:end] = dz @ weight
        if compute_dw:
            dw += (dz.T @ h).to(dtype)  # accumulated in fp32 across chunks whatever the input dtype
    return (
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


def logprob_fwd(logits, targets):
    """[N, V] logits, [N] targets -> ([N] logp, [N] lse), converting one chunk of rows at a time."""
    dtype = _compute_dtype(logits)
    logp = logits.new_empty(logits.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in _row_chunks(*logits.shape):
        logp[start:end], lse[start:end] = _logp_lse(logits[start:end].to(dtype), targets[start:end])
    return logp, lse


def logprob_bwd(logits, targets, lse, grad_logp, inplace=False):
    """dlogits = grad_logp * (onehot - softmax) in logits' dtype; written over `logits` when inplace."""
    out = logits if inplace else torch.empty_like(logits)
    grad_logp = grad_logp.to(lse.dtype)
    for start, end in _row_chunks(*logits.shape):
        chunk = logits[start:end].to(lse.dtype, copy=True)
        out[start:end] = _softmax_grad_(chunk, targets[start:end], lse[start:end], grad_logp[start:end])
    return out


def _group_layout(cu_seqlens, cu_groups):
    """Index tensors shared by rank_fwd and rank_bwd."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [C]
    group_sizes = cu_groups[1:] - cu_groups[:-1]  # [G]
    width = int(group_sizes.max())
    slot = torch.arange(width, device=cu_groups.device)
    member = cu_groups[:-1, None] + slot  # [G, K] candidate index of each slot
    valid = slot < group_sizes[:, None]  # [G, K]
    return lengths, member.clamp(max=cu_groups[-1] - 1), valid


def rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty, margin, sft_reduction):
    """Scores, per-group hinge and SFT terms, and what the backward needs.

    Returns scores [C], rank [G], sft [G], coef [C] (net count of active hinge pairs: as the lower-rewarded
    side minus as the higher-rewarded side) and best [G] (the first highest-rewarded candidate).
    """
    cu_seqlens, cu_groups = cu_seqlens.long(), cu_groups.long()
    lengths, member, valid = _group_layout(cu_seqlens, cu_groups)
    candidate_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=logp.device), lengths)
    sums = logp.new_zeros(len(lengths)).index_add_(0, candidate_of_token, logp)  # [C]
    lengths = lengths.to(logp.dtype)
    scores = sums / lengths**length_penalty

    p = scores[member]  # [G, K]
    r = rewards.to(logp.dtype)[member].masked_fill(~valid, float("-inf"))  # [G, K]
    ordered = (r[:, :, None] < r[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [G, K, K]: r_i < r_j
    gap = p[:, :, None] - p[:, None, :] + margin  # [G, K, K]
    rank = (gap.clamp(min=0) * ordered).sum((1, 2))
    active = (ordered & (gap > 0)).to(logp.dtype)
    net = active.sum(2) - active.sum(1)  # [G, K]
    coef = torch.zeros_like(scores).index_put_((member[valid],), net[valid])

    best = member.gather(1, r.argmax(1, keepdim=True))[:, 0]  # argmax returns the first maximum
    sft = -sums[best] / (lengths[best] if sft_reduction == "mean" else 1.0)
    return scores, rank, sft, coef, best


def rank_bwd(cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, length_penalty, sft_reduction):
    """[N] upstream gradient of every token's logp: dS_c for each token of candidate c (DESIGN.md section 2)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    lengths_f = lengths.to(coef.dtype)
    grad_sums = (rank_scale * coef + grad_scores) / lengths_f**length_penalty  # [C]
    sft_grad = sft_scale / lengths_f[best] if sft_reduction == "mean" else sft_scale.expand(best.shape)
    grad_sums = grad_sums.index_add(0, best, -sft_grad.to(coef.dtype))
    return torch.repeat_interleave(grad_sums, lengths)
