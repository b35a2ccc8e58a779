"""rrhf_fast.lora: LoRA through peft on tiny float32 models (the embedded Llama and a GPT-2 with tied embeddings
and Conv1D layers). Training through model_loss moves the adapters and nothing else, in every prefix mode; the
saved adapter reloads onto a fresh base; the merged model is a plain checkpoint that computes what the adapted
model did; bad options and mismatched checkpoints raise ValueError saying what to change."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rrhf_fast.batch import pack_batch
from rrhf_fast.default_model import build_model, build_tokenizer
from rrhf_fast.lora import (
    LoraOptions,
    add_lora,
    load_adapter_weights,
    merged_model,
    parameter_counts,
    parameter_summary,
    save_adapter,
)
from rrhf_fast.checked import model_loss

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (see tests/test_prefix.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 101  # token ids below this fit both models
# What "all-linear" adapts: every linear layer of the decoder, the LM head never.
DEFAULT_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
}


def make_model(arch: str, seed: int = 0):
    """A fresh tiny base model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "llama":  # untied head, rotary, RMSNorm; hidden 36 over 3 heads
        return build_model(build_tokenizer(), seed=seed, hidden_size=36, num_layers=2, num_heads=3)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=30, n_layer=2, n_head=3, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)  # tied head, learned positions, Conv1D projections


def adapters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def adapted_model(arch: str, options=None, seed: int = 0):
    """A LoRA model whose adapters hold random values, as after training (B starts at zero, which would make an
    adapter invisible), in eval mode."""
    model = add_lora(make_model(arch, seed), options or LoraOptions(r=3, dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapters(model).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_batch(seed: int):
    """Three groups (k = 1, 3, 4) with prompts of 1-5 tokens, candidates of 1-4 tokens, rewards with ties."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    prompts, candidates, rewards = [], [], []
    for k in (1, 3, 4):
        prompts.append(ids(int(torch.randint(1, 6, (1,), generator=gen))))
        candidates.append([ids(n) for n in [1] + torch.randint(1, 5, (k - 1,), generator=gen).tolist()])
        rewards.append(torch.randint(0, 3, (k,), generator=gen).float().tolist())
    return pack_batch(prompts, candidates, rewards)


def logits_of(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["packed", "kv-cache", "none"])
def test_training_moves_only_the_adapters(arch, mode):
    """A few AdamW steps of the RRHF loss: no base parameter gets a gradient or changes by a bit; every adapter
    matrix (A and B, on every default target and not on the LM head) changes."""
    model = make_model(arch)
    base = [(p, p.detach().clone()) for p in model.parameters()]
    model = add_lora(model, LoraOptions(r=3)).train()
    lora = adapters(model)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora} == DEFAULT_TARGETS[arch]
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is not adapted
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora.values()}
    start = {name: p.detach().clone() for name, p in lora.items()}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model_loss(model, make_batch(seed=step), mode=mode).loss.backward()
        assert all(p.grad is None for p, _ in base)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for p, before in base:
        assert torch.equal(p, before)
    for name, p in lora.items():
        assert not torch.equal(p, start[name]), name
    if arch == "gpt2":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_gradient_checkpointing_reaches_the_adapters():
    """Reentrant checkpointing enabled before add_lora (as the trainer will) gives the adapters the gradients
    they get without checkpointing."""

    def adapter_grads(checkpointing):
        model = make_model("llama")
        if checkpointing:  # renamed in later transformers 5 releases; either spelling takes the kwargs first
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(
                {"use_reentrant": True}
            )
        model = add_lora(model, LoraOptions(r=3, dropout=0.0)).train()
        with torch.no_grad():
            for p in adapters(model).values():
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(p.numel()))
        model_loss(model, make_batch(seed=3), mode="packed").loss.backward()
        return {name: p.grad for name, p in adapters(model).items()}

    expected, actual = adapter_grads(False), adapter_grads(True)
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        assert grad is not None and grad.norm() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_reloads_onto_a_fresh_base(arch, tmp_path):
    """save_adapter writes what peft's PeftModel.from_pretrained loads; load_adapter_weights (resuming) puts the
    same values into a fresh add_lora model; both compute the adapted model's logits."""
    options = LoraOptions(r=3, alpha=5.0, dropout=0.0)
    model = adapted_model(arch, options)
    expected = logits_of(model)
    save_adapter(model, str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 3

    by_peft = peft.PeftModel.from_pretrained(make_model(arch), str(tmp_path)).eval()
    torch.testing.assert_close(logits_of(by_peft), expected, rtol=0, atol=1e-6)

    resumed = add_lora(make_model(arch), options).eval()
    assert not torch.allclose(logits_of(resumed), expected, atol=1e-3)  # fresh adapters: B = 0
    load_adapter_weights(resumed, str(tmp_path))
    for (name, p), (name_saved, saved) in zip(adapters(resumed).items(), adapters(model).items()):
        assert name == name_saved and torch.equal(p, saved), name
    torch.testing.assert_close(logits_of(resumed), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_is_a_plain_checkpoint(arch, tmp_path):
    """merged_model + save_pretrained: a normal checkpoint (no adapter files or keys) that plain
    AutoModelForCausalLM loads, whose logits equal the adapted model's and differ from the base model's."""
    model = adapted_model(arch)
    expected, base_logits = logits_of(model), logits_of(make_model(arch).eval())
    assert (expected - base_logits).abs().max() > 1e-2  # the adapters matter

    merged = merged_model(model)
    assert type(merged) is type(make_model(arch))
    assert all(p.requires_grad for p in merged.parameters())
    merged.save_pretrained(str(tmp_path))
    assert "adapter_config.json" not in os.listdir(tmp_path)
    assert not [key for key in load_file(str(tmp_path / "model.safetensors")) if "lora" in key]

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(loaded) is type(merged)
    torch.testing.assert_close(logits_of(loaded), expected, rtol=0, atol=1e-5)
    if arch == "gpt2":
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_parameter_counts_are_the_adapters():
    """Each adapted layer with weight [out, in] (Conv1D: [in, out]) adds r * (in + out) trainable parameters."""
    base = make_model("gpt2")
    base_total = sum(p.numel() for p in base.parameters())  # the tied head counts once
    model = add_lora(base, LoraOptions(r=5))
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    expected = sum(5 * sum(m.get_base_layer().weight.shape) for m in layers)
    assert parameter_counts(model) == (expected, base_total + expected)
    assert f"{expected:,} of {base_total + expected:,} parameters trainable" in parameter_summary(model)
    assert "r=5 alpha=10 dropout=0.05" in parameter_summary(model)


def test_options_resolve_their_defaults():
    assert LoraOptions(r=8) == LoraOptions(r=8, alpha=16, dropout=0.05, target_modules="all-linear")
    assert LoraOptions(r=8, alpha=4).alpha == 4
    assert LoraOptions(r=2, target_modules=" q_proj, v_proj,").target_modules == ("q_proj", "v_proj")
    assert LoraOptions(r=2, target_modules=["k_proj"]).target_modules == ("k_proj",)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(r=0), r"rank r \(--lora-r\) must be a whole number >= 1, got 0"),
        (dict(r=2.5), "whole number >= 1, got 2.5"),
        (dict(r=4, alpha=0), r"alpha \(--lora-alpha\) must be a finite number > 0"),
        (dict(r=4, alpha=float("inf")), "finite number > 0, got inf"),
        (dict(r=4, dropout=1.0), r"dropout \(--lora-dropout\) must be in \[0, 1\), got 1.0"),
        (dict(r=4, dropout=-0.1), r"must be in \[0, 1\), got -0.1"),
        (dict(r=4, target_modules=" , "), "name no module: give \"all-linear\" or names such as q_proj,v_proj"),
    ],
)
def test_bad_options_say_what_to_change(options, message):
    with pytest.raises(ValueError, match=message):
        LoraOptions(**options)


def test_target_modules_that_match_nothing_list_the_real_names():
    with pytest.raises(ValueError, match="modules qproj, mlp.gate match no module of LlamaForCausalLM") as err:
        add_lora(make_model("llama"), LoraOptions(r=2, target_modules="q_proj,qproj,mlp.gate"))
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(err.value)
    assert "lm_head" not in str(err.value)
    # A dotted suffix names modules too, as in peft.
    assert len(adapters(add_lora(make_model("llama"), LoraOptions(r=2, target_modules="mlp.up_proj")))) == 2 * 2


@pytest.mark.parametrize(
    "arch, target, message",
    [
        ("llama", "lm_head", "'lm_head' is the LM head: the fused loss applies the head's weight itself"),
        ("gpt2", "wte", "'wte' is the input embedding, which this model ties to its LM head"),
    ],
)
def test_the_head_is_never_adapted(arch, target, message):
    with pytest.raises(ValueError, match=message):
        add_lora(make_model(arch), LoraOptions(r=2, target_modules=f"c_attn,q_proj,{target}"))


def test_targets_lora_cannot_adapt_are_input_errors():
    with pytest.raises(ValueError, match="LoRA target modules input_layernorm: .*not supported"):
        add_lora(make_model("llama"), LoraOptions(r=2, target_modules="input_layernorm"))


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ValueError, match="pip install peft"):
        add_lora(make_model("llama"), LoraOptions(r=2))


def test_twice_is_refused():
    with pytest.raises(ValueError, match="already carries peft adapters"):
        add_lora(add_lora(make_model("llama"), LoraOptions(r=2)), LoraOptions(r=2))


def test_resuming_with_other_options_is_refused(tmp_path):
    save_adapter(adapted_model("llama", LoraOptions(r=3)), str(tmp_path))
    cases = [
        (LoraOptions(r=4), "trained with r=3, this model has r=4; resume with the same --lora-r"),
        (LoraOptions(r=3, alpha=7), "trained with lora_alpha=6, this model has lora_alpha=7"),
        (LoraOptions(r=3, target_modules="q_proj,v_proj"), "adapts other modules than this model"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            load_adapter_weights(add_lora(make_model("llama"), options), str(tmp_path))
    with pytest.raises(ValueError, match="no adapter_config.json; not a LoRA adapter directory"):
        load_adapter_weights(add_lora(make_model("llama"), LoraOptions(r=3)), str(tmp_path / "elsewhere"))
