"""The per-model exactness probe: before the first loss on a model, check that the fused head and the prefix mode
give what the model itself gives, and fall back, loudly, to a path that does.

The fused head assumes logits = hidden @ W^T + b of the body's last hidden state; each prefix mode assumes a
candidate's hidden states depend on nothing but its prompt and itself. Neither can be read off a list of
architectures (softcaps, logit multipliers, output heads of several layers, learned sparse attention that padding
changes, positions taken from the cache length), so they are measured, on a short batch cut from the real one:

    reference   every candidate after its prompt alone, unpadded, through the model's own forward(...).logits,
                rrhf_fast.reference.rrhf_loss_from_logits: the loss and the gradient of every trainable parameter
    head        the fused head (rrhf_loss with the LM head's weight and bias) on the same per-candidate forward;
                where it differs (or the head is no plain Linear), head = "logits": the model's own logits at the
                response positions and rrhf_loss_from_logits, right for any model at the cost of [N, V] logits
    mode        each mode of prefix.candidate_modes in turn (the one asked for, or "auto"'s order) with that head;
                the first whose loss and gradients match the reference is the plan. "per-candidate" with the
                model's logits is the reference itself, so there is always one.

A match is: the loss, the candidates' scores and every trainable parameter's gradient within `tolerance(dtype)`
relative (a parameter's error is
measured against at least 1e-3 of the whole gradient's norm: a gradient zero in exact arithmetic, as a key bias's,
holds only rounding). Gradients, not only the loss: a learnable logit scale leaves the forward equal and gets no
gradient through the fused head.

The probe batch: two groups taken from the real batch (cycling through it when it has fewer), k = 2 and 3, one
candidate of a single token, prompts of two lengths, the prompts and the longest candidate of each group at least
`reach(model)` tokens long (longer
than any sliding window, attention chunk, top-k or convolution the config declares; the real tokens are tiled to
that length when shorter, cut when longer), so that the logits are the trained model's on real text, not the small
ones of random tokens. It runs in the caller's dtype (autocast included), with the model in eval mode (dropout off:
the paths must be compared on the same function; the modes tried are read before, so under gradient checkpointing
"kv-cache" is not among them), under torch.random.fork_rng, with torch.autograd.grad (no .grad
is touched): the model's parameters, gradients, train/eval flags and RNG state are as they were.

Cost: one forward and backward per candidate for the reference and for the fused head (5 candidates each), one
forward and backward of the probe batch per mode tried; about 12 short forwards/backwards, once per model, mode,
dtype and checkpointing setting. Measured in CPU time (one thread, fp32, a shared 2-core machine): 94 ms against a
35 ms training step (kv-cache, forward and backward) of the embedded Llama (4 groups of 4, P = 24, R = 16): 2.7
steps; 462 ms against 296 ms for a 4-layer Llama of hidden 256 and vocabulary 4096 (2 groups of 4, P = 128,
R = 32): 1.6 steps.
"""

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import torch

from rrhf_fast import prefix, reference
from rrhf_fast.batch import PackedBatch, check_vocabulary, pack_batch

# Config fields that bound how far a token's computation reaches back: prefix.WINDOW_FIELDS (windows, chunks,
# learned top-k) and convolution kernels and SSM chunks.
_REACH_FIELDS = prefix.WINDOW_FIELDS + ("conv_kernel", "conv_L_cache", "chunk_size")
_MIN_REACH = 8
PROBE_REWARDS = ([1.0, 0.0], [0.0, 2.0, 1.0])  # distinct, so that every pair is ranked


@dataclass(frozen=True)
class Plan:
    """What model_loss runs on a model: the prefix mode, the head ("fused" or "logits"), and why."""

    mode: str
    head: str
    reason: str = ""


_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype) -> float:
    """The relative error that rounding in `dtype` stays within: 2 sqrt(eps), at least 1e-6.

    float64 1e-6 (its own rounding is 1e-16, but RMSNorm and softmax run in float32 in many models: 1e-7),
    float32 6.9e-4, float16 6.3e-2, bfloat16 0.18. A softcap, a logit scale or a state leaked from another candidate
    changes trained-model logits by far more."""
    return max(1e-6, 2 * torch.finfo(dtype).eps ** 0.5)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: the autocast dtype inside autocast, else its parameters' floating dtype."""
    device = model.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def reach(model) -> int:
    """Tokens a probe prompt and its longest candidate take at least: one past the longest window, chunk or top-k the
    config declares (at least 8), and no more than a third of the model's positions less 3."""
    config = prefix._text_config(model)
    declared = [getattr(config, name, None) for name in _REACH_FIELDS]
    longest = max([v for v in declared if isinstance(v, int) and not isinstance(v, bool)] + [0])
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    length = max(_MIN_REACH, longest + 1)
    return min(length, positions // 3 - 3) if isinstance(positions, int) and positions >= 3 * _MIN_REACH + 9 else length


def _tiled(ids: list[int], length: int) -> list[int]:
    return (ids * (length // len(ids) + 1))[:length]


def probe_batch(batch: PackedBatch, length: int) -> PackedBatch:
    """Two groups cut from `batch`: a prompt of `length` tokens and k = 2 candidates of (length, 1) tokens, a prompt
    of length + 3 and k = 3 candidates of (length, 3, 2). Prompts of different lengths leave a gap of padding between
    the shorter prompt and its candidates where prompts are batched (a window or ALiBi that counts cache slots sees
    it). Token ids are the batch's own (probe group g takes real group g mod G, candidate i takes real candidate
    i mod k_g), tiled or cut to the lengths."""
    batch = batch.to("cpu")
    prompts, cu_groups, cands = prefix._candidate_lists(batch)
    shapes = ((length, [length, 1]), (length + 3, [length, 3, 2]))
    probe_prompts, probe_cands = [], []
    for j, (prompt_length, lengths) in enumerate(shapes):
        g = j % len(prompts)
        real = [cands[c].tolist() for c in range(cu_groups[g], cu_groups[g + 1])]
        probe_prompts.append(_tiled(prompts[g].tolist(), prompt_length))
        probe_cands.append([_tiled(real[i % len(real)], n) for i, n in enumerate(lengths)])
    return pack_batch(probe_prompts, probe_cands, [list(r) for r in PROBE_REWARDS], pad_token_id=batch.pad_token_id)


def _gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if not params:
        return []
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _reference(model, batch: PackedBatch, params, loss_options):
    """Loss, scores and gradients of every candidate after its prompt alone through the model's own logits."""
    logits = prefix.prefix_forward(model, batch, "per-candidate", head="logits")
    options = {k: v for k, v in loss_options.items() if k != "backend"}
    out = reference.rrhf_loss_from_logits(logits, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, **options)
    return out.loss.detach(), out.scores.detach(), _gradients(out.loss, params)


def _measured(model, batch, params, mode, head, loss_options):
    out = prefix.batch_loss(model, batch, mode, head, **loss_options)
    return out.loss.detach(), out.scores.detach(), _gradients(out.loss, params)


def _relative(actual: torch.Tensor, expected: torch.Tensor, floor=1e-30) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / torch.clamp(expected.norm(), min=floor))


def _mismatch(result, expected, names, tol) -> str | None:
    """Why `result` (loss, scores, gradients) is not `expected` to `tol` relative, or None when it is."""
    (loss, scores, grads), (loss_ref, scores_ref, grads_ref) = result, expected
    if not _relative(loss, loss_ref) <= tol:  # NaN fails
        return f"its loss is {float(loss):.6g}, the model's own {float(loss_ref):.6g}"
    if not _relative(scores, scores_ref) <= tol:
        return f"its candidate scores are off by {_relative(scores, scores_ref):.2g} relative"
    if not grads_ref:
        return None
    floor = 1e-3 * torch.stack([g.double().norm() for g in grads_ref]).norm()
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        if not (err := _relative(grad, grad_ref, floor)) <= tol:
            return f"the gradient of {name} is off by {err:.2g} relative"
    return None


@contextlib.contextmanager
def _probing(model):
    """Eval mode (dropout off), the RNG forked, gradients on; every module's train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            yield
    finally:
        for m, training in flags:
            m.training = training


# What a path that cannot run on a model raises from inside transformers (LookupError: an index or a key the
# modeling code expects, e.g. a mask per layer type; AssertionError: a shape check, e.g. XLM's 2-D-only mask);
# anything else (out of memory included) is not a verdict on the path.
_CANNOT_RUN = (ValueError, TypeError, AttributeError, RuntimeError, LookupError, AssertionError, NotImplementedError)


def _verdict(model, small, params, mode, head, loss_options, expected, names, tol) -> str | None:
    """None when `mode` with `head` is exact on the probe batch, else why not."""
    try:
        return _mismatch(_measured(model, small, params, mode, head, loss_options), expected, names, tol)
    except torch.OutOfMemoryError:
        raise
    except _CANNOT_RUN as err:
        return f"it failed with {type(err).__name__}" + (f": {err}" if str(err) else "")


def run_probe(model, batch: PackedBatch, mode: str = "auto", **loss_options) -> Plan:
    """Probe `model` on a batch cut from `batch` (see the module docstring) and return the Plan: for "auto" the first
    of prefix.candidate_modes that is exact; for an explicit mode that mode, or a ValueError naming the mode that
    passed. Not cached: `plan` is."""
    # Ids past the vocabulary named where they are in the real batch, not in the probe's cut of it.
    check_vocabulary(batch, model.get_input_embeddings().num_embeddings)
    modes = prefix.candidate_modes(model)  # read before eval mode switches checkpointing off
    if mode != "auto" and (problem := prefix.refusal(model, mode)) is not None:
        passing = run_probe(model, batch, "auto", **loss_options)
        raise ValueError(f'{problem} mode="{passing.mode}" passes the exactness check on this model: use it (or "auto").')
    tol = tolerance(compute_dtype(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    small = probe_batch(batch, reach(model)).to(model.device)
    with _probing(model):
        expected = _reference(model, small, params, loss_options)
        check = dict(loss_options=loss_options, expected=expected, names=names, tol=tol)
        head, reason = "fused", ""
        why = prefix.head_problem(model) or _verdict(model, small, params, "per-candidate", "fused", **check)
        if why is not None:
            head, reason = "logits", f"its LM head alone does not give its logits ({why})"
        failures = []
        for candidate in modes if mode == "auto" else [mode] + [m for m in modes if m != mode]:
            why = _verdict(model, small, params, candidate, head, **check)
            if why is None:
                break
            failures.append(f'mode="{candidate}" is not exact: {why}')
        else:  # per-candidate with the model's own logits is the reference: only a model that changes between calls
            raise ValueError(f"{type(model).__name__} gives different results for the same inputs: " + "; ".join(failures))
    if mode != "auto" and failures:
        raise ValueError(
            f'{type(model).__name__}: {failures[0]}. mode="{candidate}" passes the exactness check: use it (or "auto").'
        )
    return Plan(candidate, head, "; ".join([r for r in [reason] + failures if r]))


def plan(model, batch: PackedBatch, mode: str = "auto", **loss_options) -> Plan:
    """The Plan for `model` in `mode`, probed at the first call for this model, mode, compute dtype, checkpointing
    setting, loss backend and number of trainable parameters, and cached (weakly, on the model) after. When it is
    not the first choice (another mode than resolve_mode's, or the model's own logits), it says so once, as a
    warning on stderr; an explicit mode that fails raises ValueError naming the mode that passed."""
    if mode not in prefix.MODES:
        raise ValueError(f"mode must be one of {prefix.MODES}, got {mode!r}")
    key = _key(model, mode, loss_options)
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        plans[key] = run_probe(model, batch, mode, **loss_options)
        if plans[key].reason:
            chosen = plans[key]
            head = "the fused head" if chosen.head == "fused" else "the model's own logits"
            warnings.warn(
                f'rrhf_fast: {type(model).__name__} runs mode="{chosen.mode}" with {head}: {chosen.reason}', stacklevel=3
            )
    return plans[key]


def _key(model, mode: str, loss_options: dict, dtype: torch.dtype | None = None) -> tuple:
    """What a plan is cached under, beside the model: the settings that can change the verdict."""
    trainable = sum(p.requires_grad for p in model.parameters())
    dtype = dtype or compute_dtype(model)
    return (mode, dtype, prefix._is_checkpointing(model), loss_options.get("backend", "auto"), trainable)


def adopt(model, chosen: Plan, mode: str = "auto", *, dtype: torch.dtype | None = None, **loss_options) -> None:
    """Cache `chosen` as `plan(model, ..., mode, **loss_options)`'s answer without probing: for a model whose weights
    are elsewhere (under FSDP2 the ranks that built it on the meta device take rank 0's verdict). dtype: the
    compute dtype it is for, when not the model's parameters' (FSDP2's bf16 units gather bf16 copies of fp32 shards)."""
    _PLANS.setdefault(model, {})[_key(model, mode, loss_options, dtype)] = chosen
