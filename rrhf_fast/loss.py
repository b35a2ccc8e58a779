"""The public RRHF loss: argument checks, backend dispatch, the options and output types, the autograd.Functions.

rrhf_loss, the training path, is one differentiable step:

    output = LinearRRHFFunction(hidden, weight, bias, ...)   # loss, rank_loss, sft_loss, scores; one sweep (6NVD)

The other entry points take two:

    logp   = LinearLogprobFunction(hidden, weight, bias, targets)    # [N], no [N, V] tensor kept (8NVD with backward)
             (or LogprobFunction(logits, targets) when logits are given)
    output = RankFunction(logp, cu_seqlens, rewards, cu_groups)      # loss, rank_loss, sft_loss, scores

Which module computes what:

    rrhf_fast.head        the loops over chunks of rows of the LM head: z = h W^T, dh = dz W and dW += dz^T h
                          as ATen / cuBLAS matmuls, one [rows, V] buffer at a time; every backend but
                          "reference" runs them
    `ops`                 the elementwise and ranking work between the matmuls (logprob_*, rank_*), the same
                          functions in two modules: rrhf_fast.kernels (Triton; backend="triton": CUDA, or CPU
                          under TRITON_INTERPRET=1) and rrhf_fast.torch_ops (PyTorch; backend="torch", any device)
    rrhf_fast.reference   the naive PyTorch loss (backend="reference", and the tests' oracle)

"auto" picks "triton" on CUDA and "torch" elsewhere.
"""

import contextlib
import math
import os
from types import ModuleType
from typing import NamedTuple

import torch

from rrhf_fast import head, reference, torch_ops

BACKENDS = ("auto", "triton", "torch", "reference")
SFT_REDUCTIONS = ("mean", "sum")


class LossOptions(NamedTuple):
    """The five options of the RRHF loss (DESIGN.md section 2), as the Functions and rrhf_fast.head take them."""

    length_penalty: float = 1.0  # alpha: a candidate's score is its log-probability sum / L ** alpha
    rank_weight: float = 1.0  # weight of the hinge ranking term
    sft_weight: float = 1.0  # weight of the SFT term on the best-rewarded candidate
    margin: float = 0.0  # hinge margin
    sft_reduction: str = "mean"  # "mean": the SFT term divides by the best candidate's length; "sum": it does not


# ----------------------------------------------------------------------------------------------------------
# Checks at the public boundary: each error says what is wrong and what to change.


def _check_index(name, offsets, total, what):
    if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 or int64 tensor of offsets, got {offsets.dtype} {tuple(offsets.shape)}")
    if offsets.numel() < 2:
        raise ValueError(f"{name} must hold at least two offsets ([0, end]), got {offsets.numel()}")
    values = offsets.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of {what} ({total}), got {values[-1]}")
    for i in range(len(values) - 1):
        if values[i + 1] <= values[i]:
            raise ValueError(
                f"{name} must be strictly increasing: entry {i} ({values[i]} -> {values[i + 1]}) is empty; "
                f"every {'candidate needs at least one token' if what == 'tokens' else 'group needs at least one candidate'}"
            )
    return values


def _check_options(options: LossOptions, backend: str) -> LossOptions:
    """The options as floats (and the reduction's name), once each is valid."""
    for name in ("rank_weight", "sft_weight", "margin"):
        value = getattr(options, name)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not (math.isfinite(options.length_penalty) and options.length_penalty >= 0):
        raise ValueError(
            f"length_penalty must be a finite number >= 0 (1 divides by the length), got {options.length_penalty}"
        )
    if options.sft_reduction not in SFT_REDUCTIONS:
        raise ValueError(f"sft_reduction must be one of {SFT_REDUCTIONS}, got {options.sft_reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return LossOptions(*(float(v) for v in options[:4]), options.sft_reduction)


def _check_targets(targets, num_tokens, vocab, device):
    if targets.dim() != 1 or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be a 1-D integer tensor of token ids, got {targets.dtype} {tuple(targets.shape)}")
    if targets.numel() != num_tokens:
        raise ValueError(f"targets has {targets.numel()} tokens but the hidden states / logits have {num_tokens} rows")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the hidden states / logits are on {device}; move it there")
    if num_tokens == 0:
        raise ValueError("the batch holds no response tokens; every candidate needs at least one token")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"targets must lie in [0, {vocab}) (the vocabulary size), got values in [{low}, {high}]")


def _check_batch(num_tokens, device, cu_seqlens, rewards=None, cu_groups=None) -> int | None:
    """Checks the packed batch's index tensors and rewards; returns the largest group's candidate count (the
    rank ops' tile hint, read here with the offsets the checks read anyway), None without groups."""
    for name, t in (("cu_seqlens", cu_seqlens), ("rewards", rewards), ("cu_groups", cu_groups)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the hidden states / logits are on {device}; move it there")
    _check_index("cu_seqlens", cu_seqlens, num_tokens, "tokens")
    if rewards is None:
        return None
    num_candidates = cu_seqlens.numel() - 1
    if rewards.dim() != 1 or rewards.numel() != num_candidates:
        raise ValueError(
            f"rewards must be 1-D with one reward per candidate ({num_candidates}, from cu_seqlens), "
            f"got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point() or not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be a floating-point tensor of finite values; drop or fix non-finite rewards")
    group_offsets = _check_index("cu_groups", cu_groups, num_candidates, "candidates")
    return max(end - first for first, end in zip(group_offsets, group_offsets[1:]))


def _check_head(hidden, weight, bias):
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a 2-D floating-point tensor [N, D], got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[1]} (hidden's last dim), got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; move one")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] on {hidden.device}, got {tuple(bias.shape)} on {bias.device}")


def _check_logits(logits):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D floating-point tensor [N, V], got {logits.dtype} {tuple(logits.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Backend choice.


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `backend` means for tensors on `device`; ValueError if it cannot run there."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and _kernels() is not None else "torch"
    if backend == "triton":
        if not _triton_usable(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (these are on {device}); use backend='torch' on CPU, "
                "or set TRITON_INTERPRET=1 before importing rrhf_fast to run the kernels in the interpreter"
            )
        if _kernels() is None:
            raise ValueError("backend='triton' needs the triton package: pip install triton, or use backend='torch'")
    return backend


def _kernels() -> ModuleType | None:
    try:
        from rrhf_fast import kernels
    except ImportError:
        return None
    return kernels


def _ops(backend: str) -> ModuleType:
    """The module with the elementwise and ranking ops of a resolved backend ("triton" or "torch")."""
    return _kernels() if backend == "triton" else torch_ops


# ----------------------------------------------------------------------------------------------------------
# The output and the autograd.Functions.


class RRHFOutput(NamedTuple):
    loss: torch.Tensor  # scalar: rank_weight * rank_loss + sft_weight * sft_loss
    rank_loss: torch.Tensor  # scalar: mean over groups of the pairwise hinge sum
    sft_loss: torch.Tensor  # scalar: mean over groups of the best candidate's negative log-likelihood
    scores: torch.Tensor  # [C]: length-normalised log-probability of every candidate



class LinearLogprobFunction(torch.autograd.Function):
    """logp[n] = log softmax(hidden[n] @ weight.T + bias)[targets[n]], keeping only logsumexp for backward.

    Two passes of rrhf_fast.head (linear_logprob_fwd / _bwd) with `ops` between the matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ops):
        logp, lse = head.linear_logprob_fwd(hidden, weight, bias, targets, ops)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ops = ops
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = head.linear_logprob_bwd(
            hidden,
            weight,
            bias,
            targets,
            lse,
            grad_logp.contiguous(),
            ctx.ops,
            compute_dh=ctx.needs_input_grad[0],
            compute_dw=ctx.needs_input_grad[1],
        )
        return dh, dw, db if ctx.needs_input_grad[2] else None, None, None


class LogprobFunction(torch.autograd.Function):
    """logp[n] = log softmax(logits[n])[targets[n]], keeping only logsumexp beside the logits."""

    @staticmethod
    def forward(ctx, logits, targets, ops):
        logp, lse = ops.logprob_fwd(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ops = ops
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        return ctx.ops.logprob_bwd(logits, targets, lse, grad_logp.contiguous()), None, None


class RankFunction(torch.autograd.Function):
    """Per-token logp -> (loss, rank_loss, sft_loss, scores); the backward gives every token's upstream gradient.

    max_group_size (the largest group's candidate count, a Python int) sizes the rank ops' tiles.
    """

    @staticmethod
    def forward(ctx, logp, cu_seqlens, rewards, cu_groups, options, ops, max_group_size):
        scores, rank, sft, coef, best = ops.rank_fwd(
            logp,
            cu_seqlens,
            rewards,
            cu_groups,
            options.length_penalty,
            options.margin,
            options.sft_reduction,
            max_group_size=max_group_size,
        )
        rank_loss, sft_loss = rank.mean(), sft.mean()
        ctx.save_for_backward(cu_seqlens, cu_groups, coef, best)
        ctx.options, ctx.ops, ctx.sizes = options, ops, (logp.numel(), max_group_size)
        return options.rank_weight * rank_loss + options.sft_weight * sft_loss, rank_loss, sft_loss, scores

    @staticmethod
    def backward(ctx, grad_loss, grad_rank_loss, grad_sft_loss, grad_scores):
        cu_seqlens, cu_groups, coef, best = ctx.saved_tensors
        grad_logp = _rank_grad_logp(
            ctx.ops,
            ctx.options,
            ctx.sizes,
            cu_seqlens,
            cu_groups,
            coef,
            best,
            grad_scores,
            rank_grad=grad_loss * ctx.options.rank_weight + grad_rank_loss,
            sft_grad=grad_loss * ctx.options.sft_weight + grad_sft_loss,
        )
        return grad_logp, None, None, None, None, None, None


def _rank_grad_logp(ops, options, sizes, cu_seqlens, cu_groups, coef, best, grad_scores, rank_grad, sft_grad):
    """[N] gradient of every token's logp, given the total gradients reaching rank_loss, sft_loss and scores.

    sizes = (n_tokens, max_group_size) as Python ints, so that the rank ops need no host read.
    """
    n_tokens, max_group_size = sizes
    num_groups = cu_groups.numel() - 1
    # Scalars stay on the device as 0-d tensors and the sizes come from the host: no host synchronisation in
    # the backward.
    return ops.rank_bwd(
        cu_seqlens,
        cu_groups,
        coef,
        best,
        grad_scores.to(coef.dtype).contiguous(),
        (rank_grad / num_groups).to(coef.dtype),
        (sft_grad / num_groups).to(coef.dtype),
        options.length_penalty,
        options.sft_reduction,
        n_tokens=n_tokens,
        max_group_size=max_group_size,
    )


class LinearRRHFFunction(torch.autograd.Function):
    """hidden, weight, bias -> (loss, rank_loss, sft_loss, scores) in one sweep over the vocabulary.

    The forward also computes the gradient for d loss = 1 (head.linear_rrhf_fwd: 6NVD, no [N, V] tensor),
    which the backward scales by the incoming d loss: training pays no second sweep. Gradients arriving on
    rank_loss, sft_loss or scores are exact too: by linearity they add a two-pass backward of their own.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, options, ops, grads, max_group_size):
        ctx.set_materialize_grads(False)  # None marks an unused output, so the common case skips the extra pass
        sweep = head.linear_rrhf_fwd(hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, options, ops, grads)
        ctx.save_for_backward(hidden, weight, bias, targets, cu_seqlens, cu_groups, sweep.coef, sweep.best, sweep.lse)
        ctx.loss_grads, ctx.options, ctx.ops = sweep.grads, options, ops
        ctx.sizes = (hidden.shape[0], max_group_size)
        rank_loss, sft_loss = sweep.rank.mean(), sweep.sft.mean()
        return options.rank_weight * rank_loss + options.sft_weight * sft_loss, rank_loss, sft_loss, sweep.scores

    @staticmethod
    def backward(ctx, grad_loss, grad_rank_loss, grad_sft_loss, grad_scores):
        hidden, weight, bias, targets, cu_seqlens, cu_groups, coef, best, lse = ctx.saved_tensors
        if ctx.loss_grads is None:
            raise RuntimeError("rrhf_loss's backward runs once per forward: call rrhf_loss again to differentiate again")
        # The stored gradients are this Function's own: scale them in place rather than copy a [V, D] tensor.
        grads = [None if g is None or grad_loss is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.loss_grads]
        ctx.loss_grads = None
        if grad_rank_loss is not None or grad_sft_loss is not None or grad_scores is not None:
            zero = coef.new_zeros(())
            grad_logp = _rank_grad_logp(
                ctx.ops,
                ctx.options,
                ctx.sizes,
                cu_seqlens,
                cu_groups,
                coef,
                best,
                coef.new_zeros(coef.shape) if grad_scores is None else grad_scores,
                rank_grad=zero if grad_rank_loss is None else grad_rank_loss,
                sft_grad=zero if grad_sft_loss is None else grad_sft_loss,
            )
            extra = head.linear_logprob_bwd(
                hidden,
                weight,
                bias,
                targets,
                lse,
                grad_logp,
                ctx.ops,
                compute_dh=ctx.needs_input_grad[0],
                compute_dw=ctx.needs_input_grad[1],
            )
            grads = [e if g is None else (g if e is None else g + e) for g, e in zip(grads, extra)]
        dh, dw, db = (g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3]))
        return dh, dw, db, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# The public functions.


def _head_like(hidden, weight, bias):
    # A head in another dtype (fp32 master weights under bf16 autocast) is cast to the hidden states' dtype,
    # as autocast does for a linear layer; autograd carries the gradient back through the cast.
    return weight.to(hidden.dtype).contiguous(), None if bias is None else bias.to(hidden.dtype).contiguous()


def _autocast_head(hidden):
    """(hidden, context) for the fused head under autocast: hidden in the autocast dtype, as an nn.Linear head
    computes in, and a context that turns autocast off inside the Functions.

    The residual stream of a model under autocast is fp32, so without this the head would take fp32 hidden states
    and the fp32 master weights, and two of its three matmuls (an in-place addmm_ and an mm into `out`, which
    autocast leaves alone) would run in fp32. With it the matmuls run in bf16 / fp16 on tensor cores and the
    softmax and ranking maths in fp32, as always; autograd casts the gradients back to the fp32 parameters.
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, contextlib.nullcontext()
    return hidden.to(torch.get_autocast_dtype(device_type)), torch.autocast(device_type, enabled=False)


def _linear_logprob(hidden, weight, bias, targets, ops):
    weight, bias = _head_like(hidden, weight, bias)
    return LinearLogprobFunction.apply(hidden.contiguous(), weight, bias, targets.contiguous(), ops)


def rrhf_loss(
    hidden,
    weight,
    targets,
    cu_seqlens,
    rewards,
    cu_groups,
    *,
    bias=None,
    length_penalty=1.0,
    rank_weight=1.0,
    sft_weight=1.0,
    margin=0.0,
    sft_reduction="mean",
    backend="auto",
) -> RRHFOutput:
    """The RRHF loss of a packed batch, from hidden states and the LM head, without [N, V] logits.

    hidden [N, D] (row n predicts targets[n]), weight [V, D], bias [V] or None, targets [N] int,
    cu_seqlens [C + 1] candidate offsets into the N tokens, rewards [C], cu_groups [G + 1] group offsets into
    the C candidates. Returns RRHFOutput(loss, rank_loss, sft_loss, scores [C]); see DESIGN.md section 2.
    Differentiable with respect to hidden, weight and bias. backend: "auto" (triton on CUDA, torch
    otherwise), "triton", "torch" (chunked PyTorch) or "reference" (naive PyTorch).
    """
    options = _check_options(LossOptions(length_penalty, rank_weight, sft_weight, margin, sft_reduction), backend)
    _check_head(hidden, weight, bias)
    _check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    max_group_size = _check_batch(hidden.shape[0], hidden.device, cu_seqlens, rewards, cu_groups)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        return reference.rrhf_loss(hidden, weight, targets, cu_seqlens, rewards, cu_groups, bias=bias, **options._asdict())
    hidden, autocast_off = _autocast_head(hidden)
    weight, bias = _head_like(hidden, weight, bias)
    # Gradients the forward sweep should compute along the way (none under torch.no_grad, e.g. evaluation).
    grads = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    with autocast_off:
        return RRHFOutput(
            *LinearRRHFFunction.apply(
                hidden.contiguous(),
                weight,
                bias,
                targets.contiguous(),
                cu_seqlens,
                rewards,
                cu_groups,
                options,
                _ops(backend),
                grads,
                max_group_size,
            )
        )


def rrhf_loss_from_logits(
    logits,
    targets,
    cu_seqlens,
    rewards,
    cu_groups,
    *,
    length_penalty=1.0,
    rank_weight=1.0,
    sft_weight=1.0,
    margin=0.0,
    sft_reduction="mean",
    backend="auto",
) -> RRHFOutput:
    """The RRHF loss of a packed batch from [N, V] logits whose row n predicts targets[n]; as `rrhf_loss`."""
    _check_logits(logits)
    _check_targets(targets, logits.shape[0], logits.shape[1], logits.device)
    options = _check_options(LossOptions(length_penalty, rank_weight, sft_weight, margin, sft_reduction), backend)
    backend = resolve_backend(backend, logits.device)
    if backend == "reference":
        _check_batch(logits.shape[0], logits.device, cu_seqlens, rewards, cu_groups)
        return reference.rrhf_loss_from_logits(logits, targets, cu_seqlens, rewards, cu_groups, **options._asdict())
    logp = LogprobFunction.apply(logits.contiguous(), targets.contiguous(), _ops(backend))
    return rrhf_loss_from_logprobs(logp, cu_seqlens, rewards, cu_groups, **options._asdict(), backend=backend)


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
    backend="auto",
) -> RRHFOutput:
    """The RRHF loss from [N] per-token log-probabilities (from any model or kernel); as `rrhf_loss`."""
    if logprobs.dim() != 1 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a 1-D floating-point tensor [N], got {logprobs.dtype} {tuple(logprobs.shape)}")
    options = _check_options(LossOptions(length_penalty, rank_weight, sft_weight, margin, sft_reduction), backend)
    max_group_size = _check_batch(logprobs.shape[0], logprobs.device, cu_seqlens, rewards, cu_groups)
    backend = resolve_backend(backend, logprobs.device)
    if backend == "reference":
        return reference.rrhf_loss_from_logprobs(logprobs, cu_seqlens, rewards, cu_groups, **options._asdict())
    # The kernels work in fp32; the torch path keeps fp64 for fp64 inputs.
    dtype = torch.float32 if backend == "triton" else head.compute_dtype(logprobs)
    logp, rewards = logprobs.to(dtype), rewards.to(dtype)
    return RRHFOutput(*RankFunction.apply(logp, cu_seqlens, rewards, cu_groups, options, _ops(backend), max_group_size))


def sequence_scores(hidden, weight, targets, cu_seqlens, *, bias=None, length_penalty=1.0, backend="auto"):
    """[C] length-normalised log-probability of every candidate (the model as a reward model); differentiable."""
    _check_options(LossOptions(length_penalty=length_penalty), backend)
    _check_head(hidden, weight, bias)
    _check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    _check_batch(hidden.shape[0], hidden.device, cu_seqlens)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        return reference.sequence_scores(hidden, weight, targets, cu_seqlens, bias=bias, length_penalty=length_penalty)
    hidden, autocast_off = _autocast_head(hidden)
    with autocast_off:
        logp = _linear_logprob(hidden, weight, bias, targets, _ops(backend))
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    candidate_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=logp.device), lengths)
    sums = logp.new_zeros(lengths.numel()).index_add(0, candidate_of_token, logp)
    return sums / lengths.to(logp.dtype) ** length_penalty
