"""The exactness check: before the first loss on a model, find which prefix mode and which head give what the model
itself gives, and fall back, loudly, to a path that does.

The fused head assumes logits = hidden @ W^T + b of the body's last hidden state; each prefix mode assumes a
candidate's hidden states depend on nothing but its prompt and itself. Neither can be read off a list of
architectures (softcaps, logit multipliers, output heads of several layers, learned sparse attention that padding
changes, positions taken from the cache length), so they are measured.

What is compared. A path is exact when it is the same function as the reference in exact arithmetic; rounding is
not structure, so the comparison runs where rounding is negligible: on a float64 twin of the model (its parameters
copied and cast; outside autocast; "sdpa" where the model's attention cannot run in float64). On a batch cut from
the real one (probe_batch), for the reference (each candidate after its prompt alone, unpadded) and for the path:

    states   prefix.prefix_forward's rows: the hidden states that predict every response token (head "fused", [N, D])
             or the model's own logits there (head "logits", [N, V])
    vjp      the gradient of <states, U> for every trainable parameter, U a fixed random upstream gradient
             (skipped where no gradient is wanted: scoring)

The head: the model's own logits against the fused head's h @ W^T + b on the reference's states (values and vjp:
a learnable logit scale at 1 leaves the values equal and only its gradient tells). A mode: its states and vjp
against the reference's, with the head chosen. A path passes when its worst error is within TOLERANCE: the largest
row's relative error of the states, and every parameter's gradient error relative to its own norm (at least 1e-3
of the whole gradient's, since a gradient zero in exact arithmetic holds only rounding). The loss is a fixed
function of the states (the loss kernels are tested against rrhf_fast.reference on their own), so equal states and
vjp give an equal loss and equal gradients.

The bound. In float64 the rounding of an exact path is that of the float32 islands models keep (RMSNorm, rotary
tables and softmax upcast to float32 inside the layers). Measured (benchmarks/bench_probe.py,
benchmarks/architecture_sweep.py): on SmolLM2-135M-Instruct at most 1.3e-7 over 8 batches with the model in float32,
under bfloat16 autocast and in float16 (4.9e-7 with all 30 layers in float64), and at most 3.8e-7 over the 170
causal-LM families transformers 5.24 builds tiny. The smallest structural error, over those families (every mode
run as it is, even where the check leaves it out by construction) and seven structures grafted onto SmolLM2, is
8.9e-3 (RoFormer's positions in a packed row; 3.2e-2 on SmolLM2, a norm that sees the row). TOLERANCE = 1e-4 sits
260x above the first and 89x below the second. In the model's own dtype no bound separates the two: the float32
rounding of the reference alone reached 7e-4 on SmolLM2's gradients, bfloat16's is larger than a structural error
of 5e-2.

The twin. Every layer of the same kind runs the same code, so the twin holds the first n decoder layers, n the
fewest that include one layer of every kind (a kind: the layer's module classes, their scalar settings such as a
window or a layer type, their parameter shapes, and its entries in the config's per-layer lists), at least two,
with the embeddings, the final norm and the head. It is checked against the model: the output of its last layer on
a probe sequence must equal the model's own after that layer (within the model dtype's rounding), else the twin
holds every layer. SmolLM2 keeps 2 of 30 layers (31M of 135M parameters, most of them the embedding).

The batch. Two groups taken from the real batch (cycling through it when it has fewer), k = 2 and 3, one candidate
of a single token, prompts of two lengths, the prompts and the longest candidate of each group at least
`reach(model)` tokens long (longer than any sliding window, attention chunk or convolution the config declares,
and no wider than a learned top-k selection keeps: prefix.selection_problem; the real tokens are tiled to that
length when shorter, cut when longer), so that the states are the trained model's on real text. The model's
parameters, gradients, train/eval flags and RNG state are as they were after the check.

Order. Structure first: modes that are wrong by construction on this model and batch are left out before any
forward (prefix.candidate_modes). Then the head, then the modes in "auto"'s order until one passes; "per-candidate"
with the model's own logits is the reference itself, so there is always one. Cost on SmolLM2 (one CPU thread, the
machine shared): 0.67 of a float32 training step of one question with five answers, 0.69 under bfloat16 autocast.
"""

import contextlib
import copy
import math
import re
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from rrhf_fast import prefix
from rrhf_fast.batch import PackedBatch, check_vocabulary, pack_batch

TOLERANCE = 1e-4
# Config fields that bound how far a token's computation reaches back: windows and chunks, convolution kernels, SSM
# chunks. A probe batch must cross each of them.
_REACH_FIELDS = prefix.WINDOW_FIELDS + ("conv_kernel", "conv_L_cache", "chunk_size")
_MIN_REACH = 8
_MIN_TWIN_LAYERS = 2


@dataclass(frozen=True)
class Plan:
    """What model_loss runs on a model: the prefix mode, the head ("fused" or "logits"), and why; `errors` holds
    the worst error measured for every path tried, `seconds` what the check took (neither is compared)."""

    mode: str
    head: str
    reason: str = ""
    errors: tuple = field(default=(), compare=False)
    seconds: float = field(default=0.0, compare=False)


_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype) -> float:
    """The relative rounding of a short forward in `dtype`: 2 sqrt(eps), at least 1e-6 (float32 6.9e-4, bfloat16
    0.18). It bounds the twin's layer output against the model's own (a twin cut or copied wrongly is off by far
    more), not the verdict, which is TOLERANCE in float64."""
    return max(1e-6, 2 * torch.finfo(dtype).eps ** 0.5)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: the autocast dtype inside autocast, else its parameters' floating dtype."""
    device = model.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def reach(model) -> int:
    """Tokens a probe prompt and its longest candidate take: one past the longest window, chunk or convolution the
    config declares (at least 8), no more than a third of the model's positions less 3, and, for a learned top-k
    selection, small enough that every row of the probe batch fits it (4 reach + 9 tokens in all)."""
    config = prefix.text_config(model)
    declared = [getattr(config, name, None) for name in _REACH_FIELDS]
    longest = max([v for v in declared if isinstance(v, int) and not isinstance(v, bool)] + [0])
    length = max(_MIN_REACH, longest + 1)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and positions >= 3 * _MIN_REACH + 9:
        length = min(length, positions // 3 - 3)
    capacity = prefix.selection_capacity(model)
    if capacity is not None:
        length = max(1, min(length, (capacity[0] - 9) // 4))
    return length


def _tiled(ids: list[int], length: int) -> list[int]:
    return (ids * (length // len(ids) + 1))[:length]


def probe_batch(batch: PackedBatch, length: int) -> PackedBatch:
    """Two groups cut from `batch`: a prompt of `length` tokens and k = 2 candidates of (length, 1) tokens, a prompt
    of length + 3 and k = 3 candidates of (length, 3, 2). Prompts of different lengths leave a gap of padding between
    the shorter prompt and its candidates where prompts are batched (a window or ALiBi that counts cache slots sees
    it). Token ids are the batch's own (probe group g takes real group g mod G, candidate i takes real candidate
    i mod k_g), tiled or cut to the lengths."""
    batch = batch.to("cpu")
    prompts, cu_groups, cands = prefix.candidate_lists(batch)
    shapes = ((length, [length, 1]), (length + 3, [length, 3, 2]))
    probe_prompts, probe_cands = [], []
    for j, (prompt_length, lengths) in enumerate(shapes):
        g = j % len(prompts)
        real = [cands[c].tolist() for c in range(cu_groups[g], cu_groups[g + 1])]
        probe_prompts.append(_tiled(prompts[g].tolist(), prompt_length))
        probe_cands.append([_tiled(real[i % len(real)], n) for i, n in enumerate(lengths)])
    rewards = [[1.0, 0.0], [0.0, 2.0, 1.0]]  # distinct: every pair ranked (the states do not depend on them)
    return pack_batch(probe_prompts, probe_cands, rewards, pad_token_id=batch.pad_token_id)


# The twin -------------------------------------------------------------------------------------------------------

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Scalar settings that differ between layers of one kind without changing what they compute.
_PER_LAYER_INDEX = re.compile(r"idx|index|layer_id|layer_num|^training$")


def _layer_stack(model):
    """(owner, attribute, layers): the one ModuleList in the model's body as long as the config's layer count, or
    None where there is no such single list."""
    counts = {getattr(prefix.text_config(model), name, None) for name in _LAYER_COUNTS} - {None}
    found = [
        (owner, name, child)
        for owner in prefix.body(model).modules()
        for name, child in owner.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) > 0 and len(child) in counts
    ]
    return found[0] if len(found) == 1 else None


def _kind(layer: torch.nn.Module, index: int, per_layer: dict) -> tuple:
    """What decides what a decoder layer computes: its modules' classes, scalar settings and parameter shapes, and
    its entries in the config's per-layer lists."""
    parts = [(name, values[index]) for name, values in per_layer.items()]
    for path, module in layer.named_modules():
        settings = sorted(
            (k, v) for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))) and not _PER_LAYER_INDEX.search(k)
        )  # fmt: skip
        shapes = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)]
        parts.append((path, type(module).__name__, tuple(settings), tuple(shapes)))
    return tuple(map(repr, parts))


def _per_layer_lists(config, count: int) -> dict:
    return {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == count}


def layers_to_keep(model) -> int | None:
    """The fewest leading decoder layers that hold one layer of every kind (at least two), or None where the layers
    cannot be told apart from the rest of the model."""
    stack = _layer_stack(model)
    if stack is None:
        return None
    layers = stack[2]
    per_layer = _per_layer_lists(prefix.text_config(model), len(layers))
    first = {}
    for i, layer in enumerate(layers):
        first.setdefault(_kind(layer, i, per_layer), i)
    return min(len(layers), max(_MIN_TWIN_LAYERS, max(first.values()) + 1))


def _cut_config(config, count: int, keep: int) -> None:
    """The twin's config (a copy): its layer count `keep`, its per-layer lists cut to the first `keep`. Written to
    the instance directly: a config class may check that the two agree at every assignment."""
    for name, values in _per_layer_lists(config, count).items():
        config.__dict__[name] = type(values)(values[:keep])
    for name in _LAYER_COUNTS:
        if getattr(config, name, None) == count:
            config.__dict__[getattr(config, "attribute_map", {}).get(name, name)] = keep


def _deepcopy(model) -> torch.nn.Module:
    """copy.deepcopy, with the tensors a forward left on a module (RecurrentGemma keeps its last states there, in
    the autograd graph, which deepcopy refuses) copied detached."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _float64_copy(model, keep: int | None) -> torch.nn.Module:
    """A float64 copy of the model holding its first `keep` decoder layers (all with None), on its device, in eval
    mode, with attention and experts that run in float64."""
    stack = _layer_stack(model) if keep is not None else None
    if stack is None:
        twin = _deepcopy(model)
    else:
        owner, name, layers = stack
        setattr(owner, name, torch.nn.ModuleList(list(layers)[:keep]))  # no tensor is copied here
        try:
            twin = _deepcopy(model)
        finally:
            setattr(owner, name, layers)
        _cut_config(prefix.text_config(twin), len(layers), keep)
    config = prefix.text_config(twin)
    if hasattr(config, "_experts_implementation"):  # grouped_mm has no float64 kernel
        config._experts_implementation = "eager"
    if prefix.attn_implementation(twin) not in ("eager", "sdpa"):  # flash / flex kernels take no float64
        setter = getattr(prefix.transformers_model(twin), "set_attn_implementation", None)
        setter("sdpa") if callable(setter) else setattr(twin.config, "_attn_implementation", "sdpa")
    return twin.to(torch.float64).eval()


class _Captured(Exception):
    pass


def _layer_output(model, index: int, ids: torch.Tensor) -> torch.Tensor:
    """The output of decoder layer `index` for input_ids [1, T], the forward stopped there."""
    layers, captured = _layer_stack(model)[2], {}

    def capture(module, args, output):
        captured["out"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Captured

    handle = layers[index].register_forward_hook(capture)
    try:
        with torch.no_grad():
            prefix.body(model)(input_ids=ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["out"]


def float64_twin(model, small: PackedBatch) -> tuple[torch.nn.Module, str, float]:
    """(twin, what it holds, its error): a float64 copy of the first layers_to_keep(model) decoder layers, checked on
    the first prompt and candidate of `small` against the model's own output after its last kept layer (the relative
    error of that output, in the model's dtype); else a float64 copy of the whole model (error 0: nothing cut)."""
    prompts, _, cands = prefix.candidate_lists(small)
    ids = torch.cat([prompts[0], cands[0]])[None]
    keep = layers_to_keep(model)
    total = len(_layer_stack(model)[2]) if keep is not None else None
    if keep is not None and keep < total:
        twin = _float64_copy(model, keep)
        with torch.autocast(model.device.type, enabled=False):
            mine = _layer_output(twin, keep - 1, ids)
        err = _relative(mine, _layer_output(model, keep - 1, ids))
        if err <= tolerance(compute_dtype(model)):
            return twin, f"{keep} of {total} layers", err
        del twin
    return _float64_copy(model, None), "every layer", 0.0


# The comparison ---------------------------------------------------------------------------------------------------


def _relative(actual: torch.Tensor, expected: torch.Tensor, floor=1e-30) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / torch.clamp(expected.norm(), min=floor))


def _upstream(shape, device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


def _run(twin, small, mode, head, params, gradients, forward=prefix.prefix_forward):
    """(states, vjp): the path's states and, with gradients, the gradient of <states, U> for every parameter."""
    states = forward(twin, small, mode, head)
    grads = None
    if gradients and params:
        grads = torch.autograd.grad(states, params, _upstream(states.shape, states.device), allow_unused=True)
    return states.detach(), grads


def _unchecked(model, batch, mode, head):
    return prefix.FORWARDS[mode](model, batch.to(model.device), head)


def _grad_error(grad, ref, floor: float) -> float:
    """|grad - ref| / max(|ref|, floor); None is a zero gradient, and either may be sparse (the twin's embedding)."""
    if ref is None:
        return 0.0 if grad is None else float(grad.coalesce().values().norm() if grad.is_sparse else grad.norm()) / floor
    diff = ref if grad is None else grad - ref
    diff, ref = (t.coalesce().values() if t.is_sparse else t for t in (diff, ref))
    return float(diff.norm() / ref.norm().clamp_min(floor))


def _norm(grad) -> float:
    return 0.0 if grad is None else float((grad.coalesce().values() if grad.is_sparse else grad).norm())


def worst_error(result, expected, names) -> tuple[float, str]:
    """(error, where): the largest row's relative error of the states, or the worst parameter's gradient error
    (each against at least 1e-3 of the whole gradient's norm)."""
    (states, grads), (states_ref, grads_ref) = result, expected
    if states.shape != states_ref.shape or not torch.isfinite(states).all():
        return math.inf, "the states"
    rows = states_ref.norm(dim=1)
    floor = 1e-3 * float(rows.mean()) + 1e-300
    worst = (float(((states - states_ref).norm(dim=1) / rows.clamp_min(floor)).max()), "the states")
    if grads is None or grads_ref is None:
        return worst
    floor = 1e-3 * math.sqrt(sum(_norm(g) ** 2 for g in grads_ref)) + 1e-300
    for name, grad, ref in zip(names, grads, grads_ref):
        err = _grad_error(grad, ref, floor)
        if not err <= worst[0]:  # NaN counts as the worst
            worst = (err, f"the gradient of {name}")
    return worst


# What a path that cannot run on a model raises from inside transformers (LookupError: an index or a key the
# modeling code expects, e.g. a mask per layer type; AssertionError: a shape check, e.g. XLM's 2-D-only mask);
# anything else (out of memory included) is not a verdict on the path.
_CANNOT_RUN = (ValueError, TypeError, AttributeError, RuntimeError, LookupError, AssertionError, NotImplementedError)


def _verdict(measure, expected, names) -> tuple[float, str | None]:
    """(error, why not exact or None): the path `measure()` against `expected`."""
    try:
        err, where = worst_error(measure(), expected, names)
    except torch.OutOfMemoryError:
        raise
    except _CANNOT_RUN as e:
        return math.inf, f"it failed with {type(e).__name__}" + (f": {e}" if str(e) else "")
    if err <= TOLERANCE:
        return err, None
    return err, f"{where} is off by {err:.2g} relative"


@contextlib.contextmanager
def _probing(model):
    """Eval mode (dropout off), the RNG forked, gradients on, autocast off; every module's train/eval flag restored
    after."""
    flags = [(m, m.training) for m in model.modules()]
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.eval()
            yield
    finally:
        for m, training in flags:
            m.training = training


def run_probe(model, batch: PackedBatch, mode: str = "auto", *, gradients: bool = True, **loss_options) -> Plan:
    """Check `model` on a batch cut from `batch` (see the module docstring) and return the Plan: for "auto" the first
    of prefix.candidate_modes that is exact; for an explicit mode that mode, or a ValueError naming the mode that
    passed. gradients=False compares the states alone (for scoring under no_grad). Not cached: `plan` is.
    loss_options are accepted for plan's signature; the verdict does not depend on them."""
    start = time.perf_counter()
    check_vocabulary(batch, model.get_input_embeddings().num_embeddings)
    modes = prefix.candidate_modes(model, batch)  # read before eval mode switches checkpointing off
    if mode != "auto" and (problem := prefix.refusal(model, mode, batch)) is not None:
        passing = run_probe(model, batch, "auto", gradients=gradients)
        raise ValueError(f'{problem} mode="{passing.mode}" passes the exactness check on this model: use it (or "auto").')
    small = probe_batch(batch, reach(model)).to(model.device)
    with _probing(model):
        twin, holds, twin_error = float64_twin(model, small)
        with torch.autocast(model.device.type, enabled=False):
            plan = _check(model, twin, small, modes, mode, gradients)
        del twin
    if mode != "auto" and plan.mode != mode:
        failure = next(r for r in plan.reason.split("; ") if r.startswith(f'mode="{mode}"'))
        raise ValueError(
            f'{type(model).__name__}: {failure}. mode="{plan.mode}" passes the exactness check: use it (or "auto").'
        )
    errors = plan.errors + ((f"twin ({holds})", twin_error),)
    return Plan(plan.mode, plan.head, plan.reason, errors, time.perf_counter() - start)


def _outside_body(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of the causal LM that are neither in its body nor its LM head's weight and bias:
    a fused head, which applies the head alone to the body's states, gives them no gradient."""
    inside = {id(p) for p in prefix.body(model).parameters()}
    head = prefix.transformers_model(model).get_output_embeddings()
    inside |= {id(getattr(head, name, None)) for name in ("weight", "bias")}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]


# The largest logit the head is compared at: where a softcap bends (Gemma 2 caps at 30: 30 tanh(100 / 30) = 30 is
# 70% below 100), however small the logits of the probe's states are (a randomly initialised model's are ~0.1).
_HEAD_LOGIT = 100.0


@contextlib.contextmanager
def _body_output_scaled(model, scale: float):
    """The body's last hidden state multiplied by `scale` inside the model's own forward: its head then runs on
    states of any size."""

    def scaled(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * scale,) + tuple(output[1:])
        output["last_hidden_state"] = output["last_hidden_state"] * scale
        return output

    handle = prefix.body(model).register_forward_hook(scaled)
    try:
        yield
    finally:
        handle.remove()


def _head_verdict(twin, small, gradients) -> tuple[float, str | None]:
    """Whether the fused head gives the model's own logits: their values on every probe candidate, at the states
    the body gives and at the same states scaled so that the largest logit is _HEAD_LOGIT (the fused head is
    linear in the states; a softcap or another bend in the model's head shows where logits are large), and (with
    gradients) the gradient of every trainable parameter outside the body and the head, which only the model's own
    logits reach (a learnable logit scale)."""
    try:
        return _head_comparison(twin, small, gradients)
    except torch.OutOfMemoryError:
        raise
    except _CANNOT_RUN as e:  # e.g. RemBert's Linear takes a projection of the states, not the states
        return math.inf, f"it failed with {type(e).__name__}" + (f": {e}" if str(e) else "")


def _head_comparison(twin, small, gradients) -> tuple[float, str | None]:
    head = prefix.transformers_model(twin).get_output_embeddings()
    worst = (0.0, None)
    with torch.no_grad():
        states = prefix.prefix_forward(twin, small, "per-candidate", "fused")
        fused = torch.nn.functional.linear(states, head.weight)
        scale = max(1.0, _HEAD_LOGIT / float(fused.abs().max().clamp_min(1e-30)))
        for factor in (1.0, scale):
            with _body_output_scaled(twin, factor):
                own = prefix.prefix_forward(twin, small, "per-candidate", "logits")
            linear = fused * factor if head.bias is None else fused * factor + head.bias
            worst = max(worst, _verdict(lambda: (linear, None), (own, None), []), key=lambda v: v[0])
    outside = _outside_body(twin)
    if worst[1] is None and gradients and outside:
        names, params = [n for n, _ in outside], [p for _, p in outside]
        own = prefix.prefix_forward(twin, small, "per-candidate", "logits")
        grads = torch.autograd.grad(own, params, _upstream(own.shape, own.device), allow_unused=True)
        worst = _verdict(lambda: (own.detach(), [None] * len(params)), (own.detach(), list(grads)), names)
    return worst


class _Comparison:
    """The twin set up for comparing paths: its embeddings' gradients sparse (the rows of the probe's tokens, not a
    dense [V, D]), the head chosen (the fused head where head_problem finds nothing and its values and outside
    gradients match the model's own logits), the parameters whose vjp is compared (the body's for the fused head,
    whose states only the body reaches; every trainable one for the model's logits), the reference's states."""

    def __init__(self, model, twin, small, gradients, measure_head=False):
        for module in twin.modules():
            if isinstance(module, torch.nn.Embedding):  # also Gemma 3n / 4's embeddings per layer
                module.sparse = True
        self.twin, self.small, self.gradients = twin, small, gradients
        self.head, self.head_error, why = "fused", None, prefix.head_problem(model)
        linear = isinstance(prefix.transformers_model(model).get_output_embeddings(), torch.nn.Linear)
        if why is None or (measure_head and linear):  # measured also where the config already says no
            self.head_error = _head_verdict(twin, small, gradients)
            why = why or self.head_error[1]
        self.head_reason = None if why is None else f"its LM head alone does not give its logits ({why})"
        if why is not None:
            self.head = "logits"
        owner = prefix.body(twin) if self.head == "fused" else twin
        named = [(n, p) for n, p in owner.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.reference = _run(twin, small, "per-candidate", self.head, self.params, gradients)

    def verdict(self, mode, forward=prefix.prefix_forward) -> tuple[float, str | None]:
        run = lambda: _run(self.twin, self.small, mode, self.head, self.params, self.gradients, forward)  # noqa: E731
        return _verdict(run, self.reference, self.names)


def _check(model, twin, small, modes, mode, gradients) -> Plan:
    compare = _Comparison(model, twin, small, gradients)
    errors = [("fused head", compare.head_error[0])] if compare.head_error else []
    failures = []
    for candidate in modes if mode == "auto" else [mode] + [m for m in modes if m != mode]:
        if candidate == "per-candidate":
            break  # the reference itself
        err, why = compare.verdict(candidate)
        errors.append((candidate, err))
        if why is None:
            break
        failures.append(f'mode="{candidate}" is not exact: {why}')
    reason = "; ".join([r for r in [compare.head_reason] + failures if r])
    return Plan(candidate, compare.head, reason, tuple(errors))


def path_errors(model, batch: PackedBatch, modes=("packed", "kv-cache", "none"), *, gradients: bool = True) -> dict:
    """{path: (error, why not exact or None)} as the check measures them, for the fused head ("fused head") and for
    every mode in `modes` run as it is, even where prefix.candidate_modes leaves it out by construction (with the
    head the check would choose); math.inf for a path that cannot run. For measuring the margin between rounding
    and structure (benchmarks/architecture_sweep.py, benchmarks/bench_probe.py), not for choosing a path."""
    small = probe_batch(batch, reach(model)).to(model.device)
    with _probing(model):
        twin, holds, twin_error = float64_twin(model, small)
        with torch.autocast(model.device.type, enabled=False):
            compare = _Comparison(model, twin, small, gradients, measure_head=True)
            found = {"fused head": compare.head_error} if compare.head_error else {}
            found.update({mode: compare.verdict(mode, _unchecked) for mode in modes})
    found[f"twin ({holds})"] = (twin_error, None)
    return found


def plan(model, batch: PackedBatch, mode: str = "auto", *, gradients: bool = True, **loss_options) -> Plan:
    """The Plan for `model` in `mode` on batches like `batch`, checked at the first call for this model, mode,
    checkpointing setting, attention implementation, set of trainable parameters and set of modes the batch allows
    by construction, and cached (weakly, on the model) after; a plan checked with gradients also serves
    gradients=False. When it is not the first choice (another mode than resolve_mode's, or the model's own
    logits), it says so once, as a warning on stderr; an explicit mode that fails raises ValueError naming the mode
    that passed."""
    if mode not in prefix.MODES:
        raise ValueError(f"mode must be one of {prefix.MODES}, got {mode!r}")
    plans = _PLANS.setdefault(model, {})
    key = _key(model, mode, batch)
    for checked in (True, False) if not gradients else (True,):
        if key + (checked,) in plans:
            return plans[key + (checked,)]
    chosen = plans[key + (gradients,)] = run_probe(model, batch, mode, gradients=gradients)
    if chosen.reason:
        head = "the fused head" if chosen.head == "fused" else "the model's own logits"
        warnings.warn(f'rrhf_fast: {type(model).__name__} runs mode="{chosen.mode}" with {head}: {chosen.reason}', stacklevel=3)
    return chosen


def _key(model, mode: str, batch: PackedBatch | None) -> tuple:
    """What a plan is cached under, beside the model: the settings that can change the verdict (not the dtype:
    the check runs in float64 whatever the model computes in)."""
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    selectable = frozenset(m for m in prefix.MODES if prefix.selection_problem(model, batch, m) is None)
    return (mode, prefix.is_checkpointing(model), prefix.attn_implementation(model), trainable, selectable)


def adopt(model, chosen: Plan, mode: str = "auto", batch: PackedBatch | None = None) -> None:
    """Cache `chosen` as `plan(model, batch, mode)`'s answer without checking: for a model whose weights are elsewhere
    (under FSDP2 the ranks that built it on the meta device take rank 0's verdict)."""
    _PLANS.setdefault(model, {})[_key(model, mode, batch) + (True,)] = chosen
