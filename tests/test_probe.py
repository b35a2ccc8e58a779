"""rrhf_fast.probe: the exactness check at the first model_loss on a model passes where every path is exact,
leaves the model as it was, and catches (then falls back from) heads and modes that are wrong: a softcapped head,
a learnable logit scale, layers with a state along the sequence, a model whose outputs depend on padding.

Every expected value is the loss and parameter gradients of each candidate after its prompt alone, unpadded,
through the model's own forward(...).logits (rrhf_fast.reference), on tiny random float64 models; 1e-6 relative.
"""

import contextlib
import functools
import warnings

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from rrhf_fast import prefix, probe, reference
from rrhf_fast.batch import pack_batch
from rrhf_fast.checked import model_loss
from rrhf_fast.prefix import resolve_mode, sequence_state
from test_prefix import VOCAB, make_model, one_thread, random_groups  # noqa: F401  (one_thread: an autouse fixture)

RTOL = 1e-6
LOSS_OPTIONS = dict(margin=0.05, sft_weight=0.7)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def llama(**config):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=48, **config))
    model.set_attn_implementation("sdpa")
    return model.double().eval()


class SoftcappedLlama(LlamaForCausalLM):
    """logits = cap tanh(logits / cap), with nothing in the config to say so (a patched forward)."""

    cap = 0.5

    @functools.wraps(LlamaForCausalLM.forward)  # the same signature: the cache goes by the name it takes
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = self.cap * torch.tanh(out.logits / self.cap)
        return out


class ScaledLlama(LlamaForCausalLM):
    """logits = s * logits with a learnable s that starts at 1: the forward equals the fused head's, but only the
    model's own logits carry a gradient to s."""

    def __init__(self, config):
        super().__init__(config)
        self.logit_scale_param = torch.nn.Parameter(torch.ones(()))

    @functools.wraps(LlamaForCausalLM.forward)
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.logit_scale_param
        return out


def patched(cls):
    torch.manual_seed(0)
    model = cls(LlamaConfig(**SMALL, intermediate_size=48))
    model.set_attn_implementation("sdpa")
    return model.double().eval()


def padding_sensitive():
    """A Llama whose final norm adds a tenth of the mean over the sequence: every position then depends on all
    tokens of its row, padding and other candidates included (as learned top-k attention can)."""
    model = llama()
    norm = model.model.norm
    plain = norm.forward
    norm.forward = lambda x: plain(x + 0.1 * x.mean(dim=1, keepdim=True))
    return model


def lfm2():
    torch.manual_seed(0)
    config = Lfm2Config(**SMALL, intermediate_size=48, layer_types=["conv", "full_attention"])
    return Lfm2ForCausalLM(config).double().eval()


def mamba():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4)
    return MambaForCausalLM(config).double().eval()


def gemma2_softcapped():
    torch.manual_seed(0)
    config = Gemma2Config(**SMALL, intermediate_size=48, head_dim=8, sliding_window=3, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config)
    model.set_attn_implementation("eager")
    return model.double().eval()


def real_batch(seed=0):
    """Three groups (k = 3, 1, 4) as tests/test_prefix.py draws them: prompts of 1-6 tokens, candidates of 1-5."""
    return pack_batch(*random_groups(seed, ks=(3, 1, 4)))


def reencoded(model, batch):
    """The loss and gradients of every candidate after its prompt alone through model(...).logits."""
    model.zero_grad(set_to_none=True)
    flat, logits = batch.input_ids.reshape(-1), []
    cu_groups, cu_seqlens = batch.cu_groups.tolist(), batch.cu_seqlens.tolist()
    for g in range(batch.num_groups):
        start, plen = int(batch.prompt_starts[g]), int(batch.prompt_lengths[g])
        for c in range(cu_groups[g], cu_groups[g + 1]):
            sequence = torch.cat([flat[start : start + plen], batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]]])
            logits.append(model(input_ids=sequence[None]).logits[0, plen - 1 : -1])
    out = reference.rrhf_loss_from_logits(
        torch.cat(logits), batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, **LOSS_OPTIONS
    )
    out.loss.backward()
    return out.loss.detach(), grads_of(model)


def grads_of(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def through_model_loss(model, batch, mode="auto"):
    model.zero_grad(set_to_none=True)
    out = model_loss(model, batch, mode=mode, **LOSS_OPTIONS)
    out.loss.backward()
    return out.loss.detach(), grads_of(model)


def assert_exact(result, expected):
    """Loss and every parameter's gradient to RTOL; each gradient against at least 1e-3 of the whole gradient's norm
    (a gradient zero in exact arithmetic holds only rounding)."""
    (loss, grads), (loss_ref, grads_ref) = result, expected
    assert abs(float(loss - loss_ref)) <= RTOL * abs(float(loss_ref))
    assert grads.keys() == grads_ref.keys()
    floor = 1e-3 * torch.stack([g.norm() for g in grads_ref.values()]).norm()
    for name, grad in grads.items():
        assert (grad - grads_ref[name]).norm() <= RTOL * torch.maximum(grads_ref[name].norm(), floor), name


@pytest.mark.parametrize("mode", ["packed", "kv-cache", "none", "per-candidate"])
def test_plain_llama_passes_in_every_mode_and_is_left_untouched(mode):
    """The plan is the mode asked for with the fused head, silently; parameters, .grad, train/eval flags and the RNG
    state are as before; the loss and gradients through model_loss equal re-encoding."""
    model, batch = llama(), real_batch()
    model.train()  # dropout is 0, but the probe must put the flag back
    model.model.layers[0].eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = probe.plan(model, batch, mode, **LOSS_OPTIONS)
    assert plan == probe.Plan(mode, "fused")
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, grads_before[name]), name
    model.eval()
    assert_exact(through_model_loss(model, batch, mode), reencoded(model, batch))


def test_the_probe_runs_once_per_model_and_mode(monkeypatch):
    """Cached per model and mode, and per set of trainable parameters; not per dtype (the check runs in float64
    whatever the model computes in); a plan checked with gradients serves scoring under no_grad, not the reverse."""
    model, batch, calls = llama(), real_batch(), []
    run = probe.run_probe
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: calls.append((a[2], k["gradients"])) or run(*a, **k))
    for seed in range(3):
        model_loss(model, real_batch(seed), **LOSS_OPTIONS)
    with torch.no_grad():
        model_loss(model, batch, **LOSS_OPTIONS)
        model_loss(model, batch, mode="none", **LOSS_OPTIONS)
    model_loss(model, batch, mode="none", **LOSS_OPTIONS)
    model_loss(model.float(), batch, mode="none", **LOSS_OPTIONS)  # another dtype: the same verdict
    model.model.embed_tokens.weight.requires_grad_(False)
    model_loss(model, batch, mode="none", **LOSS_OPTIONS)  # other trainable parameters: checked again
    assert calls == [("auto", True), ("none", False), ("none", True), ("none", True)]


def test_probe_batch_is_cut_from_the_real_tokens_and_crosses_the_windows():
    """Two groups, k = 2 and 3, one candidate of a single token, prompts of two lengths, prompts and longest
    candidates of at least reach tokens (one past Gemma 2's window of 3 would be 4: at least 8), every id one of
    the real batch's."""
    batch = real_batch()
    assert probe.reach(gemma2_softcapped()) == 8
    assert probe.reach(llama(sliding_window=20)) == 21
    small = probe.probe_batch(batch, 11)
    assert small.cu_groups.tolist() == [0, 2, 5]
    assert small.candidate_lengths.tolist() == [11, 1, 11, 3, 2]
    assert small.prompt_lengths.tolist() == [11, 14]
    assert set(small.input_ids.unique().tolist()) <= set(batch.input_ids.unique().tolist())
    first_prompt = batch.input_ids[0, : int(batch.prompt_lengths[0])].tolist()
    assert small.input_ids[0, :11].tolist() == (first_prompt * 11)[:11]


@pytest.mark.parametrize("build", [lambda: patched(SoftcappedLlama), gemma2_softcapped], ids=["patched", "gemma2"])
def test_softcapped_head_falls_back_to_the_models_logits(build):
    model, batch = build(), real_batch(1)
    with pytest.warns(UserWarning, match="model's own logits"):
        plan = probe.plan(model, batch, **LOSS_OPTIONS)
    assert plan.head == "logits"
    assert_exact(through_model_loss(model, batch), reencoded(model, batch))


def test_learnable_logit_scale_gets_its_gradient():
    """The forward at s = 1 equals the fused head's; the missing gradient of s is what the probe sees."""
    model, batch = patched(ScaledLlama), real_batch(2)
    with pytest.warns(UserWarning, match="gradient of logit_scale_param"):
        plan = probe.plan(model, batch, **LOSS_OPTIONS)
    assert plan.head == "logits"
    result = through_model_loss(model, batch)
    assert result[1]["logit_scale_param"].abs() > 1e-3
    assert_exact(result, reencoded(model, batch))


@pytest.mark.parametrize("build", [lfm2, mamba], ids=["lfm2", "mamba"])
def test_state_along_the_sequence_excludes_packed_and_falls_back(build):
    """A convolution / SSM layer: packed is refused before any forward (naming the mode to use); kv-cache cannot
    repeat such a cache; auto says so once and runs an exact mode; asking for packed names the one that passes."""
    model, batch = build(), real_batch(3)
    with pytest.raises(ValueError, match='carries a state along the sequence.*Use mode="none"'):
        resolve_mode(model, "packed")
    with pytest.raises(ValueError, match=r'into the next\. mode="none" passes the exactness check'):
        model_loss(model, batch, mode="packed", **LOSS_OPTIONS)
    with pytest.raises(ValueError, match='mode="kv-cache" is not exact.*mode="none" passes'):
        model_loss(model, batch, mode="kv-cache", **LOSS_OPTIONS)
    with pytest.warns(UserWarning, match='runs mode="none".*kv-cache'):
        plan = probe.plan(model, batch, **LOSS_OPTIONS)
    assert plan == probe.Plan("none", "fused", plan.reason)
    assert_exact(through_model_loss(model, batch), reencoded(model, batch))


def test_sequence_state_from_config_and_modules():
    """Config layer kinds and module types; GPT-2's Conv1D (a Linear) and a vision tower's convolution are not
    along the text."""
    assert sequence_state(llama()) is None and sequence_state(make_model("gpt2")) is None
    assert "'conv' layers (layer_types)" in sequence_state(lfm2())
    assert "'linear_attention' layers" in sequence_state(mamba())
    model = llama()  # read once per model: each case on a fresh one
    model.model.vision_tower = torch.nn.Conv1d(3, 3, 4)
    assert sequence_state(model) is None
    model = llama()
    model.model.layers[1].short_conv = torch.nn.Conv1d(32, 32, 3, groups=32)
    assert sequence_state(model) == "layers.1.short_conv is a convolution along the sequence (kernel 3)"


def test_padding_sensitive_model_falls_back_to_one_candidate_a_forward():
    """Right padding and row neighbours change this model's outputs: every batched mode fails, and the last resort
    (one candidate a forward, unpadded) is exact."""
    model, batch = padding_sensitive(), real_batch(4)
    with pytest.warns(UserWarning, match='runs mode="per-candidate"') as caught:
        plan = probe.plan(model, batch, **LOSS_OPTIONS)
    assert plan.mode == "per-candidate" and plan.head == "fused"
    assert all(f'mode="{m}" is not exact' in str(caught[0].message) for m in ("kv-cache", "packed", "none"))
    assert_exact(through_model_loss(model, batch), reencoded(model, batch))


def test_window_under_another_name():
    """GPT-Neo's local layers hold their window as window_size. The packed mask does not know it: the probe finds
    packed wrong. kv-cache runs such a model one group at a time (a batched cache's gap between a short prompt and
    its candidates would count against the window) and is exact."""
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
    )  # fmt: skip
    model, batch = GPTNeoForCausalLM(config).double().eval(), real_batch(6)
    with pytest.raises(ValueError, match='mode="packed" is not exact.*mode="kv-cache" passes'):
        model_loss(model, batch, mode="packed", **LOSS_OPTIONS)
    assert probe.plan(model, batch, **LOSS_OPTIONS) == probe.Plan("kv-cache", "fused")
    assert_exact(through_model_loss(model, batch), reencoded(model, batch))


def test_explicit_failing_mode_names_the_passing_one():
    model = padding_sensitive()
    with pytest.raises(ValueError, match='mode="none" is not exact.*mode="per-candidate" passes'):
        model_loss(model, real_batch(5), mode="none", **LOSS_OPTIONS)


def test_tolerance_follows_the_dtype():
    assert probe.tolerance(torch.float64) == 1e-6
    assert 5e-4 < probe.tolerance(torch.float32) < 1e-3
    assert 0.1 < probe.tolerance(torch.bfloat16) < 0.2


def test_fallback_warning_says_in_one_clause_why_the_head_is_not_the_models_own():
    """The warning names the softcap, and not lm_head's advice to call rrhf_loss_from_logits (the probe does that)."""
    model, batch = gemma2_softcapped(), real_batch(7)
    with pytest.warns(UserWarning, match=r"own logits: its LM head alone does not give its logits \(its logits use "
                      r"final_logit_softcapping=0\.5\)") as caught:  # fmt: skip
        probe.plan(model, batch, **LOSS_OPTIONS)
    assert "rrhf_loss_from_logits" not in str(caught[0].message)


@pytest.mark.parametrize("error", [KeyError("indexed_attention"), AssertionError()], ids=["KeyError", "AssertionError"])
def test_a_path_that_raises_inside_the_model_is_a_verdict_not_a_crash(monkeypatch, error):
    """A mode that raises a KeyError (Dots3Note looked up a mask for a layer type packed did not build) or a bare
    AssertionError (XLM's 2-D mask check) from the modeling code is not exact: auto goes on to the next mode, and
    the warning names the exception."""
    from rrhf_fast import prefix

    def raising(model, batch, head):
        raise error

    monkeypatch.setitem(prefix.FORWARDS, "kv-cache", raising)
    model, batch = llama(), real_batch(8)
    with pytest.warns(UserWarning, match=f'runs mode="packed".*kv-cache" is not exact: it failed with {type(error).__name__}'):
        plan = probe.plan(model, batch, **LOSS_OPTIONS)
    assert plan.mode == "packed"
    assert_exact(through_model_loss(model, batch), reencoded(model, batch))


def test_packed_mask_covers_every_listed_layer_type():
    """A config mixing sliding layers with a third layer type gets a mask for each type it lists (transformers looks
    each one up): the sliding one windowed, every other the full mask."""
    from rrhf_fast import prefix

    model, batch = llama(), real_batch(9)
    model.config.sliding_window = 2
    model.config.layer_types = ["sliding_attention", "indexed_attention"]
    masks = prefix._packed_mask_argument(model, batch)
    assert set(masks) == {"sliding_attention", "indexed_attention", "full_attention"}
    full = prefix.packed_attention_mask(batch, "sdpa", torch.float64)
    assert torch.equal(masks["indexed_attention"], full) and torch.equal(masks["full_attention"], full)
    assert torch.equal(masks["sliding_attention"], prefix.packed_attention_mask(batch, "sdpa", torch.float64, 2))
    assert not torch.equal(masks["sliding_attention"], full)


def test_kv_cache_refusal_for_a_forward_that_returns_no_cache():
    from rrhf_fast import prefix

    with pytest.raises(ValueError, match=r'LlamaForCausalLM returned no cache from its prompt forward\. Use mode="none"'):
        prefix._repeatable_cache(llama(), None)


# The float64 twin, the verdict's independence of the dtype, learned top-k selection


def deep_llama(layers=5, **config):
    torch.manual_seed(0)
    small = {**SMALL, "num_hidden_layers": layers}
    model = LlamaForCausalLM(LlamaConfig(**small, intermediate_size=48, **config))
    model.set_attn_implementation("sdpa")
    return model.eval()


def test_twin_keeps_one_layer_of_each_kind_and_matches_the_model():
    """A plain Llama of 5 layers keeps 2; with a layer type first seen at layer 3 it keeps 4; the twin is float64,
    holds that many layers, leaves the model whole, and its last layer's output is the model's own."""
    model = deep_llama()
    assert probe.layers_to_keep(model) == 2
    mixed = deep_llama(sliding_window=4, layer_types=["full_attention"] * 3 + ["sliding_attention"] * 2)
    assert probe.layers_to_keep(mixed) == 4
    small = probe.probe_batch(real_batch(), 8)
    twin, holds, err = probe.float64_twin(model, small)
    assert holds == "2 of 5 layers" and len(twin.model.layers) == 2 and twin.config.num_hidden_layers == 2
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
    assert {p.dtype for p in twin.parameters()} == {torch.float64}
    assert err <= 1e-5  # float32 against float64 after two layers


def test_twin_that_does_not_match_holds_every_layer(monkeypatch):
    """Where the cut copy's output differs from the model's own (here: the check's layer lookup sees another
    layer), the twin is the whole model."""
    model = deep_llama()
    layer_output = probe._layer_output
    monkeypatch.setattr(probe, "_layer_output", lambda m, i, ids: layer_output(m, i + (m is model), ids))
    twin, holds, _ = probe.float64_twin(model, probe.probe_batch(real_batch(), 8))
    assert holds == "every layer" and len(twin.model.layers) == 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_verdict_does_not_depend_on_the_dtype(dtype):
    """An exact path passes in float32, under bfloat16 autocast and in float16 (the check runs on the float64 twin);
    a padding-sensitive model fails in each by far more than the bound."""
    for build, expected in ((deep_llama, "kv-cache"), (padding_sensitive, "per-candidate")):
        model = build() if build is deep_llama else build().float()
        model = model.half() if dtype == "float16" else model
        context = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        with context, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = probe.run_probe(model, real_batch(10))
        assert plan.mode == expected and plan.head == "fused", plan
        errors = dict(plan.errors)
        if expected == "kv-cache":
            assert errors["kv-cache"] <= probe.TOLERANCE / 100
        else:
            assert min(errors[m] for m in ("kv-cache", "packed", "none")) >= 100 * probe.TOLERANCE


def test_scoring_under_no_grad_compares_the_states_alone(monkeypatch):
    """model_loss under no_grad checks without gradients: a learnable logit scale at 1 leaves the logits equal, so
    scoring keeps the fused head; training (gradients on) does not."""
    model, batch, calls = patched(ScaledLlama), real_batch(11), []
    run = probe.run_probe
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: calls.append(k["gradients"]) or run(*a, **k))
    with torch.no_grad():
        scores = model_loss(model, batch).scores
        assert probe.plan(model, batch, gradients=False).head == "fused"
    with pytest.warns(UserWarning, match="logit_scale_param"):
        assert probe.plan(model, batch).head == "logits"
    assert calls == [False, True]
    with torch.no_grad():  # the same scores as the model's own logits
        logits = prefix.prefix_forward(model, batch, "per-candidate", head="logits")
    expected = reference.rrhf_loss_from_logits(logits, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups).scores
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=0)


def test_a_softcap_is_caught_where_the_logits_are_small():
    """Random weights give logits of ~0.1, where tanh(z / 30) * 30 = z to 1e-6: the head is compared at states
    scaled up to logits of 100 too, where the cap bends them, with nothing in the config to say so."""

    class Capped30(SoftcappedLlama):
        cap = 30.0

    model, batch = patched(Capped30), real_batch(12)
    with torch.no_grad():
        assert model(batch.input_ids[:1]).logits.abs().max() < 1
    with pytest.warns(UserWarning, match="model's own logits"):
        assert probe.plan(model, batch).head == "logits"


def axk2(index_topk):
    import tiny_models

    config = tiny_models.tiny_config("axk2")
    config.index_topk = index_topk
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).double().eval()


def test_learned_top_k_selection_shares_the_prompt_only_while_it_keeps_every_key():
    """AXK2 keeps the top index_topk keys of a row by learned scores, with ties broken by the row's width: within
    the top-k every mode is plain attention and exact; past it every mode but per-candidate is refused, the same way
    under auto and when asked for, and the explicit refusal names per-candidate."""
    batch = real_batch(13)
    wide = axk2(index_topk=256)
    assert probe.plan(wide, batch, **LOSS_OPTIONS).mode == resolve_mode(wide, "auto", batch)
    for mode in ("packed", "kv-cache", "none"):
        assert_exact(through_model_loss(wide, batch, mode), reencoded(wide, batch))
    narrow = axk2(index_topk=4)
    assert prefix_modes(narrow, batch) == ["per-candidate"]
    assert probe.plan(narrow, batch, **LOSS_OPTIONS).mode == "per-candidate"
    for mode in ("packed", "kv-cache", "none"):
        with pytest.raises(ValueError, match=rf'mode="{mode}" puts up to \d+ keys in a row.*mode="per-candidate" passes'):
            model_loss(narrow, batch, mode=mode, **LOSS_OPTIONS)
    assert_exact(through_model_loss(narrow, batch), reencoded(narrow, batch))


def prefix_modes(model, batch):
    from rrhf_fast.prefix import candidate_modes

    return candidate_modes(model, batch)
