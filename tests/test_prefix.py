"""prefix_forward and model_loss: every mode gives the same hidden states, loss and parameter gradients as
re-encoding every candidate ("none"), on tiny random float64 models of several architectures.

Tolerances are relative (norm of the difference over the norm of the reference). Llama-family RMSNorm and eager
softmax run in float32 even in a float64 model, so equal maths still differs at ~1e-7: hence 1e-6.
"""

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rrhf_fast import reference
from rrhf_fast.batch import pack_batch
from rrhf_fast.checked import model_loss
from rrhf_fast.prefix import batch_loss, candidate_modes, lm_head, prefix_forward, resolve_mode

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine the threads' barriers stall: one
    thread runs this file ~100x faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 101
RTOL = 1e-6
LOSS_OPTIONS = dict(margin=0.05, length_penalty=1.0, rank_weight=1.0, sft_weight=0.7)

# Tiny configs: 32 wide, 2 layers. Each exercises something the packed forward must handle.
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
ARCHITECTURES = {
    # rotary, GQA, final RMSNorm, tied input/output embeddings
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(**SMALL, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    # q/k/v biases; one full and one sliding-window layer, window 3: packed must pass a mask per layer type
    "qwen2-sliding": lambda: Qwen2ForCausalLM(
        Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    ),
    # every layer slides over a window of 4 positions
    "mistral-sliding": lambda: MistralForCausalLM(
        MistralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2, sliding_window=4)
    ),
    # partial rotary, parallel residual, final LayerNorm
    "gpt-neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(**SMALL, intermediate_size=48, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
    ),
    # absolute position embeddings, LayerNorm, tied embeddings, Conv1D projections
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **NO_DROPOUT)
    ),
    # learned absolute positions with an offset of 2, a padding_idx embedding
    "opt": lambda: OPTForCausalLM(
        OPTConfig(**SMALL, ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, bos_token_id=2, eos_token_id=2)
    ),
    # softcapped attention scores, alternating sliding/full layers, scaled embeddings (eager attention only)
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(**SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8, sliding_window=3, final_logit_softcapping=None)
    ),
    # ALiBi from the padding mask: packed cannot serve it, kv-cache can
    "bloom": lambda: BloomForCausalLM(
        BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)
    ),
}
# (architecture, attention implementation) pairs to test; the first listed for an architecture is its default.
ATTENTION = {"gemma2": ["eager"], "bloom": ["eager"]}
CASES = [(arch, attn) for arch in ARCHITECTURES for attn in ATTENTION.get(arch, ["sdpa", "eager"])]
PACKED_REFUSED = {"bloom"}


def make_model(arch: str, attn: str | None = None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    if arch not in ATTENTION or attn is not None:  # Bloom has a single attention of its own
        model.set_attn_implementation(attn or ATTENTION.get(arch, ["sdpa"])[0])
    return model.to(dtype).eval()


def enable_checkpointing(model, use_reentrant=False):
    """Gradient checkpointing on, in training mode (the only mode where transformers checkpoints)."""
    # Renamed in later transformers 5 releases; either spelling takes the checkpoint kwargs first.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})
    model.train()


def random_groups(seed, ks=(1, 3, 5)):
    """Groups with prompts of 1-6 tokens, k from `ks`, candidates of 1-5 tokens (one of length 1 at least), and
    rewards drawn from {0, 1, 2} so that ties occur."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=gen).tolist()

    prompts, candidates, rewards = [], [], []
    for k in ks:
        prompts.append(ids(int(torch.randint(1, 7, (1,), generator=gen))))
        lengths = [1] + torch.randint(1, 6, (k - 1,), generator=gen).tolist()
        candidates.append([ids(n) for n in lengths])
        rewards.append(torch.randint(0, 3, (k,), generator=gen).double().tolist())
    return prompts, candidates, rewards


def rel_err(actual, expected):
    return float((actual - expected).detach().norm() / expected.detach().norm().clamp_min(1e-30))


def loss_and_grads(model, batch, mode):
    """Reference loss on prefix_forward's hidden states, and the gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    hidden = prefix_forward(model, batch, mode)
    weight, bias = lm_head(model)
    out = reference.rrhf_loss(
        hidden, weight, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, bias=bias, **LOSS_OPTIONS
    )
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), out.loss.detach(), grads


def assert_same(result, expected, rtol=RTOL):
    """Same hidden states, loss and gradients, each to rtol relative. A gradient that is zero in exact arithmetic
    (a key bias: softmax ignores a shift common to a row) holds only rounding noise, so each parameter's error is
    measured against at least 1e-3 of the whole gradient's norm."""
    (hidden, loss, grads), (hidden_ref, loss_ref, grads_ref) = result, expected
    assert rel_err(hidden, hidden_ref) < rtol
    assert rel_err(loss, loss_ref) < rtol
    assert_same_grads(grads, grads_ref, rtol)


def assert_same_grads(grads, grads_ref, rtol=RTOL):
    assert grads.keys() == grads_ref.keys()
    floor = 1e-3 * torch.stack([g.norm() for g in grads_ref.values()]).norm()
    for name, grad in grads.items():
        assert (grad - grads_ref[name]).norm() < rtol * torch.maximum(grads_ref[name].norm(), floor), name


@pytest.mark.parametrize("arch, attn", CASES)
def test_modes_match_reencoding(arch, attn):
    model = make_model(arch, attn)
    batch = pack_batch(*random_groups(seed=len(arch)))
    expected = loss_and_grads(model, batch, "none")
    assert_same(loss_and_grads(model, batch, "kv-cache"), expected)
    assert_same(loss_and_grads(model, batch, "per-candidate"), expected)
    if arch in PACKED_REFUSED:
        with pytest.raises(ValueError, match='Use mode="kv-cache"'):
            prefix_forward(model, batch, "packed")
    else:
        assert_same(loss_and_grads(model, batch, "packed"), expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gpt2", "opt"])
@pytest.mark.parametrize("mode", ["packed", "kv-cache", "none", "per-candidate"])
def test_logits_head_equals_the_fused_head(arch, mode):
    """head="logits" (the whole causal LM, its logits at the response positions only) gives the fused head's
    logits, loss and gradients in every mode, for a random upstream gradient."""
    model = make_model(arch)
    batch = pack_batch(*random_groups(seed=19, ks=(2, 1, 3)))
    weight, bias = lm_head(model)
    hidden = prefix_forward(model, batch, mode)
    fused = hidden @ weight.T + (0 if bias is None else bias)
    logits = prefix_forward(model, batch, mode, head="logits")
    assert logits.shape == (batch.num_tokens, VOCAB)
    assert rel_err(logits, fused) < RTOL
    upstream = torch.randn_like(logits)
    names, params = zip(*model.named_parameters())
    grads = [torch.autograd.grad((x * upstream).sum(), params, allow_unused=True) for x in (logits, fused)]
    assert_same_grads(*({n: g for n, g in zip(names, gs) if g is not None} for gs in grads))
    losses = [batch_loss(model, batch, mode, head, backend="reference", **LOSS_OPTIONS).loss for head in ("logits", "fused")]
    assert rel_err(*losses) < RTOL


def test_model_that_is_its_own_base_model():
    """Llama4ForCausalLM names itself as its base model; its body is model.model, and every mode matches
    re-encoding where it passes the probe."""
    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Llama4ForCausalLM(config).double().eval()
    assert model.base_model is model
    batch = pack_batch(*random_groups(seed=23, ks=(2, 3)))
    expected = loss_and_grads(model, batch, "per-candidate")
    assert_same(loss_and_grads(model, batch, "kv-cache"), expected)
    assert_same(loss_and_grads(model, batch, "none"), expected)


def test_cache_argument_raises_no_deprecation_warning():
    """kv-cache passes the cache under the name the installed transformers' forward takes (`cache` from 5.2x,
    `past_key_values` before): none of the project's own calls warns."""
    import warnings

    model = make_model("llama", "sdpa")
    batch = pack_batch(*random_groups(seed=29, ks=(2, 3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for head in ("fused", "logits"):
            prefix_forward(model, batch, "kv-cache", head=head)
    assert not [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head must be one of"):
        prefix_forward(make_model("llama"), pack_batch([[1]], [[[2]]], [[0.0]]), "none", head="softcap")


def test_token_past_the_vocabulary_names_group_and_position():
    model = make_model("llama", "sdpa")
    # One group: the probe's second group is this one again, so the position must be read in the real batch.
    with pytest.raises(ValueError, match=f"candidate 2 of group 0 holds token id {VOCAB} at position 1"):
        model_loss(model, pack_batch([[1, 2]], [[[4], [5, 6], [7, VOCAB]]], [[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match=f"prompt of group 0 holds token id {VOCAB + 5} at position 1"):
        prefix_forward(model, pack_batch([[1, VOCAB + 5]], [[[4]]], [[0.0]]), "none")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_k_from_1_to_5_and_rows_of_one_group(arch):
    """Packing five groups in one row gives the same result as one group per row, and both match re-encoding."""
    model = make_model(arch, "sdpa")
    groups = random_groups(seed=7, ks=(1, 2, 3, 4, 5))
    one_row, one_group_per_row = pack_batch(*groups), pack_batch(*groups, max_tokens=1)
    assert one_row.input_ids.shape[0] == 1 and one_group_per_row.input_ids.shape[0] == 5
    expected = loss_and_grads(model, one_row, "none")
    assert_same(loss_and_grads(model, one_row, "packed"), expected)
    assert_same(loss_and_grads(model, one_group_per_row, "packed"), expected)
    assert_same(loss_and_grads(model, one_group_per_row, "kv-cache"), expected)


@pytest.mark.parametrize("mode", ["packed", "kv-cache", "none"])
def test_pad_token_never_leaks(mode):
    """Rows and candidates of different lengths get padding in every mode; its id changes nothing."""
    model = make_model("llama", "sdpa")
    groups = random_groups(seed=3)
    first = prefix_forward(model, pack_batch(*groups, max_tokens=1, pad_token_id=0), mode)
    second = prefix_forward(model, pack_batch(*groups, max_tokens=1, pad_token_id=VOCAB - 1), mode)
    assert torch.equal(first, second)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_model_loss_matches_full_model_logits(arch):
    """Body + LM head (with a bias, to check it is passed) = the model's own logits: the final norm, tied
    embeddings and head are all accounted for."""
    model = make_model(arch)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.bias = torch.nn.Parameter(torch.randn(VOCAB, dtype=torch.float64))
    batch = pack_batch(*random_groups(seed=11, ks=(2, 3)))
    out = model_loss(model, batch, backend="reference", **LOSS_OPTIONS)

    logits = []
    cu_groups, cu_seqlens = batch.cu_groups.tolist(), batch.cu_seqlens.tolist()
    flat_ids = batch.input_ids.reshape(-1)
    for g in range(batch.num_groups):
        start, plen = int(batch.prompt_starts[g]), int(batch.prompt_lengths[g])
        for c in range(cu_groups[g], cu_groups[g + 1]):
            cand = batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]]
            sequence = torch.cat([flat_ids[start : start + plen], cand])
            logits.append(model(input_ids=sequence[None]).logits[0, plen - 1 : -1])
    expected = reference.rrhf_loss_from_logits(
        torch.cat(logits), batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, **LOSS_OPTIONS
    )
    assert rel_err(out.loss, expected.loss) < RTOL
    assert rel_err(out.scores, expected.scores) < RTOL
    # The default backend (the chunked PyTorch path on CPU) gives the same loss.
    assert rel_err(model_loss(model, batch, **LOSS_OPTIONS).loss, expected.loss) < RTOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_model_runs_its_adapters(arch):
    """A peft PeftModel: every mode runs the transformers model inside it, adapters included, and gives the
    gradients of re-encoding to the adapter parameters and to nothing else."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(arch, "sdpa"), peft.LoraConfig(r=3, target_modules="all-linear"))
    adapters = [p for name, p in model.named_parameters() if ".lora_" in name]
    with torch.no_grad():
        for p in adapters:  # B starts at zero, which would make the adapters invisible
            p.normal_(std=0.1)
    batch = pack_batch(*random_groups(seed=17))
    expected = loss_and_grads(model, batch, "none")
    assert_same(loss_and_grads(model, batch, "kv-cache"), expected)
    assert_same(loss_and_grads(model, batch, "packed"), expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(expected[2])
    assert len(expected[2]) == len(adapters) > 0
    with model.disable_adapter():
        assert rel_err(prefix_forward(model, batch, "packed"), expected[0]) > 1e-3


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    """Packed runs under gradient checkpointing with the same gradients; kv-cache refuses (the cache is dropped
    inside checkpointed layers) and auto picks packed."""
    model = make_model("llama", "sdpa")
    batch = pack_batch(*random_groups(seed=5))
    expected = loss_and_grads(model, batch, "none")
    enable_checkpointing(model, use_reentrant)
    assert_same(loss_and_grads(model, batch, "packed"), expected)
    assert resolve_mode(model, "auto") == "packed"
    with pytest.raises(ValueError, match='Use mode="packed"'):
        prefix_forward(model, batch, "kv-cache")


@pytest.mark.parametrize("mode", ["packed", "kv-cache"])
def test_bf16_autocast(mode):
    """Under bf16 autocast on a float32 model, every mode stays within bf16 rounding of re-encoding."""
    model = make_model("llama", "sdpa", dtype=torch.float32)
    batch = pack_batch(*random_groups(seed=9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = prefix_forward(model, batch, "none").float()
        hidden = prefix_forward(model, batch, mode).float()
        hidden.backward(torch.randn_like(hidden))
    assert rel_err(hidden, expected) < 3e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_auto_picks_the_cache_with_a_dense_mask(attn):
    assert resolve_mode(make_model("gpt2", attn), "auto") == "kv-cache"


def test_modes_that_cannot_serve_say_which_to_use():
    model = make_model("llama", "sdpa")
    assert candidate_modes(model) == ["kv-cache", "packed", "none", "per-candidate"]
    model.config._attn_implementation = "flash_attention_2"  # what a model loaded with flash-attn reports
    with pytest.raises(ValueError, match='Use mode="kv-cache"'):
        resolve_mode(model, "packed")
    assert resolve_mode(model, "auto") == "kv-cache"
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode(model, "shared")
    # Under checkpointing neither packed (this attention) nor kv-cache can serve: only re-encoding is left.
    enable_checkpointing(model)
    assert resolve_mode(model, "auto") == "none"
    with pytest.raises(ValueError, match='Use mode="none"'):
        resolve_mode(model, "kv-cache")
    with pytest.raises(ValueError, match='Use mode="none"'):
        resolve_mode(model, "packed")


@pytest.mark.parametrize(
    "field, value",
    [("final_logit_softcapping", 30.0), ("logits_soft_cap", 30.0), ("logit_scale", 0.0625), ("logits_scaling", 8.0),
     ("lm_head_multiplier", 0.5), ("unpadded_vocab_size", VOCAB - 3)],
)  # fmt: skip
def test_nonlinear_heads_are_refused_by_lm_head_and_model_loss_uses_the_logits(field, value):
    """lm_head refuses a head it knows to be more than a Linear; model_loss then takes the model's own logits (this
    Llama ignores the field, so they equal the fused head's) and says so."""
    batch = pack_batch(*random_groups(seed=2, ks=(2, 3)))
    expected = model_loss(make_model("llama", "sdpa"), batch, backend="reference", **LOSS_OPTIONS).loss
    model = make_model("llama", "sdpa")  # the same weights; a plan is made once per model
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=f"{field}={value}.*rrhf_loss_from_logits"):
        lm_head(model)
    with pytest.warns(UserWarning, match=f"model's own logits.*{field}"):
        loss = model_loss(model, batch, backend="reference", **LOSS_OPTIONS).loss
    assert rel_err(loss, expected) < RTOL


def test_a_scale_of_one_is_a_plain_head():
    model = make_model("llama", "sdpa")
    model.config.logits_scaling = 1.0
    assert lm_head(model)[0] is model.get_output_embeddings().weight


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention BlockMask needs CUDA")
def test_flex_attention_block_mask_on_cuda():
    # FlexAttention's compiled kernels need a head dimension of at least 16: 2 heads of 16, not SMALL's 4 of 8
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, "num_attention_heads": 2}, intermediate_size=48, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("flex_attention")
    model = model.float().eval().cuda()
    batch = pack_batch(*random_groups(seed=13, ks=(2, 4))).to("cuda")
    expected = loss_and_grads(model, batch, "none")
    assert_same(loss_and_grads(model, batch, "packed"), expected, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_packs_on_cuda():
    """On a GPU the masked packed rows beat the per-group cache (resolve_mode's docstring has the figures)."""
    assert resolve_mode(make_model("llama", "sdpa", dtype=torch.float32).cuda(), "auto") == "packed"
