"""Tiny float64 models of every decoder-only causal-LM family the installed transformers ships, and the check of
rrhf_fast.model_loss against each candidate re-encoded alone. Builders and checks only; the tests are in
tests/test_architectures.py and the table in benchmarks/architecture_sweep.py.

A family is a `model_type` of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES. Its tiny config starts from the
config class's defaults with the common size attributes shrunk (SHRINK), per-layer type lists cut to one layer of
each kind (so a hybrid keeps its attention and its recurrent layers), windows, chunks and top-k below the probe
batch's lengths, dropout off; OVERRIDES holds what the generic shrink gets wrong for a family.

The check (`check_mode`): the reference is every candidate encoded alone, unpadded, through
`model(input_ids).logits`, its response positions gathered and scored by rrhf_fast.reference.rrhf_loss_from_logits
(the same mean over groups as one batch), the gradients of every trainable parameter by autograd. model_loss in a
mode must give the same loss and gradients to RTOL, or refuse with a ValueError that names a mode (or, for a
head that is not a plain Linear, rrhf_loss_from_logits).
"""

import contextlib
import dataclasses
import inspect
import re
import signal
import time
import warnings

import torch

from rrhf_fast import reference
from rrhf_fast.batch import pack_batch
from rrhf_fast.checked import model_loss
from rrhf_fast.prefix import MODES

VOCAB = 113
RTOL = 1e-6
LOSS_OPTIONS = dict(margin=0.05, length_penalty=1.0, rank_weight=1.0, sft_weight=0.7)
# Longer than every window, chunk and top-k SHRINK leaves (4), so that each of them cuts something.
PROMPT_LENGTHS = (9, 7)
CANDIDATE_LENGTHS = ((6, 1), (8, 5, 7))

# Attribute name -> tiny value; applied to whichever of them a config class declares.
_SIZES = {
    32: "hidden_size n_embd d_model dim hidden_dim n_embed word_embed_proj_dim lru_width embedding_size",
    2: "num_hidden_layers n_layer num_layers n_layers num_key_value_heads num_kv_heads n_kv_heads "
    "multi_query_group_num num_query_groups linear_num_key_heads index_n_heads num_experts_per_tok moe_topk "
    "num_experts_per_token top_k moe_k",
    4: "num_attention_heads n_head num_heads n_heads num_experts n_routed_experts num_local_experts moe_num_experts "
    "mamba_n_heads n_mamba_heads linear_num_value_heads linear_num_heads qk_rope_head_dim time_step_rank mamba_dt_rank "
    "rotary_dim",
    8: "head_dim attention_head_dim kv_channels d_head qk_nope_head_dim v_head_dim linear_key_head_dim "
    "linear_value_head_dim linear_head_dim index_head_dim state_size mamba_d_state ssm_state_size",
    16: "moe_intermediate_size shared_expert_intermediate_size expert_intermediate_size kv_lora_rank q_lora_rank "
    "mamba_d_head mamba_headdim",
    12: "qk_head_dim",
    48: "intermediate_size ffn_dim n_inner ffn_hidden_size d_ff inner_hidden_size",
    64: "mamba_d_ssm",
    128: "max_position_embeddings n_positions max_seq_len n_ctx max_sequence_length",
    1: "n_group topk_group n_groups mamba_n_groups mamba_ngroups first_k_dense_replace n_shared_experts",
    VOCAB: "vocab_size",
}
# Left None by some defaults that the modeling code then needs (the full-size default does not build either).
_DERIVED_WHEN_NONE = {"head_dim", "num_key_value_heads"}
SHRINK = {name: value for value, names in _SIZES.items() for name in names.split()}
# Lengths that cut the sequence: each is brought down to WINDOW (when larger) so the probe batch crosses it.
WINDOW = 4
_WINDOWS = re.compile(r"(window|chunk_size$|^block_size$|topk$|attention_chunk)")
_PER_LAYER_KINDS = ("layer_types", "layers_block_type", "block_types", "attention_layers", "mlp_layer_types")

# What the generic shrink gets wrong, per family: attributes set on top of it.
OVERRIDES = {
    # layer kinds given by the indices of the attention layers, the other layers being short convolutions
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1], num_hidden_layers=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1], num_hidden_layers=2, num_dense_layers=1),
    "mamba2": dict(num_heads=8),  # num_heads * head_dim must be expand * hidden_size
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),  # one global and one local layer
    "zaya": dict(num_experts_per_tok=1),
    # attention and MLP listed as separate blocks (each pair is one layer); input, recurrent and output layers add up
    "dory": dict(
        layer_types=["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
        num_hidden_layers=6, n_input_layers=2, n_recurrent_layers=2, n_output_layers=2,
    ),  # fmt: skip
    "xlm": dict(causal=True),  # XLM's default is a masked LM, whose tokens see the tokens after them
}

# Modules whose training-mode forward draws random numbers, by class name: PhiMoE's router samples its experts
# (Gumbel noise) and a Heun mask in training mode whatever its jitter settings are. Two draws differ, so, like
# dropout, they are kept in eval mode when the model trains (the probe itself runs in eval mode).
RANDOM_IN_TRAINING = ("PhimoeSparseMoeBlock",)

# Families not built, and why.
SKIPPED = {}


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _config_fields(config_class) -> set[str]:
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    return set(inspect.signature(config_class.__init__).parameters)


def _one_layer_of_each_kind(default: dict, fields: set[str]) -> dict:
    """The per-layer type lists cut to the first layer of every distinct kind (at least two layers), with the
    layer count to match; {} when the config lists no layer types."""
    lists = {k: default[k] for k in _PER_LAYER_KINDS if k in fields and isinstance(default.get(k), list) and default[k]}
    if not lists:
        return {}
    length = min(len(v) for v in lists.values())
    seen, keep = set(), []
    for i in range(length):
        kind = tuple(str(v[i]) for v in lists.values())
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    keep = keep if len(keep) >= 2 else list(range(min(2, length)))
    cut = {k: [v[i] for i in keep] for k, v in lists.items()}
    overrides = default.get("per_layer_config")
    if isinstance(overrides, dict):  # {layer index: its own sizes} (Gemma 4's global layers): re-indexed, shrunk
        overrides = {int(i): settings for i, settings in overrides.items()}
        cut["per_layer_config"] = {
            j: {name: SHRINK.get(name, v) if isinstance(v, int) else v for name, v in overrides[i].items()}
            for j, i in enumerate(keep)
            if i in overrides
        }
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if name in fields:
            cut[name] = len(keep)
    return cut


def _shrunk(config_class, default: dict) -> dict:
    """Keyword arguments for config_class: default's size attributes shrunk, nested sub-configs too."""
    from transformers import CONFIG_MAPPING

    fields = _config_fields(config_class)
    kwargs = {}
    for name, value in default.items():
        if name not in fields or isinstance(value, bool):
            continue
        if isinstance(value, dict) and value.get("model_type") in CONFIG_MAPPING:
            kwargs[name] = {**value, **_shrunk(CONFIG_MAPPING[value["model_type"]], value)}
        elif name in SHRINK and (isinstance(value, int) or (value is None and name in _DERIVED_WHEN_NONE)):
            kwargs[name] = SHRINK[name]
        elif isinstance(value, int) and value > WINDOW and _WINDOWS.search(name):
            kwargs[name] = WINDOW
        elif isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            kwargs[name] = 0.0
        elif name.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            kwargs[name] = 2
    kwargs.update(_one_layer_of_each_kind(default, fields))
    if "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs:  # MLA expands its latent to every query head
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", SHRINK["num_attention_heads"])
    return kwargs


def tiny_config(family: str):
    """The family's config class at tiny sizes (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[family]
    kwargs = _shrunk(config_class, config_class().to_dict())
    if "is_decoder" in _config_fields(config_class):  # BERT-style encoders are causal LMs only as decoders
        kwargs["is_decoder"] = True
    kwargs.update(OVERRIDES.get(family, {}))
    return config_class(**kwargs)


@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError when the block runs longer than `seconds` (checked between Python bytecodes: a single long
    C call finishes first). Main thread only."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


BUILD_SECONDS = 20


def build(family: str, seed: int = 0):
    """(model in float64, eval mode, seeded; seconds to build). Raises whatever the family raises, TimeoutError
    past BUILD_SECONDS."""
    from transformers import AutoModelForCausalLM

    if family in SKIPPED:
        raise NotImplementedError(SKIPPED[family])
    start = time.perf_counter()
    with time_limit(BUILD_SECONDS):
        config = tiny_config(family)
        if getattr(config, "is_encoder_decoder", False):
            raise NotImplementedError("encoder-decoder")
        if hasattr(config, "_experts_implementation"):  # grouped_mm has no float64 kernel on CPU
            config._experts_implementation = "eager"
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(torch.float64).eval()
    return model, time.perf_counter() - start


def probe_groups(vocab: int = VOCAB, seed: int = 0):
    """Two groups, k = 2 and 3, one candidate of a single token; ids 3..vocab-1 (0-2 are the special tokens),
    rewards with a tie."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    prompts = [ids(n) for n in PROMPT_LENGTHS]
    candidates = [[ids(n) for n in lengths] for lengths in CANDIDATE_LENGTHS]
    rewards = [[1.0, 0.0], [2.0, 0.0, 2.0]]
    return prompts, candidates, rewards


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters() if p.requires_grad}


def reencoded_loss_and_grads(model, groups):
    """The reference: each candidate alone after its prompt through model(input_ids).logits."""
    prompts, candidates, rewards = groups
    batch = pack_batch(prompts, candidates, rewards)
    model.zero_grad(set_to_none=True)
    logits = []
    for prompt, cands in zip(prompts, candidates):
        for cand in cands:
            ids = torch.tensor([prompt + cand])
            logits.append(model(input_ids=ids).logits[0, len(prompt) - 1 : -1])
    out = reference.rrhf_loss_from_logits(
        torch.cat(logits), batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, **LOSS_OPTIONS
    )
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def model_loss_and_grads(model, groups, mode):
    model.zero_grad(set_to_none=True)
    out = model_loss(model, pack_batch(*groups), mode=mode, **LOSS_OPTIONS)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def worst_error(result, expected) -> tuple[float, str]:
    """(error, what): the loss's relative error, or the worst parameter's gradient error relative to the larger of
    its reference norm and 1e-3 of the whole gradient's norm (a gradient that is zero in exact arithmetic, such as a
    key bias, holds only rounding)."""
    (loss, grads), (loss_ref, grads_ref) = result, expected
    worst = (float((loss - loss_ref).abs() / loss_ref.abs().clamp_min(1e-30)), "loss")
    floor = 1e-3 * torch.stack([g.norm() for g in grads_ref.values()]).norm().clamp_min(1e-30)
    for name, ref in grads_ref.items():
        err = float((grads[name] - ref).norm() / torch.maximum(ref.norm(), floor))
        if not err <= worst[0]:  # NaN counts as the worst
            worst = (err, name)
    return worst


def names_a_way_out(message: str) -> bool:
    """A refusal says what works: a mode (quoted, as prefix.py writes them) or rrhf_loss_from_logits (the exact
    path for a head that is more than hidden @ W^T + b)."""
    return "rrhf_loss_from_logits" in message or any(re.search(rf"[\"']{re.escape(m)}[\"']", message) for m in MODES)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing on, in training mode (but the modules of RANDOM_IN_TRAINING); NotImplementedError where
    the family does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise NotImplementedError(f"{type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()
    for module in model.modules():
        if type(module).__name__ in RANDOM_IN_TRAINING:
            module.eval()


def check_mode(model, mode: str, groups, expected=None) -> tuple[str, str]:
    """(verdict, detail) for model_loss(model, ..., mode) against re-encoding: "exact" (detail: the worst error),
    "refused" (the message of a ValueError naming a way out), "WRONG" (the worst error and where) or "error" (the exception)."""
    if expected is None:
        expected = reencoded_loss_and_grads(model, groups)
    try:
        result = model_loss_and_grads(model, groups, mode)
    except ValueError as e:
        if names_a_way_out(str(e)):
            return "refused", str(e)
        return "error", f"ValueError: {e}"
    except Exception as e:  # noqa: BLE001 - every other failure is the verdict
        return "error", f"{type(e).__name__}: {e}"
    if set(result[1]) != set(expected[1]):
        return "WRONG", "different trainable parameters"
    err, where = worst_error(result, expected)
    if err <= RTOL:
        return "exact", f"{err:.1e}"
    return "WRONG", f"{err:.1e} ({where})"


def structure(model) -> str:
    """What the family's tiny model contains, read from its config and module types: the kinds of layer that
    decide whether prefix sharing is exact."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = {type(m).__name__.lower() for m in model.modules()}
    attrs = {k: v for k, v in text.to_dict().items() if v not in (None, False, 0, [], {})}
    keys = " ".join(attrs)
    layer_kinds = set()
    for k in _PER_LAYER_KINDS:
        if isinstance(attrs.get(k), list):
            layer_kinds.update(str(v) for v in attrs[k])
    kinds = " ".join(sorted(layer_kinds)) + " " + " ".join(names)
    found = []

    def has(label, condition):
        if condition and label not in found:
            found.append(label)

    has("sliding window", any(w in keys for w in ("sliding_window", "window_size", "attention_window")) or "sliding" in kinds or "local" in kinds)
    has("ALiBi", "alibi" in keys or "alibi" in kinds)
    has("softcap", "softcap" in keys or "soft_cap" in keys)
    has("logit scale", any(w in keys for w in ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logit_multiplier", "unpadded_vocab")))
    has("recurrent", any(w in kinds for w in ("mamba", "mixer", "recurrent", "rglru", "rwkv", "lstm", "ssm")))
    has("linear attention", "linear_attention" in kinds or "linearattention" in kinds or "lightning" in kinds or "gated_deltanet" in kinds or "gateddeltanet" in kinds)
    has("convolution", "conv" in kinds or "short_conv" in keys)
    has("MoE", any(w in keys for w in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")) or "moe" in kinds)
    has("sparse top-k", "index_topk" in keys or "indexer" in kinds)
    has("MLA", "kv_lora_rank" in keys)
    head = model.get_output_embeddings()
    has("non-Linear head", head is not None and not isinstance(head, torch.nn.Linear))
    return ", ".join(found) or "attention"
