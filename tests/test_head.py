"""rrhf_fast.head's loops with chunks of a few rows, so that chunk edges fall inside candidates, for both `ops`
modules: rrhf_fast.torch_ops (in float64) and rrhf_fast.kernels (fp32, through the Triton interpreter on CPU)."""

from types import SimpleNamespace

import pytest
import torch

from rrhf_fast import head, kernels, loss, reference, torch_ops
from rrhf_fast.loss import LossOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (ops, dtype, atol, rtol): the torch ops keep float64 exact to rounding; the kernels accumulate in fp32
OPS = [
    pytest.param(torch_ops, torch.float64, 1e-10, 1e-10, id="torch_ops"),
    pytest.param(kernels, torch.float32, 1e-5, 1e-5, id="kernels"),
]


def _tiny_chunks(monkeypatch, rows, vocab=123):
    # the CUDA constant too, so that a GPU run splits the same way
    for name in ("CHUNK_ELEMENTS", "CUDA_CHUNK_ELEMENTS"):
        monkeypatch.setattr(head, name, rows * vocab)


def _inputs(seed, dtype, num_tokens=47, vocab=123, dim=40):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(num_tokens, dim, generator=gen), torch.randn(vocab, dim, generator=gen) / dim**0.5 * 3
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    grad_logp = torch.randn(num_tokens, generator=gen)
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in (hidden, weight, bias, targets, grad_logp)]


def _close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("ops, dtype, atol, rtol", OPS)
def test_linear_logprob_over_many_chunks(monkeypatch, ops, dtype, atol, rtol):
    _tiny_chunks(monkeypatch, rows=5)  # ten chunks of 5 rows (the last of 2)
    hidden, weight, bias, targets, grad_logp = _inputs(0, dtype)
    logp, lse = head.linear_logprob_fwd(hidden, weight, bias, targets, ops)
    dh, dw, db = head.linear_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp, ops)

    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.token_logprobs_from_logits(leaves[0] @ leaves[1].T + leaves[2], targets)
    _close(logp, want, atol, rtol)
    _close(lse, torch.logsumexp(reference._logits(*leaves).detach(), -1), atol, rtol)
    for got, ref in zip((dh, dw, db), torch.autograd.grad((want * grad_logp.double()).sum(), leaves)):
        assert got.dtype == dtype
        _close(got, ref, atol, rtol)


@pytest.mark.parametrize("ops, dtype, atol, rtol", OPS)
def test_linear_logprob_skips_unrequested_gradients(monkeypatch, ops, dtype, atol, rtol):
    _tiny_chunks(monkeypatch, rows=5)
    hidden, weight, _, targets, grad_logp = _inputs(1, dtype)
    _, lse = head.linear_logprob_fwd(hidden, weight, None, targets, ops)
    dh, dw, db = head.linear_logprob_bwd(hidden, weight, None, targets, lse, grad_logp, ops, compute_dh=False)
    assert dh is None and db is None
    leaves = [hidden.double(), weight.double().requires_grad_()]
    want = reference.token_logprobs_from_logits(leaves[0] @ leaves[1].T, targets)
    (dw_ref,) = torch.autograd.grad((want * grad_logp.double()).sum(), leaves[1:])
    _close(dw, dw_ref, atol, rtol)


@pytest.mark.parametrize("rows", [1, 6, 11, 47])
def test_group_chunks_cover_whole_groups(rows):
    seq_offsets = [0, 1, 6, 9, 16, 18, 27, 31, 37, 47]
    group_offsets = [0, 1, 4, 6, 9]
    runs = list(head._group_chunks(seq_offsets, group_offsets, rows))
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == 4
    for first, end, t0, t1 in runs:
        assert (t0, t1) == (seq_offsets[group_offsets[first]], seq_offsets[group_offsets[end]])
        assert t1 - t0 <= rows or end == first + 1  # a group larger than the budget gets a run of its own


# nine candidates in four groups (sizes 1, 3, 2, 3) over N = 47 tokens, candidates of length 1 and 2, a tie for
# the top reward in group 2 (candidates 1 and 2)
CU_SEQLENS = [0, 1, 6, 9, 16, 18, 27, 31, 37, 47]
CU_GROUPS = [0, 1, 4, 6, 9]
REWARDS = [1.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0, 2.0, 1.0]
OPTIONS = LossOptions(length_penalty=0.7, rank_weight=1.5, sft_weight=0.5, margin=0.2, sft_reduction="mean")


def _batch(dtype):
    return (
        torch.tensor(CU_SEQLENS, device=DEVICE),
        torch.tensor(REWARDS, dtype=dtype, device=DEVICE),
        torch.tensor(CU_GROUPS, device=DEVICE),
    )


@pytest.mark.parametrize("rows", [1, 11])  # every group a chunk of its own; two or three groups a chunk
@pytest.mark.parametrize("ops, dtype, atol, rtol", OPS)
def test_linear_rrhf_over_many_chunks(monkeypatch, ops, dtype, atol, rtol, rows):
    _tiny_chunks(monkeypatch, rows)
    hidden, weight, bias, targets, _ = _inputs(3, dtype)
    cu_seqlens, rewards, cu_groups = _batch(dtype)
    sweep = head.linear_rrhf_fwd(hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, OPTIONS, ops)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.rrhf_loss(*leaves[:2], targets, cu_seqlens, rewards.double(), cu_groups, bias=leaves[2], **OPTIONS._asdict())
    _close(sweep.scores, want.scores.detach(), atol, rtol)
    _close(sweep.rank.mean(), want.rank_loss.detach(), atol, rtol)
    _close(sweep.sft.mean(), want.sft_loss.detach(), atol, rtol)
    assert sweep.best.tolist() == [0, 1, 4, 7]  # the first of the tied 2.0s in group 2
    _close(sweep.lse, torch.logsumexp(reference._logits(*leaves).detach(), -1), atol, rtol)
    for got, ref in zip(sweep.grads, torch.autograd.grad(want.loss, leaves)):
        assert got.dtype == dtype
        _close(got, ref, atol, rtol)


def test_bias_gradient_of_a_bf16_chunk_accumulates_in_fp32():
    """The kernels hand the loops dz in the buffer's dtype (bf16 here). Its column sums must go into the fp32 db
    accumulator as fp32 sums: a bf16 sum (dz.sum(0)) rounds each chunk's share to 8 significant bits, a relative
    error of up to 2^-9 = 2e-3 per chunk, where the fp32 sum of 7 rows is good to about 1e-7."""
    gen = torch.Generator().manual_seed(6)
    dz = torch.randn(7, 123, generator=gen).bfloat16()
    h, weight = torch.randn(7, 40, generator=gen).bfloat16(), torch.randn(123, 40, generator=gen).bfloat16()
    db = torch.zeros(123)
    head._multiply_out(dz, h, weight, None, None, db)
    _close(db, dz.double().sum(0), 1e-6, 1e-6)


@pytest.mark.parametrize("ops", [torch_ops, kernels], ids=["torch_ops", "kernels"])
def test_linear_rrhf_bf16_gradients(monkeypatch, ops):
    """bf16 inputs, every group a chunk of its own: dh, dW and db in bf16 against the reference in float64 on
    the same bf16 values, relative to each gradient's scale."""
    _tiny_chunks(monkeypatch, rows=1)
    hidden, weight, bias, targets, _ = _inputs(4, torch.bfloat16)
    cu_seqlens, rewards, cu_groups = _batch(torch.float32)
    sweep = head.linear_rrhf_fwd(hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, OPTIONS, ops)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.rrhf_loss(*leaves[:2], targets, cu_seqlens, rewards, cu_groups, bias=leaves[2], **OPTIONS._asdict())
    for got, ref in zip(sweep.grads, torch.autograd.grad(want.loss, leaves)):
        assert got.dtype == torch.bfloat16
        # relative to the gradient's scale: dz is rounded to bf16 before the matmuls, as on tensor cores
        scale = ref.abs().max()
        _close(got / scale, ref / scale, 1e-2, 0)


def _recording(ops, calls):
    """`ops` with rank_fwd / rank_bwd wrapped to record the keyword arguments of each call."""

    def recorded(name):
        def call(*args, **kwargs):
            calls.append((name, kwargs))
            return getattr(ops, name)(*args, **kwargs)

        return call

    members = {name: getattr(ops, name) for name in kernels.__all__}
    return SimpleNamespace(**{**members, "rank_fwd": recorded("rank_fwd"), "rank_bwd": recorded("rank_bwd")})


@pytest.mark.parametrize("entry", ["rrhf_loss", "rrhf_loss_from_logits"])
def test_rank_ops_get_host_sizes(monkeypatch, entry):
    """Every rank op call, forward and backward (also the two-pass one for gradients on rank_loss, sft_loss and
    scores), is given n_tokens and max_group_size, so that no kernel reads a size back from the device."""
    calls = []
    monkeypatch.setattr(loss, "torch_ops", _recording(torch_ops, calls))
    hidden, weight, bias, targets, _ = _inputs(5, torch.float64)
    cu_seqlens, rewards, cu_groups = _batch(torch.float64)
    hidden.requires_grad_()
    if entry == "rrhf_loss":
        out = loss.rrhf_loss(hidden, weight, targets, cu_seqlens, rewards, cu_groups, bias=bias, backend="torch")
    else:
        logits = reference._logits(hidden, weight, bias)
        out = loss.rrhf_loss_from_logits(logits, targets, cu_seqlens, rewards, cu_groups, backend="torch")
    (out.loss + out.rank_loss + out.sft_loss + out.scores.sum()).backward()
    assert {name for name, _ in calls} == {"rank_fwd", "rank_bwd"}
    for name, kwargs in calls:  # one chunk holds the whole batch: 47 tokens, groups of up to 3 candidates
        assert kwargs["max_group_size"] == 3, name
        assert name == "rank_fwd" or kwargs["n_tokens"] == 47
