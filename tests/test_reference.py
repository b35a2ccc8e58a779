"""The naive reference against values worked out by hand."""

import math

import pytest
import torch

from rrhf_fast import reference

# Every row of logits is [ln 3, 0]: token 0 has probability 3/4 and token 1 has 1/4.
LOG_3_4, LOG_1_4 = math.log(3 / 4), math.log(1 / 4)


def _golden_batch():
    """Two groups over a two-token vocabulary.

    group 1: A = [0]     reward 0   p_A = ln(3/4)                   = -0.287682
             B = [1, 1]  reward 1   p_B = 2 ln(1/4) / 2 = ln(1/4)   = -1.386294
    group 2: C = [0]     reward 2   p_C = ln(3/4)
             D = [1, 1]  reward 2   p_D = ln(1/4)                   (tied with C: no pair, C is best)
             E = [0, 1]  reward 0   p_E = (ln(3/4) + ln(1/4)) / 2   = -0.836988
    """
    targets = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1])
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(len(targets), 1)
    cu_seqlens = torch.tensor([0, 1, 3, 4, 6, 8])
    rewards = torch.tensor([0.0, 1.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    cu_groups = torch.tensor([0, 2, 5])
    return logits, targets, cu_seqlens, rewards, cu_groups


def test_golden_value_mean():
    """rank_1 = max(0, p_A - p_B) = ln 3                        (A has the lower reward)
    rank_2 = max(0, p_E - p_C) + max(0, p_E - p_D) = 0 + (ln(3/16)/2 - ln(1/4)) = ln(3)/2
    sft_1  = -(2 ln(1/4)) / 2 = ln 4      (best of group 1 is B, two tokens)
    sft_2  = -ln(3/4) = ln(4/3)           (best of group 2 is C, the first of the tied pair)
    rank_loss = (ln 3 + ln(3)/2) / 2 = 0.75 ln 3          = 0.823959
    sft_loss  = (ln 4 + ln(4/3)) / 2 = ln(16/3) / 2       = 0.836988
    loss      = rank_loss + sft_loss                       = 1.660947
    """
    out = reference.rrhf_loss_from_logits(*_golden_batch())
    torch.testing.assert_close(out.scores, torch.tensor([LOG_3_4, LOG_1_4, LOG_3_4, LOG_1_4, (LOG_3_4 + LOG_1_4) / 2], dtype=torch.float64))
    assert out.rank_loss.item() == pytest.approx(0.75 * math.log(3), rel=1e-12)
    assert out.sft_loss.item() == pytest.approx(math.log(16 / 3) / 2, rel=1e-12)
    assert out.loss.item() == pytest.approx(1.660947, abs=1e-6)


def test_golden_value_options():
    """margin 0.1, length_penalty 0, sft_reduction "sum", rank_weight 2, sft_weight 0.5:
    scores are plain sums: p_A = ln(3/4), p_B = 2 ln(1/4), p_C = ln(3/4), p_D = 2 ln(1/4), p_E = ln(3/16)
    rank_1 = max(0, p_A - p_B + 0.1) = ln(3/4) - 2 ln(1/4) + 0.1 = ln 12 + 0.1
    rank_2 = max(0, p_E - p_C + 0.1) + max(0, p_E - p_D + 0.1) = 0 + (ln(3/16) - 2 ln(1/4) + 0.1) = ln 3 + 0.1
    sft_1 = -2 ln(1/4) = ln 16;  sft_2 = -ln(3/4) = ln(4/3)
    loss = (2 (ln 12 + ln 3 + 0.2) + 0.5 (ln 16 + ln(4/3))) / 2 = ln 36 + 0.2 + ln(64/3) / 4
    """
    options = dict(margin=0.1, length_penalty=0.0, sft_reduction="sum", rank_weight=2.0, sft_weight=0.5)
    out = reference.rrhf_loss_from_logits(*_golden_batch(), **options)
    assert out.rank_loss.item() == pytest.approx((math.log(36) + 0.2) / 2, rel=1e-12)
    assert out.sft_loss.item() == pytest.approx(math.log(64 / 3) / 2, rel=1e-12)
    assert out.loss.item() == pytest.approx(math.log(36) + 0.2 + math.log(64 / 3) / 4, rel=1e-12)


def test_linear_form_equals_logits_form():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(8, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    _, targets, cu_seqlens, rewards, cu_groups = _golden_batch()
    targets = torch.randint(0, 7, (8,))
    from_head = reference.rrhf_loss(hidden, weight, targets, cu_seqlens, rewards, cu_groups, bias=bias)
    from_logits = reference.rrhf_loss_from_logits(hidden @ weight.T + bias, targets, cu_seqlens, rewards, cu_groups)
    for a, b in zip(from_head, from_logits):
        torch.testing.assert_close(a, b)
    scores = reference.sequence_scores(hidden, weight, targets, cu_seqlens, bias=bias)
    torch.testing.assert_close(scores, from_head.scores)
