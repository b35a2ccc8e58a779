"""The RRHF ranking step: per-candidate scores, the pairwise hinge, the SFT term, and the token gradients.

One program per query group g. With logp the [N] per-token log-probabilities (from logprob / linear_logprob),
candidate c owning tokens cu_seqlens[c] : cu_seqlens[c + 1] and group g owning candidates
cu_groups[g] : cu_groups[g + 1]:

    S_c      = sum of logp over c's tokens           L_c = its token count
    p_c      = S_c / L_c ** alpha                    alpha = length_penalty
    rank_g   = sum over pairs (i, j) in g with r_i < r_j of max(0, p_i - p_j + margin)
    b        = argmax_c r_c in g, first on ties
    sft_g    = -S_b / L_b   ("mean")   or   -S_b   ("sum")
    coef_c   = #{j : r_c < r_j, p_c - p_j + margin > 0} - #{j : r_j < r_c, p_j - p_c + margin > 0}
               (a hinge exactly at 0 is inactive, like torch.relu's zero gradient at 0)

Backward, given the scalars rank_scale = d loss / d rank_g and sft_scale = d loss / d sft_g (the same for every
group: the caller folds 1/G and the weights in) and an optional upstream gradient of the scores:

    dp_c       = rank_scale * coef_c + grad_scores_c
    grad_logp_t = dp_c / L_c ** alpha - [c == b] * sft_scale * (1 / L_b if "mean" else 1)    for t in c

The naive version (`rrhf_fast.reference`) loops over candidates and pairs in Python: O(C) tiny kernels for the
sums and O(sum_g k_g^2) for the pairs, each a launch and, through autograd, a few more in the backward. Here
the forward reads logp once (4N bytes) and writes O(C) values, the backward writes 4N bytes; one launch each.
The pair tile is [BLOCK_K, BLOCK_K] in registers with BLOCK_K = next power of two >= the largest group.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _group_candidates(
    cu_seqlens,  # [C + 1] int32 / int64
    cu_groups,  # [G + 1] int32 / int64
    i_g,  # this program's group
    length_penalty,  # alpha, a float >= 0
    BLOCK_K: tl.constexpr,
):
    """The group's candidates as [BLOCK_K] vectors: global index, mask, first token, length, L ** alpha."""
    c0 = tl.load(cu_groups + i_g).to(tl.int64)
    c1 = tl.load(cu_groups + i_g + 1).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < c1 - c0
    o_c = c0 + o_k
    # [BLOCK_K]; padding lanes get length 0 so that no token loop touches them
    b_start = tl.load(cu_seqlens + o_c, mask=m_k, other=0).to(tl.int64)
    b_len = tl.load(cu_seqlens + o_c + 1, mask=m_k, other=0).to(tl.int64) - b_start
    b_lenf = tl.maximum(b_len, 1).to(tl.float32)
    # L ** alpha as exp2(alpha log2 L) (L >= 1); alpha = 1 takes L itself so the common case is exact
    b_norm = tl.where(length_penalty == 1.0, b_lenf, tl.exp2(length_penalty * tl.log2(b_lenf)))
    return c0, o_k, m_k, o_c, b_start, b_len, b_lenf, b_norm


@triton.jit
def _rank_fwd_kernel(
    logp,  # [N] fp32 per-token log-probabilities
    cu_seqlens,  # [C + 1] candidate token offsets
    rewards,  # [C] rewards, compared in their own dtype so near-ties are not merged by a cast
    cu_groups,  # [G + 1] group candidate offsets
    scores,  # [C] fp32 output: p_c
    rank,  # [G] fp32 output: rank_g
    sft,  # [G] fp32 output: sft_g
    coef,  # [C] fp32 output: net count of active hinge pairs of c
    best,  # [G] int64 output: global index of the best-rewarded candidate
    length_penalty,  # alpha
    margin,  # hinge margin
    SFT_MEAN: tl.constexpr,  # True: sft = -S_b / L_b; False: -S_b
    BLOCK_K: tl.constexpr,  # next power of two >= the largest group
    BLOCK_T: tl.constexpr,  # tokens read per candidate per step
):
    i_g = tl.program_id(0)
    c0, o_k, m_k, o_c, b_start, b_len, b_lenf, b_norm = _group_candidates(
        cu_seqlens, cu_groups, i_g, length_penalty, BLOCK_K)

    # token sums of all candidates at once: step along the longest candidate, masking the shorter ones. The
    # loop adds elementwise and reduces once after it: fewer shuffles, and Triton 3.6's thread-locality pass
    # asserts on a loop-carried reduction whose result is used twice, as b_sum is below
    o_t = tl.arange(0, BLOCK_T)
    b_acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, tl.max(b_len, axis=0), BLOCK_T):
        m_t = (t0 + o_t[None, :]) < b_len[:, None]
        # [BLOCK_K, BLOCK_T]
        b_acc += tl.load(logp + b_start[:, None] + t0 + o_t[None, :], mask=m_t, other=0.0)
    b_sum = tl.sum(b_acc, axis=1)
    b_p = b_sum / b_norm
    tl.store(scores + o_c, b_p, mask=m_k)

    # [BLOCK_K]
    b_r = tl.load(rewards + o_c, mask=m_k, other=0.0)
    # [BLOCK_K, BLOCK_K]: row i, column j; a pair counts when r_i < r_j (ties make no pair)
    m_pair = m_k[:, None] & m_k[None, :] & (b_r[:, None] < b_r[None, :])
    b_hinge = b_p[:, None] - b_p[None, :] + margin
    tl.store(rank + i_g, tl.sum(tl.sum(tl.where(m_pair, tl.maximum(b_hinge, 0.0), 0.0), axis=1), axis=0))
    b_act = tl.where(m_pair & (b_hinge > 0.0), 1.0, 0.0)
    # c as the lower-rewarded side (row sums) minus c as the higher-rewarded side (column sums)
    tl.store(coef + o_c, tl.sum(b_act, axis=1) - tl.sum(b_act, axis=0), mask=m_k)

    # best = highest reward, the first (lowest index) on ties
    b_rmax = tl.max(tl.where(m_k, b_r, float("-inf")), axis=0)
    i_b = tl.min(tl.where(m_k & (b_r == b_rmax), o_k, BLOCK_K), axis=0)
    b_sft = -tl.sum(tl.where(o_k == i_b, b_sum, 0.0), axis=0)
    if SFT_MEAN:
        b_sft = b_sft / tl.sum(tl.where(o_k == i_b, b_lenf, 0.0), axis=0)
    tl.store(sft + i_g, b_sft)
    tl.store(best + i_g, c0 + i_b)


@triton.jit
def _rank_bwd_kernel(
    grad_logp,  # [N] fp32 output: d loss / d logp of every token
    cu_seqlens,  # [C + 1]
    cu_groups,  # [G + 1]
    coef,  # [C] fp32 from the forward
    best,  # [G] int64 from the forward
    grad_scores,  # [C] fp32 upstream gradient of the scores (unused when HAS_GRAD_SCORES is False)
    rank_scale,  # 0-d fp32 tensor: d loss / d rank_g, read on device so the caller needs no host sync
    sft_scale,  # 0-d fp32 tensor: d loss / d sft_g
    length_penalty,  # alpha
    SFT_MEAN: tl.constexpr,
    HAS_GRAD_SCORES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    i_g = tl.program_id(0)
    c0, o_k, m_k, o_c, b_start, b_len, b_lenf, b_norm = _group_candidates(
        cu_seqlens, cu_groups, i_g, length_penalty, BLOCK_K)
    b_rank_scale = tl.load(rank_scale).to(tl.float32)
    b_sft_scale = tl.load(sft_scale).to(tl.float32)

    # [BLOCK_K]
    b_dp = b_rank_scale * tl.load(coef + o_c, mask=m_k, other=0.0)
    if HAS_GRAD_SCORES:
        b_dp += tl.load(grad_scores + o_c, mask=m_k, other=0.0).to(tl.float32)
    i_b = tl.load(best + i_g) - c0
    if SFT_MEAN:
        b_dsft = b_sft_scale / b_lenf
    else:
        b_dsft = b_sft_scale + tl.zeros((BLOCK_K,), dtype=tl.float32)
    b_ds = b_dp / b_norm - tl.where(o_k == i_b, b_dsft, 0.0)

    # every token of c gets dS_c; the [BLOCK_K, BLOCK_T] broadcast writes all candidates in lockstep
    o_t = tl.arange(0, BLOCK_T)
    b_ds_tile = b_ds[:, None] + tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, tl.max(b_len, axis=0), BLOCK_T):
        m_t = (t0 + o_t[None, :]) < b_len[:, None]
        tl.store(grad_logp + b_start[:, None] + t0 + o_t[None, :], b_ds_tile, mask=m_t)


# ----------------------------------------------------------------------------------------------- launchers

MAX_GROUP_SIZE = 1024  # BLOCK_K cap: the [BLOCK_K, BLOCK_K] pair tile lives in registers


def _blocks(cu_groups: torch.Tensor, max_group_size) -> dict:
    if max_group_size is None:
        # one host sync; callers that know the largest group (they built cu_groups) should pass it
        max_group_size = int((cu_groups[1:] - cu_groups[:-1]).max().item()) if cu_groups.numel() > 1 else 1
    if max_group_size > MAX_GROUP_SIZE:
        raise ValueError(f"a group has {max_group_size} candidates; the rank kernel takes at most "
                         f"{MAX_GROUP_SIZE} per group: split the group or use the torch backend")
    block_k = triton.next_power_of_2(max(int(max_group_size), 1))
    # ~4096 logp values per step of the token loop, whatever the group size: wide rows for small groups
    block_t = max(16, min(1024, 4096 // block_k))
    if not cu_groups.is_cuda:
        block_t = min(block_t, 16)  # interpreter: short steps so tiny test candidates span several
    num_warps = 4 if block_k <= 32 else (8 if block_k <= 128 else 16)
    return dict(BLOCK_K=block_k, BLOCK_T=block_t, num_warps=num_warps if cu_groups.is_cuda else 1)


def rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty: float, margin: float,
             sft_reduction: str, *, max_group_size=None):
    """-> (scores [C] fp32, rank [G] fp32, sft [G] fp32, coef [C] fp32, best [G] int64).

    max_group_size: the largest k_g if the caller knows it (saves a host sync); at most MAX_GROUP_SIZE."""
    logp = logp.contiguous().float()
    cu_seqlens, cu_groups, rewards = cu_seqlens.contiguous(), cu_groups.contiguous(), rewards.contiguous()
    C, G = cu_seqlens.numel() - 1, cu_groups.numel() - 1
    device = logp.device
    scores = torch.empty(C, dtype=torch.float32, device=device)
    coef = torch.empty(C, dtype=torch.float32, device=device)
    rank = torch.empty(G, dtype=torch.float32, device=device)
    sft = torch.empty(G, dtype=torch.float32, device=device)
    best = torch.empty(G, dtype=torch.int64, device=device)
    if G > 0:
        _rank_fwd_kernel[(G,)](
            logp, cu_seqlens, rewards, cu_groups, scores, rank, sft, coef, best,
            float(length_penalty), float(margin), SFT_MEAN=sft_reduction == "mean",
            **_blocks(cu_groups, max_group_size),
        )
    return scores, rank, sft, coef, best


def rank_bwd(cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, length_penalty: float,
             sft_reduction: str, *, n_tokens=None, max_group_size=None):
    """-> grad_logp [N] fp32, N = cu_seqlens[-1] (pass n_tokens to save the host sync that reads it).

    grad_scores may be None (no upstream gradient on the scores); rank_scale and sft_scale are 0-d tensors
    on the same device (python floats are accepted too)."""
    cu_seqlens, cu_groups = cu_seqlens.contiguous(), cu_groups.contiguous()
    coef, best = coef.contiguous(), best.contiguous()
    device = coef.device
    if n_tokens is None:
        n_tokens = int(cu_seqlens[-1].item())
    rank_scale = torch.as_tensor(rank_scale, dtype=torch.float32, device=device)
    sft_scale = torch.as_tensor(sft_scale, dtype=torch.float32, device=device)
    grad_logp = torch.zeros(n_tokens, dtype=torch.float32, device=device)
    G = cu_groups.numel() - 1
    if G > 0:
        has_gs = grad_scores is not None
        _rank_bwd_kernel[(G,)](
            grad_logp, cu_seqlens, cu_groups, coef, best,
            grad_scores.contiguous() if has_gs else coef, rank_scale, sft_scale, float(length_penalty),
            SFT_MEAN=sft_reduction == "mean", HAS_GRAD_SCORES=has_gs, **_blocks(cu_groups, max_group_size),
        )
    return grad_logp
