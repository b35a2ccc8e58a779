"""The elementwise and ranking ops of the RRHF loss in PyTorch: backend "torch", any device.

The same functions, with the same names and signatures, as the Triton launchers in rrhf_fast.kernels, so that
rrhf_fast.head's loops and rrhf_fast.loss's autograd.Functions take either module as `ops`:

    logprob_fwd / logprob_bwd    log-softmax + target gather from given logits, and its backward
    logprob_step_                one chunk of the one-sweep loop: both of the above, dz written over the logits
    rank_fwd / rank_bwd          scores, pairwise hinge, SFT term, and every token's upstream gradient

The maths is DESIGN.md section 2 and kernels/README.md. Accumulation is in fp32, or fp64 for fp64 inputs
(the torch path is the one that can be checked in fp64). Given the host-side sizes (`max_group_size`,
`n_tokens`), rank_fwd and rank_bwd never read a device value on the host.
"""

import torch

from rrhf_fast.head import compute_dtype, row_chunks

# The head's loops keep their [rows, V] logits buffer in the compute dtype: these ops overwrite it in place
# with torch maths (the kernels read it in the matmul's dtype instead).
UPCAST_LOGITS = True


def _logp_lse(logits, targets):
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, targets[:, None])[:, 0] - lse, lse


def _softmax_grad_(logits, targets, lse, grad_logp):
    """Overwrite [rows, V] logits with dz = g * (onehot(target) - softmax), using the saved logsumexp."""
    dz = logits.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])
    dz[torch.arange(dz.shape[0], device=dz.device), targets] += grad_logp
    return dz


def logprob_fwd(logits, targets):
    """[N, V] logits, [N] targets -> ([N] logp, [N] lse), converting one chunk of rows at a time."""
    dtype = compute_dtype(logits)
    logp = logits.new_empty(logits.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in row_chunks(*logits.shape, logits.device):
        logp[start:end], lse[start:end] = _logp_lse(logits[start:end].to(dtype), targets[start:end])
    return logp, lse


def logprob_bwd(logits, targets, lse, grad_logp, inplace=False):
    """dlogits = grad_logp * (onehot - softmax) in logits' dtype; written over `logits` when inplace."""
    grad_logp = grad_logp.to(lse.dtype)
    if inplace and logits.dtype == lse.dtype:
        return _softmax_grad_(logits, targets, lse, grad_logp)
    out = logits if inplace else torch.empty_like(logits)
    for start, end in row_chunks(*logits.shape, logits.device):
        chunk = logits[start:end].to(lse.dtype, copy=True)
        out[start:end] = _softmax_grad_(chunk, targets[start:end], lse[start:end], grad_logp[start:end])
    return out


def logprob_step_(logits, targets, grad_of_logp):
    """One chunk of the one-sweep loss: log-probabilities, their upstream gradient, and dz in place.

    logits [rows, V] in the compute dtype is overwritten. grad_of_logp maps the chunk's [rows] logp to its
    [rows] upstream gradient (or None for a forward only). Returns (lse [rows], dz [rows, V] or None).
    On a CPU the exponentials dominate the elementwise work, so the buffer keeps e = exp(z - max) from the
    forward and the backward rescales it, dz = g (onehot - e / sum e): one exp per logit instead of two.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logits = logits[rows, targets]
    row_max = logits.amax(-1)
    e = logits.sub_(row_max[:, None]).exp_()  # [rows, V]
    total = e.sum(-1)
    lse = row_max + total.log()
    grad_logp = grad_of_logp(target_logits - lse)
    if grad_logp is None:
        return lse, None
    dz = e.mul_((-grad_logp / total)[:, None])
    dz[rows, targets] += grad_logp
    return lse, dz


def _candidate_of_token(lengths, n_tokens):
    """[N] index of the candidate that owns each token, from the [C] lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=n_tokens)


def rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty, margin, sft_reduction, *, max_group_size=None):
    """Scores, per-group hinge and SFT terms, and what the backward needs.

    Returns scores [C], rank [G], sft [G], coef [C] (net count of active hinge pairs: as the lower-rewarded
    side minus as the higher-rewarded side) and best [G] (the first highest-rewarded candidate).
    max_group_size (the largest k_g) sizes the [G, K, K] pair tensors; without it one host read finds it.
    """
    cu_seqlens, cu_groups = cu_seqlens.long(), cu_groups.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [C]
    group_sizes = cu_groups[1:] - cu_groups[:-1]  # [G]
    width = int(group_sizes.max()) if max_group_size is None else max_group_size
    slot = torch.arange(width, device=cu_groups.device)
    member = (cu_groups[:-1, None] + slot).clamp(max=len(lengths) - 1)  # [G, K] candidate index of each slot
    valid = slot < group_sizes[:, None]  # [G, K]

    sums = logp.new_zeros(len(lengths)).index_add_(0, _candidate_of_token(lengths, logp.numel()), logp)  # [C]
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


def rank_bwd(
    cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, length_penalty, sft_reduction,
    *, n_tokens=None, max_group_size=None,
):
    """[N] upstream gradient of every token's logp: dS_c for each token of candidate c (DESIGN.md section 2).

    grad_scores may be None; rank_scale and sft_scale are 0-d tensors (or floats). n_tokens (N) saves the host
    read that sizes the output; max_group_size is accepted for the kernels' signature and not needed here.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    lengths_f = lengths.to(coef.dtype)
    rank_scale = torch.as_tensor(rank_scale, dtype=coef.dtype, device=coef.device)
    sft_scale = torch.as_tensor(sft_scale, dtype=coef.dtype, device=coef.device)
    dp = rank_scale * coef if grad_scores is None else rank_scale * coef + grad_scores
    grad_sums = dp / lengths_f**length_penalty  # [C]
    sft_grad = sft_scale / lengths_f[best] if sft_reduction == "mean" else sft_scale.expand(best.shape)
    grad_sums = grad_sums.index_add(0, best, -sft_grad)
    return torch.repeat_interleave(grad_sums, lengths, output_size=n_tokens)
