"""pytest-benchmark: rrhf_fast.rrhf_loss forward + backward at a small size, for each backend.

What is timed: the loss of a packed batch from hidden states and the LM head (4 groups of 4 candidates, 8 to 40
tokens each, D = 128, V = 4096, fp32), then the gradients of hidden and weight, on one CPU thread. Backends: "reference" (the naive
baseline, rrhf_fast.reference) and "torch" on CPU, "triton" on CUDA only (skipped without CUDA). Before timing,
each backend's loss and gradients are checked against the reference's.

pyproject's addopts hold --benchmark-disable, so a plain `python -m pytest` (CI) runs each benchmark once, untimed,
to keep it from rotting. To time it:

    python -m pytest benchmarks/test_bench_loss.py --benchmark-enable
"""

import pytest
import torch

import rrhf_fast
from rrhf_fast import reference

GROUPS, K, DIM, VOCAB = 4, 4, 128, 4096


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Time on one CPU thread: idle OpenMP threads spin, and on a shared machine a spinning thread that loses its
    core stalls the next parallel region, which made timings 10 to 50 times slower at random."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CASES = [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param(
        "triton",
        "cuda",
        id="triton-cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def make_inputs(device, seed=0):
    """A random packed batch: hidden and weight (leaves that need gradients) and the loss-side index tensors."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (GROUPS * K,), generator=gen)
    num_tokens = int(lengths.sum())
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return dict(
        hidden=(torch.randn(num_tokens, DIM, generator=gen) / DIM**0.5).to(device).requires_grad_(),
        weight=torch.randn(VOCAB, DIM, generator=gen).to(device).requires_grad_(),
        targets=torch.randint(VOCAB, (num_tokens,), generator=gen).to(device),
        cu_seqlens=cu_seqlens.to(device),
        rewards=torch.randn(GROUPS * K, generator=gen).to(device),
        cu_groups=torch.arange(0, GROUPS * K + 1, K).to(device),
    )


def loss_and_grads(loss_fn, inputs):
    """Forward and backward once: the loss and the gradients of hidden and weight."""
    loss = loss_fn(**inputs).loss
    return (loss.detach(), *torch.autograd.grad(loss, [inputs["hidden"], inputs["weight"]]))


@pytest.mark.parametrize("backend, device", CASES)
def test_rrhf_loss_forward_backward(benchmark, backend, device):
    inputs = make_inputs(device)
    if backend == "reference":
        loss_fn = reference.rrhf_loss
    else:
        loss_fn = lambda **kw: rrhf_fast.rrhf_loss(**kw, backend=backend)  # noqa: E731

    # Correctness first: a fast wrong answer must fail, not be timed.
    got = loss_and_grads(loss_fn, inputs)
    want = loss_and_grads(reference.rrhf_loss, inputs)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{backend} {name}: {m}")
    assert torch.isfinite(got[0]) and got[0] > 0  # the SFT term of random logits is about log V

    def step():
        out = loss_and_grads(loss_fn, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)
