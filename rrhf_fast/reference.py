"""The naive RRHF loss in plain PyTorch: the oracle for every test and the baseline for every benchmark.

It materialises the full [N, V] logits, takes a log-softmax, gathers the target tokens and loops over
candidates and pairs in Python, so that each line can be checked against the maths by eye:

    logp_t   = z_t[y_t] - logsumexp(z_t)                        per response token
    p_c      = (sum over c's tokens of logp_t) / L_c ** alpha   score of candidate c (alpha = length_penalty)
    rank_g   = sum over pairs (i, j) of group g with r_i < r_j of max(0, p_i - p_j + margin)
    sft_g    = -(1 / L_b) * sum over b's tokens of logp_t       b = best-rewarded candidate, first on ties
               (sft_reduction="sum" drops the 1 / L_b)
    loss     = (1 / G) * sum_g (rank_weight * rank_g + sft_weight * sft_g)

`rank_loss` and `sft_loss` are the unweighted means over groups of rank_g and sft_g. Everything is computed
in the input dtype promoted to at least float32, so float64 inputs give a float64 oracle. Autograd gives the
gradients. Argument checking lives in `rrhf_fast.loss`; these functions trust their inputs. The oracle imports
nothing of the code it checks: its output is a NamedTuple of its own, with the fields of rrhf_fast.RRHFOutput.
"""

from typing import NamedTuple

import torch


class ReferenceOutput(NamedTuple):
    loss: torch.Tensor  # scalar: rank_weight * rank_loss + sft_weight * sft_loss
    rank_loss: torch.Tensor  # scalar: mean over groups of the pairwise hinge sum
    sft_loss: torch.Tensor  # scalar: mean over groups of the best candidate's negative log-likelihood
    scores: torch.Tensor  # [C]: length-normalised log-probability of every candidate

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] log-probability of each target token."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    return logp.gather(1, targets.long()[:, None])[:, 0]


def rrhf_loss_from_logprobs(
    logprobs,
    cu_seqlens,
    rewards,
    cu_groups,
    *,
    length_penalty=1.0,
    rank_weight=1.0,
    sft_weight=1.0,
    margin=0.0,
    sft_reduction="mean",
) -> ReferenceOutput:
    """The RRHF loss from [N] per-token log-probabilities."""
    logp = logprobs.to(_compute_dtype(logprobs))
    bounds = cu_seqlens.tolist()
    group_bounds = cu_groups.tolist()
    reward_list = rewards.tolist()
    sums = torch.stack([logp[bounds[c] : bounds[c + 1]].sum() for c in range(len(bounds) - 1)])
    lengths = torch.tensor([bounds[c + 1] - bounds[c] for c in range(len(bounds) - 1)], dtype=logp.dtype)
    scores = sums / lengths.to(logp.device) ** length_penalty

    rank_terms, sft_terms = [], []
    for g in range(len(group_bounds) - 1):
        first, last = group_bounds[g], group_bounds[g + 1]
        rank_g = logp.new_zeros(())
        for i in range(first, last):
            for j in range(first, last):
                if reward_list[i] < reward_list[j]:
                    rank_g = rank_g + torch.relu(scores[i] - scores[j] + margin)
        rank_terms.append(rank_g)
        best = max(range(first, last), key=lambda c: (reward_list[c], -c))  # highest reward, first on ties
        sft_g = -sums[best]
        if sft_reduction == "mean":
            sft_g = sft_g / lengths[best]
        sft_terms.append(sft_g)

    rank_loss = torch.stack(rank_terms).mean()
    sft_loss = torch.stack(sft_terms).mean()
    loss = rank_weight * rank_loss + sft_weight * sft_loss
    return ReferenceOutput(loss, rank_loss, sft_loss, scores)


def rrhf_loss_from_logits(logits, targets, cu_seqlens, rewards, cu_groups, **options) -> ReferenceOutput:
    """The RRHF loss from [N, V] logits whose row n predicts targets[n]; options as rrhf_loss_from_logprobs."""
    return rrhf_loss_from_logprobs(token_logprobs_from_logits(logits, targets), cu_seqlens, rewards, cu_groups, **options)


def _logits(hidden, weight, bias):
    dtype = _compute_dtype(hidden)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)


def rrhf_loss(hidden, weight, targets, cu_seqlens, rewards, cu_groups, *, bias=None, **options) -> ReferenceOutput:
    """The RRHF loss from hidden states [N, D] and an LM head weight [V, D] (+ bias [V]): logits = h W^T + b; options
    as rrhf_loss_from_logprobs."""
    return rrhf_loss_from_logits(_logits(hidden, weight, bias), targets, cu_seqlens, rewards, cu_groups, **options)


def sequence_scores(hidden, weight, targets, cu_seqlens, *, bias=None, length_penalty=1.0) -> torch.Tensor:
    """[C] length-normalised log-probability of every candidate: the model used as a reward model."""
    logp = token_logprobs_from_logits(_logits(hidden, weight, bias), targets)
    bounds = cu_seqlens.tolist()
    return torch.stack(
        [logp[bounds[c] : bounds[c + 1]].sum() / (bounds[c + 1] - bounds[c]) ** length_penalty for c in range(len(bounds) - 1)]
    )
