"""The pure-PyTorch chunked path with chunks of a few rows, so that chunk edges fall inside candidates."""

import pytest
import torch

from rrhf_fast import chunked, reference


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 5 * 123)  # 5 rows of a 123-token vocabulary per chunk


def _inputs(seed, num_tokens=47, vocab=123, dim=40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    grad_logp = torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, targets, grad_logp


def test_linear_logprob_over_many_chunks(tiny_chunks):
    hidden, weight, bias, targets, grad_logp = _inputs(0)
    logp, lse = chunked.linear_logprob_fwd(hidden, weight, bias, targets)
    dh, dw, db = chunked.linear_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.token_logprobs_from_logits(leaves[0] @ leaves[1].T + leaves[2], targets)
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(lse, torch.logsumexp(hidden @ weight.T + bias, -1))
    for got, ref in zip((dh, dw, db), torch.autograd.grad((want * grad_logp).sum(), leaves)):
        torch.testing.assert_close(got, ref)


def test_linear_logprob_skips_unrequested_gradients(tiny_chunks):
    hidden, weight, _, targets, grad_logp = _inputs(1)
    _, lse = chunked.linear_logprob_fwd(hidden, weight, None, targets)
    dh, dw, db = chunked.linear_logprob_bwd(hidden, weight, None, targets, lse, grad_logp, compute_dh=False)
    assert dh is None and db is None and dw.shape == weight.shape


@pytest.mark.parametrize("inplace", [False, True])
def test_logprob_over_many_chunks(tiny_chunks, inplace):
    hidden, weight, bias, targets, grad_logp = _inputs(2)
    logits = (hidden @ weight.T + bias) * 4
    leaf = logits.clone().requires_grad_()
    want = reference.token_logprobs_from_logits(leaf, targets)
    (want_grad,) = torch.autograd.grad((want * grad_logp).sum(), [leaf])

    logp, lse = chunked.logprob_fwd(logits, targets)
    torch.testing.assert_close(logp, want)
    dlogits = chunked.logprob_bwd(logits, targets, lse, grad_logp, inplace=inplace)
    torch.testing.assert_close(dlogits, want_grad)
    assert (dlogits.data_ptr() == logits.data_ptr()) == inplace


@pytest.mark.parametrize("rows", [1, 6, 11, 47])
def test_group_chunks_cover_whole_groups(rows):
    seq_offsets = [0, 1, 6, 9, 16, 18, 27, 31, 37, 47]
    group_offsets = [0, 1, 4, 6, 9]
    runs = list(chunked._group_chunks(seq_offsets, group_offsets, rows))
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == 4
    for first, end, t0, t1 in runs:
        assert (t0, t1) == (seq_offsets[group_offsets[first]], seq_offsets[group_offsets[end]])
        assert t1 - t0 <= rows or end == first + 1  # a group larger than the budget gets a run of its own


@pytest.mark.parametrize("rows", [1, 11])
def test_linear_rrhf_over_many_chunks(monkeypatch, rows):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", rows * 123)
    hidden, weight, bias, targets, _ = _inputs(3)
    cu_seqlens = torch.tensor([0, 1, 6, 9, 16, 18, 27, 31, 37, 47])
    cu_groups = torch.tensor([0, 1, 4, 6, 9])
    rewards = torch.tensor([1.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    options = (0.7, 1.5, 0.5, 0.2, "mean")
    scores, rank, sft, _, best, lse, dh, dw, db = chunked.linear_rrhf_fwd(
        hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, options, chunked
    )
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.rrhf_loss(
        *leaves[:2], targets, cu_seqlens, rewards, cu_groups, bias=leaves[2],
        length_penalty=0.7, rank_weight=1.5, sft_weight=0.5, margin=0.2,
    )
    torch.testing.assert_close(scores, want.scores.detach())
    torch.testing.assert_close(rank.mean(), want.rank_loss.detach())
    torch.testing.assert_close(sft.mean(), want.sft_loss.detach())
    assert best.tolist() == [0, 1, 4, 7]  # the first of the tied 2.0s in group 2
    torch.testing.assert_close(lse, torch.logsumexp(hidden @ weight.T + bias, -1))
    for got, ref in zip((dh, dw, db), torch.autograd.grad(want.loss, leaves)):
        torch.testing.assert_close(got, ref)
