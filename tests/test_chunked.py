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
