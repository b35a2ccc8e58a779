"""The RRHF ranking step: per-candidate scores, the pairwise hinge, the SFT term, and the token gradients.

One program per query group g. With logp the [N] per-token log-probabilities (from logprob),
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

A group's candidates are walked in blocks of BLOCK_K (a [BLOCK_K, BLOCK_T] token tile for the sums, a
[BLOCK_K, BLOCK_K] tile of pairs for the hinge), so any group size works with a fixed register footprint and
the launcher needs no host sync to size the tiles.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _group_bounds(
    cu_groups,  # [G + 1] group candidate offsets
    i_g,  # the group
):
    """First candidate and candidate count of group i_g (int64)."""
    p_first, p_end = cu_groups + i_g, cu_groups + i_g + 1
    c0 = tl.load(p_first).to(tl.int64)
    return c0, tl.load(p_end).to(tl.int64) - c0


@triton.jit
def _candidate_tokens(
    cu_seqlens,  # [C + 1] int32 / int64 candidate token offsets
    o_c,  # [BLOCK_K] candidate indices
    m_k,  # [BLOCK_K] which lanes hold a candidate of the group
):
    """[BLOCK_K] first token and token count of each candidate (int64). Padding lanes get length 0 so that no
    token loop touches them."""
    p_start, p_end = cu_seqlens + o_c, cu_seqlens + o_c + 1
    b_start = tl.load(p_start, mask=m_k, other=0).to(tl.int64)
    return b_start, tl.load(p_end, mask=m_k, other=0).to(tl.int64) - b_start


@triton.jit
def _length_norm(
    b_len,  # [BLOCK_K] token counts (0 on padding lanes)
    length_penalty,  # alpha, a float >= 0
):
    """[BLOCK_K] L ** alpha in fp32, as exp2(alpha log2 L) for L >= 1 (padding lanes count as 1); alpha = 1 takes
    L itself so the common case is exact."""
    b_lenf = tl.maximum(b_len, 1).to(tl.float32)
    return tl.where(length_penalty == 1.0, b_lenf, tl.exp2(length_penalty * tl.log2(b_lenf)))


@triton.jit
def _rank_fwd_kernel(
    logp,  # [N] fp32 per-token log-probabilities
    cu_seqlens,  # [C + 1] candidate token offsets
    rewards,  # [C] rewards, compared in their own dtype so near-ties are not merged by a cast
    cu_groups,  # [G + 1] group candidate offsets
    scores,  # [C] fp32 output: p_c (written in pass 1, read back in pass 2)
    rank,  # [G] fp32 output: rank_g
    sft,  # [G] fp32 output: sft_g
    coef,  # [C] fp32 output: net count of active hinge pairs of c
    best,  # [G] int64 output: global index of the best-rewarded candidate
    length_penalty,  # alpha
    margin,  # hinge margin
    SFT_MEAN: tl.constexpr,  # True: sft = -S_b / L_b; False: -S_b
    BLOCK_K: tl.constexpr,  # candidates per block
    BLOCK_T: tl.constexpr,  # tokens read per candidate per step
):
    i_g = tl.program_id(0)
    c0, k = _group_bounds(cu_groups, i_g)
    o_t = tl.arange(0, BLOCK_T)

    # pass 1, per block of candidates: token sums -> scores, and the running best (highest reward, first on
    # ties: a later block replaces it only with a strictly higher reward)
    b_rbest = tl.full((), float("-inf"), rewards.dtype.element_ty)
    b_kbest = tl.zeros((), tl.int64)
    b_sbest = tl.zeros((), tl.float32)
    b_lbest = tl.zeros((), tl.float32)
    for i_k in range(0, k, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < k
        b_start, b_len = _candidate_tokens(cu_seqlens, c0 + o_k, m_k)
        b_norm = _length_norm(b_len, length_penalty)
        # step along the block's longest candidate, masking the shorter ones; the loop adds elementwise and
        # reduces once after it (fewer shuffles, and Triton 3.6's thread-locality pass asserts on a
        # loop-carried reduction whose result is used twice)
        b_acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
        for i_t in range(0, tl.max(b_len, axis=0), BLOCK_T):
            m_t = (i_t + o_t[None, :]) < b_len[:, None]
            p_logp = logp + b_start[:, None] + i_t + o_t[None, :]
            # [BLOCK_K, BLOCK_T]
            b_acc += tl.load(p_logp, mask=m_t, other=0.0)
        b_sum = tl.sum(b_acc, axis=1)
        p_scores, p_r = scores + c0 + o_k, rewards + c0 + o_k
        tl.store(p_scores, b_sum / b_norm, mask=m_k)

        # [BLOCK_K]
        b_r = tl.load(p_r, mask=m_k, other=float("-inf"))
        b_rmax = tl.max(b_r, axis=0)
        b_kmax = tl.min(tl.where(m_k & (b_r == b_rmax), o_k, k), axis=0)  # first top reward of the block
        m_new = b_rmax > b_rbest
        b_rbest = tl.where(m_new, b_rmax, b_rbest)
        b_kbest = tl.where(m_new, b_kmax.to(tl.int64), b_kbest)
        b_sbest = tl.where(m_new, tl.sum(tl.where(o_k == b_kmax, b_sum, 0.0), axis=0), b_sbest)
        b_lbest = tl.where(m_new, tl.sum(tl.where(o_k == b_kmax, b_len.to(tl.float32), 0.0), axis=0), b_lbest)
    if SFT_MEAN:
        b_sbest = b_sbest / b_lbest
    p_sft, p_best = sft + i_g, best + i_g
    tl.store(p_sft, -b_sbest)
    tl.store(p_best, c0 + b_kbest)

    # pass 2 reads back the scores this program wrote: the barrier makes every thread's stores visible
    tl.debug_barrier()
    o_b = tl.arange(0, BLOCK_K)
    b_rank = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    for i_i in range(0, k, BLOCK_K):
        m_i = i_i + o_b < k
        p_pi, p_ri = scores + c0 + i_i + o_b, rewards + c0 + i_i + o_b
        # [BLOCK_K] rows: candidate i
        b_pi = tl.load(p_pi, mask=m_i, other=0.0)
        b_ri = tl.load(p_ri, mask=m_i, other=0.0)
        b_act = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        for i_j in range(0, k, BLOCK_K):
            m_j = i_j + o_b < k
            p_pj, p_rj = scores + c0 + i_j + o_b, rewards + c0 + i_j + o_b
            # [BLOCK_K] columns: candidate j
            b_pj = tl.load(p_pj, mask=m_j, other=0.0)
            b_rj = tl.load(p_rj, mask=m_j, other=0.0)
            m_ij = m_i[:, None] & m_j[None, :]
            # [BLOCK_K, BLOCK_K]: i below j in reward (i is the lower side of the pair) ...
            m_lo = m_ij & (b_ri[:, None] < b_rj[None, :])
            b_hinge = b_pi[:, None] - b_pj[None, :] + margin
            b_rank += tl.where(m_lo, tl.maximum(b_hinge, 0.0), 0.0)
            # ... and i above j (i is the higher side: its hinge is p_j - p_i + margin)
            m_hi = m_ij & (b_rj[None, :] < b_ri[:, None])
            b_hinge_hi = b_pj[None, :] - b_pi[:, None] + margin
            b_act += tl.where(m_lo & (b_hinge > 0.0), 1.0, 0.0) - tl.where(m_hi & (b_hinge_hi > 0.0), 1.0, 0.0)
        p_coef = coef + c0 + i_i + o_b
        tl.store(p_coef, tl.sum(b_act, axis=1), mask=m_i)
    p_rank = rank + i_g
    tl.store(p_rank, tl.sum(tl.sum(b_rank, axis=1), axis=0))


@triton.jit
def _rank_bwd_kernel(
    grad_logp,  # [N] fp32 output: d loss / d logp of every token
    cu_seqlens,  # [C + 1] candidate token offsets
    cu_groups,  # [G + 1] group candidate offsets
    coef,  # [C] fp32 from the forward
    best,  # [G] int64 from the forward
    grad_scores,  # [C] fp32 upstream gradient of the scores (unused when HAS_GRAD_SCORES is False)
    rank_scale,  # 0-d fp32 tensor: d loss / d rank_g, read on device so the caller needs no host sync
    sft_scale,  # 0-d fp32 tensor: d loss / d sft_g
    length_penalty,  # alpha
    SFT_MEAN: tl.constexpr,  # True: the SFT term divides by L_b; False: it does not
    HAS_GRAD_SCORES: tl.constexpr,  # whether grad_scores holds a gradient
    BLOCK_K: tl.constexpr,  # candidates per block
    BLOCK_T: tl.constexpr,  # tokens written per candidate per step
):
    i_g = tl.program_id(0)
    c0, k = _group_bounds(cu_groups, i_g)
    p_best = best + i_g
    b_rank_scale = tl.load(rank_scale).to(tl.float32)
    b_sft_scale = tl.load(sft_scale).to(tl.float32)
    b_kbest = tl.load(p_best) - c0
    o_t = tl.arange(0, BLOCK_T)
    for i_k in range(0, k, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < k
        b_start, b_len = _candidate_tokens(cu_seqlens, c0 + o_k, m_k)
        b_norm = _length_norm(b_len, length_penalty)
        p_coef, p_gs = coef + c0 + o_k, grad_scores + c0 + o_k
        # [BLOCK_K]
        b_dp = b_rank_scale * tl.load(p_coef, mask=m_k, other=0.0)
        if HAS_GRAD_SCORES:
            b_dp += tl.load(p_gs, mask=m_k, other=0.0).to(tl.float32)
        if SFT_MEAN:
            b_dsft = b_sft_scale / tl.maximum(b_len, 1).to(tl.float32)
        else:
            b_dsft = b_sft_scale + tl.zeros((BLOCK_K,), dtype=tl.float32)
        b_ds = b_dp / b_norm - tl.where(o_k == b_kbest, b_dsft, 0.0)

        # every token of c gets dS_c; the [BLOCK_K, BLOCK_T] broadcast writes the block in lockstep
        b_ds_tile = b_ds[:, None] + tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
        for i_t in range(0, tl.max(b_len, axis=0), BLOCK_T):
            m_t = (i_t + o_t[None, :]) < b_len[:, None]
            p_g = grad_logp + b_start[:, None] + i_t + o_t[None, :]
            tl.store(p_g, b_ds_tile, mask=m_t)


# ----------------------------------------------------------------------------------------------- launchers

def _blocks(device: torch.device, max_group_size) -> dict:
    """BLOCK_K: 32 candidates per block on GPU (a 32 x 32 pair tile is 8 registers per thread at 4 warps),
    fewer when the caller says its groups are smaller; 4 under the interpreter so the tests' groups span
    several blocks. BLOCK_T: ~4096 logp values per step of the token loop (wide rows for small blocks)."""
    block_k = 32 if device.type == "cuda" else 4
    if max_group_size is not None:
        block_k = min(block_k, triton.next_power_of_2(max(int(max_group_size), 1)))
    block_t = max(16, min(1024, 4096 // block_k)) if device.type == "cuda" else 16
    return dict(BLOCK_K=block_k, BLOCK_T=block_t, num_warps=4 if device.type == "cuda" else 1)


def rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty: float, margin: float,
             sft_reduction: str, *, max_group_size=None):
    """-> (scores [C] fp32, rank [G] fp32, sft [G] fp32, coef [C] fp32, best [G] int64).

    Any group size works. max_group_size (optional, the largest k_g) only narrows the tiles for small groups."""
    logp = logp.contiguous().float()
    cu_seqlens, cu_groups, rewards = cu_seqlens.contiguous(), cu_groups.contiguous(), rewards.contiguous()
    if not rewards.is_floating_point():
        rewards = rewards.float()  # integer rewards: the running best starts at -inf
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
            **_blocks(device, max_group_size),
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
            SFT_MEAN=sft_reduction == "mean", HAS_GRAD_SCORES=has_gs, **_blocks(device, max_group_size),
        )
    return grad_logp
