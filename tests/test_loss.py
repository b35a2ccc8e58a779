"""The public API, every backend against rrhf_fast.reference: outputs and every gradient."""

import pytest
import torch

import rrhf_fast
from rrhf_fast import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The Triton backend runs through the interpreter on CPU (tests are kept small for it).
BACKENDS = ["torch", "triton"]

OPTIONS = [
    {},
    dict(length_penalty=0.0, margin=0.3),
    dict(length_penalty=0.5, rank_weight=2.0, sft_weight=0.25, sft_reduction="sum"),
    dict(length_penalty=2.0, margin=1.0, rank_weight=0.0),
]


def random_batch(seed, *, lengths=(1, 5, 3, 7, 2, 9, 4, 6, 10), groups=(1, 3, 2, 3), vocab=123, dim=40, dtype=torch.float64, bias=True):
    """A fresh packed batch of odd sizes: N = 47 tokens, length-1 candidates, a one-candidate group, reward ties."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    rewards = torch.randint(0, 3, (len(lengths),), generator=gen).to(torch.float64)  # few values: many ties

    def param(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()

    offsets = lambda sizes: torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=DEVICE)  # noqa: E731
    return dict(
        hidden=param(num_tokens, dim),
        weight=param(vocab, dim),
        bias=param(vocab) if bias else None,
        targets=torch.randint(0, vocab, (num_tokens,), generator=gen).to(DEVICE),
        cu_seqlens=offsets(lengths),
        rewards=rewards.to(DEVICE),
        cu_groups=offsets(groups),
    )


UPSTREAMS = ["all", "loss", "parts"]


def upstream(out, seed, uses="all"):
    """A random linear combination of the outputs: all four, the loss alone (training), or all but the loss."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3 + out.scores.numel(), generator=gen, dtype=torch.float64).to(out.scores.device, out.scores.dtype)
    parts = w[1] * out.rank_loss + w[2] * out.sft_loss + (w[3:] * out.scores).sum()
    return {"all": w[0] * out.loss + parts, "loss": w[0] * out.loss, "parts": parts}[uses]


def run(fn, batch, inputs, seed, uses="all", **options):
    out = fn(**batch, **options)
    grads = torch.autograd.grad(upstream(out, seed, uses), [batch[name] for name in inputs])
    return out, grads


def assert_match(got, want, atol, rtol):
    (out, grads), (ref_out, ref_grads) = got, want
    for name, a, b in zip(out._fields, out, ref_out):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"gradient {i}: {m}")


# (dtype, atol, rtol) of each backend against the reference: float64 where the backend supports it, fp32 for
# the Triton kernels
EXACT = {
    "reference": (torch.float64, 1e-10, 1e-10),
    "torch": (torch.float64, 1e-10, 1e-10),
    "triton": (torch.float32, 2e-5, 2e-5),
}
BACKEND_TOLS = [pytest.param(backend, *EXACT[backend], id=backend) for backend in BACKENDS]


def exact_dtype(backend):
    return EXACT[backend][0]


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("uses", UPSTREAMS)
def test_rrhf_loss_matches_reference(backend, dtype, atol, rtol, options, uses):
    batch = random_batch(seed=len(str(options)), dtype=dtype)
    inputs = ["hidden", "weight", "bias"]
    got = run(rrhf_fast.rrhf_loss, batch, inputs, seed=1, uses=uses, backend=backend, **options)
    want = run(reference.rrhf_loss, batch, inputs, seed=1, uses=uses, **options)
    assert_match(got, want, atol, rtol)


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
def test_rrhf_loss_with_a_frozen_head_or_frozen_hidden(backend, dtype, atol, rtol):
    batch = random_batch(seed=13, dtype=dtype)
    batch["weight"].requires_grad_(False)
    got = run(rrhf_fast.rrhf_loss, batch, ["hidden", "bias"], seed=4, uses="loss", backend=backend)
    want = run(reference.rrhf_loss, batch, ["hidden", "bias"], seed=4, uses="loss")
    assert_match(got, want, atol, rtol)
    batch["weight"].requires_grad_(True)
    batch["hidden"] = batch["hidden"].detach()
    got = run(rrhf_fast.rrhf_loss, batch, ["weight"], seed=4, backend=backend)
    want = run(reference.rrhf_loss, batch, ["weight"], seed=4)
    assert_match(got, want, atol, rtol)


def test_rrhf_loss_without_grad_computes_no_gradient():
    batch = random_batch(seed=14)
    with torch.no_grad():
        out = rrhf_fast.rrhf_loss(**batch, backend="torch")
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, reference.rrhf_loss(**batch).loss.detach())


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
@pytest.mark.parametrize("options", OPTIONS[:3], ids=str)
def test_rrhf_loss_from_logits_matches_reference(backend, dtype, atol, rtol, options):
    batch = random_batch(seed=7, dtype=dtype)
    logits = (batch.pop("hidden") @ batch.pop("weight").T + batch.pop("bias")).detach().requires_grad_()
    batch["logits"] = logits * 3  # a wider spread of probabilities than the unit-scale head gives
    batch["logits"].retain_grad()
    got = run(rrhf_fast.rrhf_loss_from_logits, batch, ["logits"], seed=2, backend=backend, **options)
    want = run(reference.rrhf_loss_from_logits, batch, ["logits"], seed=2, **options)
    assert_match(got, want, atol, rtol)


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
def test_rrhf_loss_without_bias(backend, dtype, atol, rtol):
    batch = random_batch(seed=3, dtype=dtype, bias=False)
    got = run(rrhf_fast.rrhf_loss, batch, ["hidden", "weight"], seed=3, backend=backend)
    want = run(reference.rrhf_loss, batch, ["hidden", "weight"], seed=3)
    assert_match(got, want, atol, rtol)


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 1.5])
def test_sequence_scores_matches_reference(backend, dtype, atol, rtol, length_penalty):
    batch = random_batch(seed=4, dtype=dtype)
    args = [batch[k] for k in ("hidden", "weight", "targets", "cu_seqlens")]
    got = rrhf_fast.sequence_scores(*args, bias=batch["bias"], length_penalty=length_penalty, backend=backend)
    want = reference.sequence_scores(*args, bias=batch["bias"], length_penalty=length_penalty)
    up = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * up).sum(), [batch["hidden"], batch["weight"], batch["bias"]])
    want_grads = torch.autograd.grad((want * up).sum(), [batch["hidden"], batch["weight"], batch["bias"]])
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.bfloat16, 3e-2, 3e-2), (torch.float16, 5e-3, 5e-3)],
)
def test_low_precision_inputs(backend, dtype, atol, rtol):
    """bf16 / fp16 inputs against the reference on the same (rounded) inputs, computed in fp32."""
    batch = random_batch(seed=5, dtype=dtype, dim=32, vocab=64)
    inputs = ["hidden", "weight", "bias"]
    out, grads = run(rrhf_fast.rrhf_loss, batch, inputs, seed=5, backend=backend)
    ref_out, ref_grads = run(reference.rrhf_loss, batch, inputs, seed=5)
    assert all(g.dtype == dtype for g in grads)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    for a, b in zip(grads, ref_grads):
        # Gradients are compared relative to their own scale: bf16 keeps about three significant digits.
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_extreme_logits_stay_finite(backend):
    dtype = exact_dtype(backend)
    batch = random_batch(seed=6, dtype=dtype, bias=False)
    logits = torch.randn(batch["hidden"].shape[0], 123, dtype=torch.float64).sign() * 1e4
    batch.pop("hidden"), batch.pop("weight"), batch.pop("bias")
    batch["logits"] = logits.to(DEVICE, dtype).requires_grad_()
    out, grads = run(rrhf_fast.rrhf_loss_from_logits, batch, ["logits"], seed=6, backend=backend)
    ref_out, ref_grads = run(reference.rrhf_loss_from_logits, {**batch, "logits": batch["logits"].double()}, ["logits"], seed=6)
    assert all(torch.isfinite(t).all() for t in (*out, *grads))
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-6)
    # Near 1e4 an fp32 logit carries about 1e-3 absolute error, which the softmax turns into ~1e-6 here.
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ties_and_single_candidates_give_zero_rank_loss(backend):
    """All-tied rewards and one-candidate groups: no pair, so rank_loss = 0; only the SFT term has a gradient,
    on the first candidate of each group: d loss / d logits = -(1/G)(1/L_b)(onehot - softmax) on its tokens."""
    dtype = exact_dtype(backend)
    batch = random_batch(seed=8, dtype=dtype, bias=False, lengths=(2, 3, 1, 4), groups=(1, 3))
    batch["rewards"] = torch.ones(4, dtype=torch.float64, device=DEVICE)
    batch.pop("bias")
    logits = (batch.pop("hidden") @ batch.pop("weight").T).detach().requires_grad_()
    out = rrhf_fast.rrhf_loss_from_logits(logits, **batch, backend=backend)
    assert out.rank_loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, [logits])
    expected = torch.zeros_like(logits)
    onehot = torch.nn.functional.one_hot(batch["targets"], 123).to(dtype)
    softmax = torch.softmax(logits.detach(), -1)
    for start, end in ((0, 2), (2, 5)):  # group 1: candidate 0; group 2: candidate 1 (first of the ties)
        expected[start:end] = -(onehot[start:end] - softmax[start:end]) / (2 * (end - start))
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_auto_uses_the_torch_backend_on_cpu():
    batch = {k: (v.detach().cpu() if v is not None else v) for k, v in random_batch(seed=9).items()}
    auto = rrhf_fast.rrhf_loss(**batch)
    torch_backend = rrhf_fast.rrhf_loss(**batch, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(auto, torch_backend))


def test_head_in_another_dtype_is_cast_to_the_hidden_dtype():
    """fp32 master weights with bf16 hidden states (autocast training): the weight gradient comes back in fp32."""
    batch = random_batch(seed=10, dtype=torch.bfloat16, bias=False, dim=16, vocab=32)
    batch["weight"] = batch["weight"].detach().float().requires_grad_()
    out = rrhf_fast.rrhf_loss(**batch, backend="torch")
    (grad,) = torch.autograd.grad(out.loss, [batch["weight"]])
    assert grad.dtype == torch.float32
    ref = reference.rrhf_loss(**{**batch, "weight": batch["weight"].bfloat16()})
    torch.testing.assert_close(out.loss.float(), ref.loss.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_head_in_the_autocast_dtype(backend):
    """Under bf16 autocast, fp32 hidden states (a model's residual stream) and an fp32 head give what the same
    call on bf16 copies gives outside autocast, bit for bit: the head's matmuls run in bf16, as an nn.Linear head
    would, and the gradients come back to the fp32 tensors in fp32."""
    batch = random_batch(seed=12, dtype=torch.float32, bias=False, dim=16, vocab=32)
    inputs = ("hidden", "weight")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads = run(rrhf_fast.rrhf_loss, batch, inputs, seed=5, backend=backend)
        scores = rrhf_fast.sequence_scores(*(batch[k] for k in ("hidden", "weight", "targets", "cu_seqlens")), backend=backend)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    low = {**batch, **{k: batch[k].detach().bfloat16().requires_grad_() for k in inputs}}
    want_out, want_grads = run(rrhf_fast.rrhf_loss, low, inputs, seed=5, backend=backend)
    for a, b in zip((*out, *grads), (*want_out, *want_grads)):
        assert torch.equal(a, b.to(a.dtype))
    want_scores = rrhf_fast.sequence_scores(*(low[k] for k in ("hidden", "weight", "targets", "cu_seqlens")), backend=backend)
    assert torch.equal(scores, want_scores)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument and what to change.


def _cpu_batch():
    return {k: (v.detach().cpu() if v is not None else v) for k, v in random_batch(seed=11, dtype=torch.float32).items()}


BAD_INPUTS = [
    ("hidden", lambda b: b["hidden"][:, None], "hidden must be a 2-D"),
    ("weight", lambda b: b["weight"][:, :-1], "weight must be"),
    ("bias", lambda b: b["bias"][:-1], "bias must be"),
    ("targets", lambda b: b["targets"][:-1], "targets has 46 tokens"),
    ("targets", lambda b: b["targets"].float(), "targets must be a 1-D integer"),
    ("targets", lambda b: b["targets"].clone().fill_(123), r"targets must lie in \[0, 123\)"),
    ("targets", lambda b: b["targets"].clone().fill_(-1), r"targets must lie in \[0, 123\)"),
    ("cu_seqlens", lambda b: b["cu_seqlens"] + 1, "cu_seqlens must start at 0"),
    ("cu_seqlens", lambda b: b["cu_seqlens"][:-1], "cu_seqlens must end at the number of tokens"),
    ("cu_seqlens", lambda b: torch.cat([b["cu_seqlens"][:2], b["cu_seqlens"][1:]]), "at least one token"),
    ("cu_seqlens", lambda b: b["cu_seqlens"].float(), "cu_seqlens must be a 1-D int32 or int64"),
    ("rewards", lambda b: b["rewards"][:-1], "one reward per candidate"),
    ("rewards", lambda b: b["rewards"][None], "one reward per candidate"),
    ("rewards", lambda b: b["rewards"].clone().index_fill_(0, torch.tensor([2]), float("nan")), "finite"),
    ("rewards", lambda b: b["rewards"].clone().index_fill_(0, torch.tensor([0]), float("inf")), "finite"),
    ("cu_groups", lambda b: torch.tensor([0, 2, 2, 9]), "at least one candidate"),
    ("cu_groups", lambda b: torch.tensor([1, 9]), "cu_groups must start at 0"),
    ("cu_groups", lambda b: torch.tensor([0, 4, 8]), r"cu_groups must end at the number of candidates \(9\)"),
]


@pytest.mark.parametrize("name, corrupt, message", BAD_INPUTS, ids=[f"{n}-{m[:24]}" for n, _, m in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(name, corrupt, message):
    batch = _cpu_batch()
    batch[name] = corrupt(batch)
    with pytest.raises(ValueError, match=message):
        rrhf_fast.rrhf_loss(**batch, backend="torch")


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(length_penalty=-1.0), "length_penalty must be a finite number >= 0"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(margin=float("inf")), "margin must be a finite number"),
        (dict(sft_reduction="avg"), "sft_reduction must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_option_raises_a_clear_error(option, message):
    with pytest.raises(ValueError, match=message):
        rrhf_fast.rrhf_loss(**_cpu_batch(), **option)


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        rrhf_fast.rrhf_loss(**_cpu_batch(), backend="triton")


def test_logits_and_head_errors():
    batch = _cpu_batch()
    hidden = batch.pop("hidden")
    batch.pop("weight"), batch.pop("bias")
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        rrhf_fast.rrhf_loss_from_logits(hidden[None], **batch)
    with pytest.raises(ValueError, match="no response tokens"):
        rrhf_fast.sequence_scores(hidden[:0], torch.randn(5, 40), torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_uses_triton_on_cuda():
    batch = random_batch(seed=12, dtype=torch.float32)
    auto = rrhf_fast.rrhf_loss(**batch)
    triton = rrhf_fast.rrhf_loss(**batch, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(auto, triton))


@pytest.mark.parametrize("backend, dtype, atol, rtol", BACKEND_TOLS)
def test_rrhf_loss_from_logprobs_matches_reference(backend, dtype, atol, rtol):
    """Per-token log-probabilities from elsewhere (another kernel, a peer library) ranked by our kernel."""
    batch = random_batch(seed=15, dtype=dtype)
    logits = batch.pop("hidden") @ batch.pop("weight").T + batch.pop("bias")
    batch["logprobs"] = reference.token_logprobs_from_logits(logits, batch.pop("targets")).detach().requires_grad_()
    got = run(rrhf_fast.loss.rrhf_loss_from_logprobs, batch, ["logprobs"], seed=15, backend=backend, margin=0.1)
    want = run(reference.rrhf_loss_from_logprobs, batch, ["logprobs"], seed=15, margin=0.1)
    assert_match(got, want, atol, rtol)
