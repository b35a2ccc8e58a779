"""Kernel tests: rrhf_fast.kernels against rrhf_fast.reference (float64 autograd) on fresh random inputs.

Without CUDA every kernel runs through TRITON_INTERPRET=1 on CPU tensors (the root conftest sets it), so the
shapes are tiny but odd (N = 47, V = 123, D = 40) and chosen to cross several tiles of the interpreter block
sizes with ragged edges. Tests marked `cuda` need a GPU and are skipped without one, never faked.
"""

import pytest
import torch

from rrhf_fast import reference
from rrhf_fast.kernels import logprob_bwd, logprob_fwd, rank_bwd, rank_fwd

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

N, V, D = 47, 123, 40

# (dtype, atol, rtol) of the outputs against a float64 reference fed the same (rounded) inputs
LOGITS_FWD_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-5),
                   (torch.float64, 1e-12, 1e-12)]
# dlogits are stored in the logits' dtype, so their error is one rounding of that dtype
LOGITS_BWD_TOLS = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-2, 1e-2), (torch.float16, 1e-3, 1e-3),
                   (torch.float64, 1e-12, 1e-12)]


def _tols(rows):
    """pytest params named after the dtype: test_x[bfloat16] rather than test_x[dtype1-0.01-0.01]."""
    return [pytest.param(*row, id="-".join(str(x).replace("torch.", "") for x in row if not isinstance(x, float)))
            for row in rows]


def _close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_()


# ------------------------------------------------------------------------------------------- logits level


@pytest.mark.parametrize("dtype, atol, rtol", _tols(LOGITS_FWD_TOLS))
def test_logprob_fwd_matches_reference(dtype, atol, rtol):
    logits = (torch.randn(N, V, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    logp, lse = logprob_fwd(logits, targets)
    assert logp.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(logp, reference.token_logprobs_from_logits(logits.double(), targets), atol, rtol)
    _close(lse, torch.logsumexp(logits.double(), dim=-1), atol, rtol)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("dtype, atol, rtol", _tols(LOGITS_BWD_TOLS))
def test_logprob_bwd_matches_autograd(dtype, atol, rtol, inplace):
    logits = (torch.randn(N, V, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    grad_logp = torch.randn(N, device=DEVICE)
    logits64 = _f64(logits)
    reference.token_logprobs_from_logits(logits64, targets).backward(grad_logp.double())
    lse = torch.logsumexp(logits.double(), dim=-1).to(torch.float64 if dtype == torch.float64 else torch.float32)

    buffer = logits.clone()
    dlogits = logprob_bwd(buffer, targets, lse, grad_logp.to(lse.dtype), inplace=inplace)
    assert dlogits.dtype == dtype and dlogits.shape == (N, V)
    assert (dlogits.data_ptr() == buffer.data_ptr()) == inplace
    _close(dlogits, logits64.grad, atol, rtol)


def test_logprob_extreme_logits_stay_finite():
    """Rows mixing +-1e4 (a naive exp would overflow): the online max keeps every value finite and exact."""
    logits = torch.randn(N, V, device=DEVICE)
    logits[::3, ::7] = 1e4
    logits[1::3, ::5] = -1e4
    logits[2, :] = -1e4  # a whole row at the bottom of the range: uniform softmax
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[0] = 0  # a target sitting on a +1e4 column
    logp, lse = logprob_fwd(logits, targets)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    _close(logp, reference.token_logprobs_from_logits(logits.double(), targets), 1e-3, 1e-6)

    grad_logp = torch.randn(N, device=DEVICE)
    dlogits = logprob_bwd(logits, targets, lse, grad_logp)
    assert torch.isfinite(dlogits).all()
    # fp32 lse near 1e4 carries an absolute rounding of up to 5e-4 (its ulp there is 1e-3), which exp() turns
    # into a relative error of that size on the large softmax entries: inherent to storing lse in fp32. So the
    # float64 expectation takes the kernel's own lse, and the check stays tight.
    softmax = torch.exp(logits.double() - lse.double()[:, None])
    onehot = torch.nn.functional.one_hot(targets, V).double()
    _close(dlogits, grad_logp.double()[:, None] * (onehot - softmax), 1e-6, 1e-5)


# --------------------------------------------------------------------------------------------------- rank


def _batch(lengths, group_sizes, rewards):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    cu_groups = torch.tensor([0, *torch.tensor(group_sizes).cumsum(0).tolist()], device=DEVICE)
    return cu_seqlens, torch.tensor(rewards, device=DEVICE), cu_groups


# nine candidates in four groups (sizes 4, 1, 2, 2): candidates of length 1 (1 and 5), a group of one (4),
# a tie for the top reward in group 0 (1 and 2: no pair between them, 1 is best) and a group whose two
# candidates tie (group 3: no pair at all, 7 is best)
LENGTHS = [3, 1, 5, 2, 7, 1, 4, 2, 6]
GROUPS = [4, 1, 2, 2]
REWARDS = [1.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0, 1.5, 1.5]


def _direct_rank(logp, cu_seqlens, rewards, cu_groups, alpha, margin, sft_reduction):
    """Per-group quantities written out from the maths in float64: scores, rank, sft, coef, best."""
    b, gb, r = cu_seqlens.tolist(), cu_groups.tolist(), rewards.tolist()
    sums = [logp[b[c] : b[c + 1]].double().sum().item() for c in range(len(b) - 1)]
    lengths = [b[c + 1] - b[c] for c in range(len(b) - 1)]
    scores = [s / length**alpha for s, length in zip(sums, lengths)]
    rank, sft, best, coef = [], [], [], [0.0] * len(scores)
    for g in range(len(gb) - 1):
        members = range(gb[g], gb[g + 1])
        pairs = [(i, j) for i in members for j in members if r[i] < r[j]]
        rank.append(sum(max(0.0, scores[i] - scores[j] + margin) for i, j in pairs))
        for i, j in pairs:
            if scores[i] - scores[j] + margin > 0:
                coef[i] += 1
                coef[j] -= 1
        top = max(r[c] for c in members)
        best.append(min(c for c in members if r[c] == top))
        sft.append(-sums[best[-1]] / (lengths[best[-1]] if sft_reduction == "mean" else 1))
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_t(scores), as_t(rank), as_t(sft), as_t(coef), torch.tensor(best)


OPTIONS = [(alpha, margin, red) for alpha in (0.0, 0.5, 1.0, 2.0) for margin in (0.0, 0.3) for red in ("mean", "sum")]


@pytest.mark.parametrize("alpha, margin, sft_reduction", OPTIONS)
def test_rank_fwd_matches_direct_computation(alpha, margin, sft_reduction):
    cu_seqlens, rewards, cu_groups = _batch(LENGTHS, GROUPS, REWARDS)
    logp = -torch.rand(int(cu_seqlens[-1]), device=DEVICE) * 3
    out = rank_fwd(logp, cu_seqlens, rewards, cu_groups, alpha, margin, sft_reduction)
    expected = _direct_rank(logp, cu_seqlens, rewards, cu_groups, alpha, margin, sft_reduction)
    for name, got, want in zip(("scores", "rank", "sft", "coef", "best"), out, expected):
        assert got.dtype == want.dtype if name == "best" else got.dtype == torch.float32, name
        _close(got, want, 1e-5, 1e-5) if name != "best" else torch.testing.assert_close(got.cpu(), want)
    assert out[4].tolist() == [1, 4, 5, 7]  # first on ties


# offsets alternate between int32 and int64 across the option sweep (both dtypes meet every option value)
@pytest.mark.parametrize("alpha, margin, sft_reduction, cu_dtype",
                         [pytest.param(*opt, dt, id=f"{opt[0]}-{opt[1]}-{opt[2]}-{str(dt)[6:]}")
                          for i, opt in enumerate(OPTIONS) for dt in [(torch.int32, torch.int64)[(i + i // 2) % 2]]])
def test_rank_kernels_compose_with_reference_autograd(alpha, margin, sft_reduction, cu_dtype):
    _check_composed(LENGTHS, GROUPS, REWARDS, alpha, margin, sft_reduction, cu_dtype)


def _check_composed(lengths, groups, rewards, alpha, margin, sft_reduction, cu_dtype, max_group_size=None, *,
                    vocab=29, dtype=torch.float64, dlogits_tols=(1e-5, 1e-5), grad_scores=True):
    """logprob_fwd -> rank_fwd -> rank_bwd -> logprob_bwd on [N, vocab] logits in `dtype` against autograd of
    reference.rrhf_loss_from_logits on the same (rounded) logits in float64, with random weights and random upstream
    gradients on loss, rank_loss, sft_loss and (unless grad_scores is False: rank_bwd then gets None) scores."""
    cu_seqlens, rewards, cu_groups = _batch(lengths, groups, rewards)
    n_tok, G = int(cu_seqlens[-1]), len(groups)
    logits = (torch.randn(n_tok, vocab, dtype=torch.float64, device=DEVICE) * 2).to(dtype)
    targets = torch.randint(0, vocab, (n_tok,), device=DEVICE)
    rank_weight, sft_weight = torch.rand(2).tolist()
    grad_loss, grad_rank, grad_sft = torch.randn(3).tolist()
    grad_scores = torch.randn(len(lengths), device=DEVICE) if grad_scores else None

    logits64 = logits.detach().to(torch.float64, copy=True).requires_grad_()
    ref = reference.rrhf_loss_from_logits(
        logits64, targets, cu_seqlens, rewards, cu_groups, length_penalty=alpha, rank_weight=rank_weight,
        sft_weight=sft_weight, margin=margin, sft_reduction=sft_reduction)
    scores_upstream = torch.zeros(len(lengths), device=DEVICE) if grad_scores is None else grad_scores
    torch.autograd.backward([ref.loss, ref.rank_loss, ref.sft_loss, ref.scores],
                            [torch.tensor(grad_loss, dtype=torch.float64), torch.tensor(grad_rank, dtype=torch.float64),
                             torch.tensor(grad_sft, dtype=torch.float64), scores_upstream.double()])

    cu_seqlens, cu_groups = cu_seqlens.to(cu_dtype), cu_groups.to(cu_dtype)
    logp, lse = logprob_fwd(logits, targets)
    scores, rank, sft, coef, best = rank_fwd(logp, cu_seqlens, rewards, cu_groups, alpha, margin, sft_reduction,
                                             max_group_size=max_group_size)
    _close(scores, ref.scores, 1e-5, 1e-5)
    _close(rank.mean(), ref.rank_loss, 1e-5, 1e-5)
    _close(sft.mean(), ref.sft_loss, 1e-5, 1e-5)
    _close(rank_weight * rank.mean() + sft_weight * sft.mean(), ref.loss, 1e-5, 1e-5)

    rank_scale = torch.tensor((grad_loss * rank_weight + grad_rank) / G, device=DEVICE)
    sft_scale = torch.tensor((grad_loss * sft_weight + grad_sft) / G, device=DEVICE)
    grad_logp = rank_bwd(cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, alpha, sft_reduction,
                         max_group_size=max_group_size)
    assert grad_logp.dtype == torch.float32 and grad_logp.shape == (n_tok,)
    dlogits = logprob_bwd(logits, targets, lse, grad_logp.to(lse.dtype))
    assert dlogits.dtype == dtype
    _close(dlogits, logits64.grad, *dlogits_tols)


def test_rank_golden_values_by_hand():
    """One group, A = tokens (-1, -3) with reward 0, B = token (-1) with reward 1; alpha = 1, margin = 1.5.

    S_A = -4, L_A = 2, p_A = -2;  S_B = -1, L_B = 1, p_B = -1.  Pair (A, B) since r_A < r_B:
    hinge = p_A - p_B + 1.5 = 0.5 > 0, so rank = 0.5, coef_A = +1, coef_B = -1.  best = B, sft = -S_B / 1 = 1.
    Backward with rank_scale = 1, sft_scale = 1, no score gradient:
    dS_A = 1 * (+1) / 2 = 0.5 on each of A's tokens;  dS_B = 1 * (-1) / 1 - 1 * (1 / 1) = -2.
    """
    cu_seqlens, rewards, cu_groups = _batch([2, 1], [2], [0.0, 1.0])
    logp = torch.tensor([-1.0, -3.0, -1.0], device=DEVICE)
    scores, rank, sft, coef, best = rank_fwd(logp, cu_seqlens, rewards, cu_groups, 1.0, 1.5, "mean")
    assert scores.tolist() == [-2.0, -1.0] and rank.tolist() == [0.5] and sft.tolist() == [1.0]
    assert coef.tolist() == [1.0, -1.0] and best.tolist() == [1]
    one = torch.tensor(1.0, device=DEVICE)
    assert rank_bwd(cu_seqlens, cu_groups, coef, best, None, one, one, 1.0, "mean").tolist() == [0.5, 0.5, -2.0]


def test_rank_hinge_exactly_zero_is_inactive():
    """Two identical candidates with different rewards and margin 0: the hinge is exactly 0, so like
    torch.relu it contributes neither loss nor gradient (coef 0), and only the SFT term reaches the tokens."""
    cu_seqlens, rewards, cu_groups = _batch([3, 3], [2], [0.0, 1.0])
    logp = torch.tensor([-0.5, -1.25, -2.0] * 2, device=DEVICE)
    scores, rank, sft, coef, best = rank_fwd(logp, cu_seqlens, rewards, cu_groups, 1.0, 0.0, "mean")
    assert scores[0] == scores[1] and rank.item() == 0.0 and coef.tolist() == [0.0, 0.0] and best.tolist() == [1]
    grad_logp = rank_bwd(cu_seqlens, cu_groups, coef, best, None, torch.tensor(1.0), torch.tensor(3.0), 1.0, "mean")
    assert grad_logp.tolist() == [0.0] * 3 + [-1.0] * 3


def test_rank_single_candidate_groups_have_no_rank_term():
    cu_seqlens, rewards, cu_groups = _batch([1, 2, 5], [1, 1, 1], [0.3, -1.0, 2.0])
    logp = -torch.rand(8, device=DEVICE)
    scores, rank, sft, coef, best = rank_fwd(logp, cu_seqlens, rewards, cu_groups, 1.0, 0.3, "sum")
    assert rank.tolist() == [0.0] * 3 and coef.tolist() == [0.0] * 3 and best.tolist() == [0, 1, 2]
    _close(sft, torch.stack([-logp[0], -logp[1:3].sum(), -logp[3:].sum()]), 1e-6, 1e-6)


def test_rank_large_group_spans_candidate_blocks():
    """A group of 37 candidates with many reward ties (ten candidate blocks under the interpreter, two on a
    GPU; the best must be the first top reward across blocks) next to a group of one, against the direct
    computation, with and without the max_group_size hint."""
    lengths = torch.randint(1, 6, (38,)).tolist()
    cu_seqlens, rewards, cu_groups = _batch(lengths, [37, 1], torch.randint(0, 5, (38,)).float().tolist())
    logp = -torch.rand(sum(lengths), device=DEVICE) * 2
    expected = _direct_rank(logp, cu_seqlens, rewards, cu_groups, 0.5, 0.1, "mean")
    for hint in (None, 37):
        out = rank_fwd(logp, cu_seqlens, rewards, cu_groups, 0.5, 0.1, "mean", max_group_size=hint)
        for got, want in zip(out[:4], expected[:4]):
            _close(got, want, 1e-5, 1e-5)
        assert out[4].tolist() == expected[4].tolist()
    # and the gradients, through the reference's autograd (tie-heavy rewards, every candidate block)
    _check_composed(lengths, [37, 1], rewards.tolist(), 0.5, 0.1, "mean", torch.int64)


# ------------------------------------------------------------------------------------- the trainer's shapes

# What the trainer launches the kernels with: groups of k = 2, 4, 8 or 16 candidates (on a GPU the rank kernels'
# tile is min(32, next_pow2(k)) candidates by 4096 / that many tokens: 2 x 1024 up to 16 x 256), the LM head's
# logits buffer in bf16 (a bf16 model, or autocast) or fp32, and the vocabularies of Llama 2 / Mistral (32000),
# Llama 3 (128256) and Qwen 2 / 3 (151936). On a GPU every case compiles every kernel at its shape (logprob forward
# and backward; rank forward and backward with both SFT reductions, with and without a score gradient); the twin
# runs the same cases at vocabularies the interpreter can afford.
TRAINER_KS = (2, 4, 8, 16)
TRAINER_VOCABS = (32000, 128256, 151936)
INTERPRETER_VOCABS = (37, 64, 97)
# dlogits against float64 on the same logits: one rounding of the buffer's dtype
TRAINER_DTYPES = [(torch.bfloat16, 1e-2, 1e-2), (torch.float32, 1e-6, 1e-5)]
# Larger than any gap between two scores here (means of log-probabilities of logits ~ N(0, 4): within about 25 of
# each other), so every ranked pair's hinge is active: rounding cannot carry a pair across the hinge's kink, where
# the gradient jumps (benchmarks/NOTES.md). The inactive side is tested above at exact float64 logits.
ALL_ACTIVE_MARGIN = 50.0


def _trainer_case(k, vocab, dtype, atol, rtol, groups, max_length, long_length):
    """`groups` groups of k candidates, 1 to max_length tokens long, one of them long_length (past the token tile:
    the rank kernels' token loop takes several steps) and one of a single token; rewards with ties. Checked by
    _check_composed twice, with alpha 1 (the trainer's default): the mean SFT term with a score gradient, and the
    summed one without."""
    lengths = torch.randint(1, max_length + 1, (groups * k,))
    lengths[0], lengths[-1] = long_length, 1
    rewards = torch.randint(0, k, (groups * k,)).float()
    rewards[::k] = -1.0  # the lowest, alone: every group has a ranked pair
    for reduction, grad_scores in (("mean", True), ("sum", False)):
        _check_composed(lengths.tolist(), [k] * groups, rewards.tolist(), 1.0, ALL_ACTIVE_MARGIN, reduction, torch.int64,
                        max_group_size=k, vocab=vocab, dtype=dtype, dlogits_tols=(atol, rtol), grad_scores=grad_scores)


@pytest.mark.parametrize("dtype, atol, rtol", _tols(TRAINER_DTYPES))
@pytest.mark.parametrize("k, vocab", [(k, INTERPRETER_VOCABS[i % 3]) for i, k in enumerate(TRAINER_KS)])
def test_kernels_at_trainer_group_sizes(k, vocab, dtype, atol, rtol):
    """The trainer's group sizes and dtypes at small vocabularies (one a group size: the interpreter takes tens of
    milliseconds a row); a token tile is 16 tokens under the interpreter."""
    _trainer_case(k, vocab, dtype, atol, rtol, groups=max(1, 4 // k), max_length=5, long_length=19)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", _tols(TRAINER_DTYPES))
@pytest.mark.parametrize("vocab", TRAINER_VOCABS)
@pytest.mark.parametrize("k", TRAINER_KS)
def test_kernels_compile_at_trainer_shapes(k, vocab, dtype, atol, rtol):
    """The trainer's group sizes, dtypes and vocabularies on the GPU: about 2000 tokens (32 / k groups of up to 64
    tokens a candidate, one of 1100, past the 1024-token tile)."""
    _trainer_case(k, vocab, dtype, atol, rtol, groups=max(2, 32 // k), max_length=64, long_length=1100)


# ---------------------------------------------------------------------------------------------- CUDA only


@cuda
@pytest.mark.cuda
@pytest.mark.slow
def test_logprob_int64_offsets_past_2_pow_31():
    """N * V > 2^31 elements: a row offset computed in int32 would wrap and read the wrong rows."""
    n, v = 16_500, 131_072  # 2.16e9 elements, 4.3 GB in bf16
    assert n * v > 2**31
    logits = torch.empty(n, v, dtype=torch.bfloat16, device="cuda").normal_(0, 2)
    targets = torch.randint(0, v, (n,), device="cuda")
    logp, lse = logprob_fwd(logits, targets)
    tail = slice(n - 64, n)  # the rows whose offsets pass 2^31
    _close(logp[tail], reference.token_logprobs_from_logits(logits[tail], targets[tail]), 1e-4, 1e-5)
    grad_logp = torch.randn(n, device="cuda")
    expected = grad_logp[tail, None] * (torch.nn.functional.one_hot(targets[tail], v) - torch.softmax(logits[tail].float(), -1))
    dlogits = logprob_bwd(logits, targets, lse, grad_logp, inplace=True)
    _close(dlogits[tail], expected, 1e-2, 1e-2)


@cuda
@pytest.mark.cuda
def test_kernels_are_deterministic_on_gpu():
    """Same inputs twice -> bitwise equal outputs of every kernel."""
    n, v = 1_000, 4_099
    targets = torch.randint(0, v, (n,), device="cuda")
    grad_logp = torch.randn(n, device="cuda")

    def logits_level():
        logits = torch.randn(n, v, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        logp, lse = logprob_fwd(logits, targets)
        return logp, lse, logprob_bwd(logits, targets, lse, grad_logp)

    def ranking():
        cu_seqlens = torch.arange(0, n + 1, 10, device="cuda")
        cu_groups = torch.arange(0, n // 10 + 1, 4, device="cuda")
        rewards = torch.randn(n // 10, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        fwd = rank_fwd(grad_logp, cu_seqlens, rewards, cu_groups, 1.0, 0.1, "mean")
        return (*fwd, rank_bwd(cu_seqlens, cu_groups, fwd[3], fwd[4], None, torch.tensor(0.5, device="cuda"),
                               torch.tensor(0.25, device="cuda"), 1.0, "mean"))

    for run in (logits_level, ranking):
        first, second = run(), run()
        for a, b in zip(first, second):
            assert torch.equal(a, b), run.__name__
