"""The prefix-shared forward: the hidden states that predict every response token of a PackedBatch, through a
Hugging Face causal LM, with each prompt computed once for its k candidates.

Re-encoding costs k(P + R) tokens of the model body per group; sharing the prompt costs P + kR.

    "packed"    one pass over the batch's rows [prompt, cand_1, ..., cand_k, next group...]; position ids restart
                at P for every candidate and an attention mask lets a token see earlier tokens of its own group that
                are prompt tokens or tokens of its own candidate. The mask is a prepared [rows, 1, T, T] tensor for
                "sdpa" (boolean) and "eager" (additive), a FlexAttention BlockMask for "flex_attention" on CUDA;
                transformers passes a 4-D mask / BlockMask to the attention as it is.
    "kv-cache"  the prompts once with use_cache=True, the cache rows repeated for the k candidates of each, the
                right-padded candidates run against it with a padding mask over the prompts' padding; gradients flow
                through the cache. Works with any attention implementation that supports a cache and padding.
                (Models with a window, chunk or top-k shorter than P + R, models without position_ids and models
                with a state along the sequence run one group at a time, without padding.)
    "none"      every candidate re-encoded after its prompt, right-padded, in one pass: the original RRHF code's
                way, and the baseline for tests and benchmarks.
    "per-candidate"  every candidate re-encoded after its prompt alone, one forward each, unpadded: the slowest, and
                exact for any model (nothing but the candidate and its prompt is ever in the forward).
    "auto"      "packed" under FlexAttention on CUDA or gradient checkpointing, else "kv-cache" (see resolve_mode);
                rrhf_fast.checked.model_loss checks the choice on the model (rrhf_fast.probe) and falls back down
                candidate_modes.

Layers whose state runs along the sequence (recurrent, linear attention, short convolutions) carry one candidate's
tokens into the next in a packed row, so "packed" is left out for them by construction (sequence_state).

With head="fused" only the model body (the decoder stack, which ends in the final norm) runs: the [tokens, vocab]
logits are never formed; the loss applies the LM head (`batch_loss` passes its weight and bias to
`rrhf_fast.loss.rrhf_loss`). With head="logits" the whole causal LM runs and its own logits at the response
positions are taken (for heads that are more than `hidden @ W^T + b`: softcaps, scales, several layers).
"""

import inspect
import re
import weakref

import torch

from rrhf_fast.batch import PackedBatch, check_vocabulary
from rrhf_fast.loss import rrhf_loss, rrhf_loss_from_logits

MODES = ("auto", "packed", "kv-cache", "none", "per-candidate")
HEADS = ("fused", "logits")

# Attention implementations that take the packed mask, and the form it takes for each.
_PACKED_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

# Config or model attributes that make the logits more than `hidden @ W^T + b` (Gemma 2/3 softcapping,
# RecurrentGemma's logits_soft_cap, Cohere's logit_scale, Granite's logits_scaling, muP multipliers); a fused head
# loss would silently drop them. The probe (rrhf_fast.probe) catches the ones this list does not name.
_LOGIT_SOFTCAPS = ("final_logit_softcapping", "logit_softcap", "logits_soft_cap")
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def transformers_model(model) -> torch.nn.Module:
    """The transformers model: a peft PeftModel's `base_model` is its tuner, whose forward runs the whole causal LM;
    the model inside (`get_base_model()`) holds the adapter layers in place, so running it runs them."""
    if callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def body(model) -> torch.nn.Module:
    """The decoder stack without the LM head; its last_hidden_state already has the final norm applied.

    Usually `model.base_model`. Some causal LMs name themselves as their base model (Llama4ForCausalLM, whose
    base_model_prefix names a multimodal wrapper's attribute): then the body is the one child that is itself a
    transformers model (`model.model` there)."""
    model = transformers_model(model)
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no LM head: pass the causal LM (e.g. AutoModelForCausalLM), not its base model"
        )
    decoder = model.base_model
    if decoder is model:
        head = model.get_output_embeddings()
        inner = [m for m in model.children() if m is not head and hasattr(m, "config") and hasattr(m, "get_input_embeddings")]
        if len(inner) != 1:
            raise ValueError(
                f"{type(model).__name__} is its own base_model and holds {len(inner)} transformers models, so its "
                "decoder body cannot be told apart; pass a causal LM whose base_model is the decoder stack"
            )
        decoder = inner[0]
    return decoder


_ARGUMENTS: dict[type, frozenset] = {}


def _takes(module: torch.nn.Module, name: str) -> bool:
    """Whether module.forward names the argument `name` (the signature read once per class)."""
    kind = type(module)
    if kind not in _ARGUMENTS:
        _ARGUMENTS[kind] = frozenset(inspect.signature(module.forward).parameters)
    return name in _ARGUMENTS[kind]


def _call(module: torch.nn.Module, cache=None, **inputs):
    """module(**inputs), with the cache passed as `cache` where forward takes it (transformers 5.2x renamed
    `past_key_values`, which 5.40 removes) and as `past_key_values` before."""
    if cache is not None:
        inputs["cache" if _takes(module, "cache") else "past_key_values"] = cache
    return module(**inputs)


def _returned_cache(out):
    """The cache a forward returned, under either name."""
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def head_problem(model) -> str | None:
    """Why the model's logits are not `hidden @ W^T + b` of its final hidden state by its config and head (a
    softcap, a scale other than 1, a padded vocabulary cut off, an output head that is no torch.nn.Linear), as a
    clause ("its logits use logits_soft_cap=30.0"), or None. The probe catches what this does not read."""
    config = text_config(model)
    for owner in (config, model):
        for name in _LOGIT_SOFTCAPS + _LOGIT_SCALES:
            value = getattr(owner, name, None)
            # Any softcap changes the logits; a scale does unless it is 1.
            if value is not None and (name in _LOGIT_SOFTCAPS or value != 1):
                return f"its logits use {name}={value}"
    unpadded = getattr(config, "unpadded_vocab_size", None)
    if unpadded is not None and unpadded != config.vocab_size:
        return f"it keeps only the first unpadded_vocab_size={unpadded} of its {config.vocab_size} logits"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output embeddings are a {type(head).__name__}, not a torch.nn.Linear"
    return None


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, D] and bias [V] (None without one), after checking logits = hidden @ W^T + b
    (head_problem); a ValueError naming the way out where they are not."""
    problem = head_problem(model)
    if problem is not None:
        raise ValueError(
            f"{type(model).__name__}: {problem}, so a fused head loss over its LM head's weight would be wrong. "
            "Compute logits = model(...).logits for the response tokens and use rrhf_fast.rrhf_loss_from_logits instead."
        )
    head = model.get_output_embeddings()
    return head.weight, head.bias


def attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _packed_positions_problem(model) -> str | None:
    """Why the packed layout's positions cannot reach this model, or None when they can: it takes its positions
    from `position_ids` (rotary or learned absolute embeddings), not from the 2-D padding mask (ALiBi)."""
    decoder = body(model)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{type(decoder).__name__}.forward takes no position_ids"
    if getattr(model.config, "alibi", False):
        return "its ALiBi biases are built from a 2-D padding mask, not from position_ids"
    return None


def is_checkpointing(model) -> bool:
    # Read the layers' flag: the model-level property was renamed across transformers 5 releases.
    return model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _sliding_windows(config) -> tuple[int | None, bool]:
    """(window, mixed): the sliding window of the model's sliding layers (None without any), and whether it also has
    full-attention layers. Mistral-style configs set `sliding_window` for every layer; Qwen2/Gemma-style configs list
    `layer_types`."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return None, False
    if layer_types is None:
        return window, False
    if "sliding_attention" not in layer_types:
        return None, False
    return window, any(t != "sliding_attention" for t in layer_types)


# Layer kinds whose state runs along the sequence, as configs list them (layer_types, layers_block_type,
# block_types) and as modules are named (Mamba's mixer, Qwen3-Next's gated delta net, RecurrentGemma's RG-LRU,
# lightning / linear attention, RWKV, xLSTM); short convolutions are found as torch.nn.Conv1d.
_SEQUENCE_STATE = re.compile(r"mamba|mixer|recurren|rglru|rnn|delta|linear_?attention|lightning|rwkv|ssm|lstm|retention", re.I)
_SEQUENCE_STATE_LAYERS = re.compile(_SEQUENCE_STATE.pattern + r"|conv", re.I)
_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern")
# Towers of a multimodal model that encode an image or a sound before the decoder sees it: not along the text.
_ENCODER_TOWERS = re.compile(r"vision|visual|image|audio|speech|patch", re.I)


# Config fields that bound how far back a token attends: sliding windows under several names (GPT-Neo's local
# layers hold window_size), Llama 4's attention chunks.
WINDOW_FIELDS = (
    "sliding_window",
    "window_size",
    "attention_window_size",
    "attention_window",
    "local_window_size",
    "attention_chunk_size",
)
# Config fields of learned key selection (DeepSeek-V3.2-style indexers): the keys a query keeps, as a count, or as a
# count of blocks of a block size.
SELECTION_FIELDS = ("index_topk", "topk_tokens")
SELECTION_BLOCK_FIELDS = (("index_topk_blocks", "index_block_size"), ("sparse_topk_blocks", "sparse_block_size"))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def declared_window(model) -> int | None:
    """The shortest window or attention chunk the model's config declares, or None."""
    config = text_config(model)
    values = [v for v in (getattr(config, name, None) for name in WINDOW_FIELDS) if _positive_int(v)]
    return min(values) if values else None


def selection_capacity(model) -> tuple[int, str] | None:
    """(keys, what): how many keys a learned top-k selection keeps per query, and the config fields that say so;
    None for a model without one."""
    config = text_config(model)
    found = [(getattr(config, name), name) for name in SELECTION_FIELDS if _positive_int(getattr(config, name, None))]
    for blocks, size in SELECTION_BLOCK_FIELDS:
        b, n = getattr(config, blocks, None), getattr(config, size, None)
        if _positive_int(b) and _positive_int(n):
            found.append((b * n, f"{blocks}={b} x {size}={n}"))
    if not found:
        return None
    keys, name = min(found)
    return keys, name if "=" in name else f"{name}={keys}"


def widest_row(batch: PackedBatch, mode: str) -> int:
    """The most keys one attention row holds in `mode`: the packed rows' width, a prompt and candidate padded to
    the batch's longest of each (kv-cache), the longest prompt + candidate (none, per-candidate)."""
    lengths = batch.prompt_lengths[torch.repeat_interleave(batch.cu_groups.diff())] + batch.candidate_lengths
    if mode == "packed":
        return int(batch.input_ids.shape[1])
    if mode == "kv-cache":
        return int(batch.prompt_lengths.max() + batch.candidate_lengths.max())
    return int(lengths.max())


def selection_problem(model, batch: PackedBatch | None, mode: str) -> str | None:
    """Why a learned top-k key selection makes `mode` differ from one candidate a forward on this batch, or None.

    Such a layer (AXK2, DeepSeek-V3.2, GLM-5: an indexer scores every key of the row and keeps the top k) keeps
    every key of a row that holds no more than k keys, and is then plain attention. Past k it chooses among the
    keys of the row it is in, and how it breaks ties between equal scores (a ReLU gives many exact zeros) depends on
    the row's width: another row, even with every extra key masked, keeps other keys (measured: 8e-2 relative on
    the hidden states of a tiny AXK2 for one right-padded sequence in six). So a mode is exact here only while its
    widest row fits the selection; per-candidate (the reference: each candidate alone) always is."""
    capacity = selection_capacity(model)
    if capacity is None or batch is None or mode == "per-candidate":
        return None
    keys, what = capacity
    width = widest_row(batch, mode)
    if width <= keys:
        return None
    return (
        f'mode="{mode}" puts up to {width} keys in a row, but {type(model).__name__} keeps the top {keys} of a row '
        f"({what}) by learned scores, and which keys it keeps past that depends on the row's other tokens."
    )


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_SEQUENCE_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str | None]]" = weakref.WeakKeyDictionary()


def sequence_state(model) -> str | None:
    """What in the model carries a state along the sequence (a recurrent, linear-attention or convolution layer),
    or None for a model of attention layers only. Such a layer reads every earlier token of a row, so in a packed
    row one candidate's tokens reach the next candidate: "packed" is wrong by construction. Read once per model
    (every forward asks)."""
    if model not in _SEQUENCE_STATES:
        _SEQUENCE_STATES[model] = (_find_sequence_state(model),)
    return _SEQUENCE_STATES[model][0]


def _find_sequence_state(model) -> str | None:
    config = text_config(model)
    for name in _LAYER_LISTS:
        kinds = getattr(config, name, None)
        kinds = list(kinds) if isinstance(kinds, (list, tuple)) else []
        stateful = sorted({str(k) for k in kinds if _SEQUENCE_STATE_LAYERS.search(str(k))})
        if stateful:
            return f"its config lists {', '.join(map(repr, stateful))} layers ({name})"
    if isinstance(getattr(config, "hybrid_override_pattern", None), str) and "M" in config.hybrid_override_pattern:
        return f"its config lists Mamba layers (hybrid_override_pattern={config.hybrid_override_pattern!r})"
    for name, module in body(model).named_modules():
        if _ENCODER_TOWERS.search(name):
            continue
        if isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1:
            return f"{name} is a convolution along the sequence (kernel {module.kernel_size[0]})"
        if _SEQUENCE_STATE.search(type(module).__name__):
            return f"{name or 'its body'} is a {type(module).__name__}"
    return None


def candidate_modes(model, batch: PackedBatch | None = None) -> list[str]:
    """The modes that can run on this model as it is now (and on `batch`, where a learned top-k selection makes
    the batch's widths matter: selection_problem), best first: the order "auto" tries them in (see resolve_mode).
    "per-candidate" is always last and always possible."""
    impl = attn_implementation(model)
    mask_ok = impl in _PACKED_MASK_IMPLEMENTATIONS and (impl != "flex_attention" or model.device.type == "cuda")
    packed_ok = mask_ok and _packed_positions_problem(model) is None and sequence_state(model) is None
    checkpointing = is_checkpointing(model)
    modes = []
    if packed_ok and (checkpointing or model.device.type == "cuda"):
        modes.append("packed")
    if not checkpointing:
        modes.append("kv-cache")
    if packed_ok and "packed" not in modes:
        modes.append("packed")
    return [m for m in modes + ["none"] if selection_problem(model, batch, m) is None] + ["per-candidate"]


def resolve_mode(model, mode: str = "auto", batch: PackedBatch | None = None) -> str:
    """The mode prefix_forward will run, or a ValueError naming the mode to use instead.

    "auto" picks "packed" on CUDA and under gradient checkpointing (which "kv-cache" cannot run under), else
    "kv-cache". On a CPU a dense [T, T] mask makes SDPA and eager compute every masked pair of a packed row, while
    the cache attends over k R (P + R) pairs per group, the least of the three; on a 2-core CPU it measured at
    least as fast as "packed" (benchmarks/bench_prefix.py). On an H100 the cache's expand-and-concatenate and its
    small per-group batches cost more than the masked pairs: a whole bf16 step of a 1B Llama at P=512, R=128,
    k=4 took 78 ms packed and 161 ms with the cache (benchmarks/results/2026-11-24-step-nvidia-h100-80gb-hbm3.md).
    This is the structural choice only; rrhf_fast.probe checks it on the model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    modes = candidate_modes(model, batch)
    if mode == "auto":
        return modes[0]
    problem = refusal(model, mode, batch)
    if problem is not None:
        # A state along the sequence rarely has a cache that can be repeated over candidates; right padding, which
        # comes after every real token, cannot reach it.
        instead = "none" if sequence_state(model) is not None and "none" in modes else modes[0]
        raise ValueError(f'{problem} Use mode="{instead}".')
    return mode


def refusal(model, mode: str, batch: PackedBatch | None = None) -> str | None:
    """Why `mode` cannot run on this model as it is now, or on `batch` (one sentence, without the mode to use
    instead), or None when it can."""
    if mode in candidate_modes(model, batch):
        return None
    if (selection := selection_problem(model, batch, mode)) is not None:
        return selection
    if mode == "kv-cache":
        return (
            'mode="kv-cache" cannot run under gradient checkpointing: transformers drops the cache inside checkpointed '
            "layers, so the candidates would not see their prompt."
        )
    state, positions_problem = sequence_state(model), _packed_positions_problem(model)
    if state is not None:
        return (
            f'mode="packed" puts the candidates of a group in one row, but {type(model).__name__} carries a state along '
            f"the sequence ({state}), which would run from one candidate into the next."
        )
    if positions_problem is not None:
        return (
            f'mode="packed" restarts the position ids of every candidate, but {type(model).__name__} cannot take '
            f"them: {positions_problem}."
        )
    impl = attn_implementation(model)
    where = f" on {model.device.type}" if impl == "flex_attention" else ""
    return (
        f'mode="packed" needs attention that takes a prepared mask (sdpa, eager, or flex_attention on CUDA); this '
        f'model uses {impl}{where} (load the model with attn_implementation="sdpa" for it).'
    )


def packed_attention_mask(batch: PackedBatch, attn_implementation: str, dtype: torch.dtype, window: int | None = None):
    """The attention mask of the packed rows: [rows, 1, T, T] boolean (sdpa; True = attend), additive in `dtype`
    (eager; 0 or the dtype's minimum) or a FlexAttention BlockMask (flex_attention).

    Query q sees key k of the same row when k <= q, both belong to the same group, and k is a prompt token or a
    token of q's own candidate (and, with a sliding window, position(q) - position(k) < window). Padding sees only
    itself, so no row of the softmax is empty (an empty row gives NaN, which the backward would spread).
    """
    group, segment, position = batch.group_ids, batch.segment_ids, batch.position_ids

    def allowed(b, q, k):
        visible = (k <= q) & (group[b, q] == group[b, k]) & (group[b, q] >= 0)
        visible = visible & ((segment[b, k] == -1) | (segment[b, k] == segment[b, q]))
        if window is not None:
            visible = visible & (position[b, q] - position[b, k] < window)
        return visible | (q == k)

    rows, width = group.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            lambda b, h, q, k: allowed(b, q, k), B=rows, H=None, Q_LEN=width, KV_LEN=width, device=group.device
        )
    b = torch.arange(rows, device=group.device)[:, None, None]  # [rows, 1, 1]
    q = torch.arange(width, device=group.device)[None, :, None]  # [1, T, 1]
    k = torch.arange(width, device=group.device)[None, None, :]  # [1, 1, T]
    mask = allowed(b, q, k)[:, None]  # [rows, 1, T, T]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _packed_mask_argument(model, batch: PackedBatch):
    """The attention_mask argument for the body: one mask, or a {layer type: mask} dict for models that mix full
    and sliding-window layers (transformers takes such a dict as the prepared masks of each layer type, and looks
    up every type the config lists: each that is not "sliding_attention" gets the full mask, and the probe judges
    whether that is right for it)."""
    impl = attn_implementation(model)
    dtype = model.get_input_embeddings().weight.dtype
    full = packed_attention_mask(batch, impl, dtype)
    window, mixed = _sliding_windows(model.config)
    # A window no shorter than the longest position never cuts anything: skip building a second mask.
    if window is None or int(batch.position_ids.max()) < window:
        return full
    sliding = packed_attention_mask(batch, impl, dtype, window)
    if not mixed:
        return sliding
    kinds = set(model.config.layer_types) | {"full_attention"}
    return {kind: sliding if kind == "sliding_attention" else full for kind in kinds}


def _run(model, head: str, needed: torch.Tensor, **inputs):
    """(rows, output): the rows `needed` (flat indices into the [B * T] grid of inputs["input_ids"]) of the body's
    final hidden states (head="fused", [n, D]) or of the causal LM's own logits (head="logits", [n, V]), and the
    forward's output (for its cache).

    The logits are asked for only at the needed columns (`logits_to_keep` as an index tensor, where the forward
    takes it): [B, columns, V] rather than [B, T, V]."""
    if head == "fused":
        out = _call(body(model), **inputs)
        states = out.last_hidden_state
    else:
        lm = transformers_model(model)
        width = inputs["input_ids"].shape[1]
        if _takes(lm, "logits_to_keep"):
            columns = torch.unique(needed % width)  # sorted
            out = _call(lm, logits_to_keep=columns, **inputs)
            needed = needed // width * columns.numel() + torch.searchsorted(columns, needed % width)
        else:
            out = _call(lm, **inputs)
        states = out.logits
    return states.reshape(-1, states.shape[-1])[needed], out


def _forward_packed(model, batch: PackedBatch, head: str) -> torch.Tensor:
    rows, _ = _run(
        model,
        head,
        batch.hidden_index,
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=_packed_mask_argument(model, batch),
        use_cache=False,
    )
    return rows


def candidate_lists(batch: PackedBatch):
    """Python-side bounds: for every group its prompt ids [P], the range of its candidates, and every candidate's
    ids."""
    flat_ids = batch.input_ids.reshape(-1)
    starts, lengths = batch.prompt_starts.tolist(), batch.prompt_lengths.tolist()
    prompts = [flat_ids[s : s + n] for s, n in zip(starts, lengths)]
    cu_seqlens = batch.cu_seqlens.tolist()
    cands = [batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]] for c in range(len(cu_seqlens) - 1)]
    return prompts, batch.cu_groups.tolist(), cands


def _right_padded(pieces: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """[n, max len] ids, each piece followed by padding.

    Right padding comes after every real token of its sequence, so causal attention alone keeps it out of the
    real tokens: no padding mask is passed. (One would also leave the queries of padding beyond a sliding window
    with nothing to attend to, and the NaN of an empty softmax row spreads through the next layer's values.)
    """
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True, padding_value=pad_value)


def _index(rows: list[int], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _repeatable_cache(model, cache):
    """The cache, when it and each of its layers can pick and repeat rows (a key/value cache can; the states of
    transformers' recurrent and convolution layers cannot), else a ValueError naming the modes that work."""
    if cache is None:
        what = "no cache from its prompt forward"
    else:
        layers = [cache] + list(getattr(cache, "layers", None) or [])
        unable = [type(layer).__name__ for layer in layers if not all(
            callable(getattr(layer, name, None)) for name in ("batch_select_indices", "batch_repeat_interleave")
        )]  # fmt: skip
        if not unable:
            return cache
        inside = "" if unable[-1] == type(cache).__name__ else f" of {unable[-1]} layers"
        what = f"a {type(cache).__name__}{inside}, which cannot be"
    raise ValueError(
        f'mode="kv-cache" needs a cache that can be repeated over candidates; {type(model).__name__} returned '
        f'{what}. Use mode="none" (or "per-candidate").'
    )


def _forward_kv_cache(model, batch: PackedBatch, head: str) -> torch.Tensor:
    """All prompts in one pass, right-padded to P_max; the cache rows picked for every candidate; all candidates,
    right-padded to R_max, in a second pass. A [C, P_max + R_max] padding mask hides the gap between a short prompt
    and its candidates, so each candidate sees its own prompt's P_g tokens and then itself."""
    window = declared_window(model)
    prompt_width, cand_width = int(batch.prompt_lengths.max()), int(batch.candidate_lengths.max())
    gap = int(batch.prompt_lengths.min()) < prompt_width
    if (
        sequence_state(model) is not None
        or (window is not None and prompt_width + cand_width > window)
        or (gap and _packed_positions_problem(model) is not None)
    ):
        # A sliding window (or attention chunk, or learned top-k) counts cache slots, gap included, and the cache
        # keeps only the last window - 1 of them; a model without position_ids takes its positions from the cache
        # length; a recurrent state would run over the prompt's padding: run each group on its own, with no gap.
        return _forward_kv_cache_per_group(model, batch, head)
    prompts, cu_groups, cands = candidate_lists(batch)
    num_groups, num_cands, device = len(prompts), len(cands), batch.targets.device

    prompt_ids = _right_padded(prompts, batch.pad_token_id)  # [G, P_max]
    prompt_positions = torch.arange(prompt_width, device=device)[None].expand(num_groups, -1)
    prompt_lasts = torch.arange(num_groups, device=device) * prompt_width + batch.prompt_lengths - 1  # [G]
    prompt_last, prompt_out = _run(
        model, head, prompt_lasts, input_ids=prompt_ids, position_ids=prompt_positions, use_cache=True
    )
    cache = _repeatable_cache(model, _returned_cache(prompt_out))
    # Indexing is differentiable: the gradients of a prompt's k rows sum into its keys and values.
    group_of = torch.repeat_interleave(torch.arange(num_groups, device=device), batch.cu_groups.diff())  # [C]
    cache.batch_select_indices(group_of)

    cand_ids = _right_padded(cands, batch.pad_token_id)  # [C, R_max]
    prompt_len = batch.prompt_lengths[group_of]  # [C]
    cand_positions = prompt_len[:, None] + torch.arange(cand_width, device=device)[None]  # [C, R_max]
    prompt_keys = torch.arange(prompt_width, device=device)[None] < prompt_len[:, None]  # [C, P_max]
    key_mask = torch.cat([prompt_keys, torch.ones_like(cand_ids, dtype=torch.bool)], dim=1).long()  # [C, P_max + R_max]
    # Every candidate's states but its last token's (which predicts nothing), candidate after candidate.
    needed = [c * cand_width + t for c in range(num_cands) for t in range(cands[c].numel() - 1)]
    cand_rows, _ = _run(
        model,
        head,
        _index(needed, device),
        input_ids=cand_ids,
        attention_mask=key_mask,
        position_ids=cand_positions,
        cache=cache,
        use_cache=True,
    )

    # Gather in targets order from [prompt last states (G rows); candidate states].
    states = torch.cat([prompt_last, cand_rows])
    index, row = [], num_groups
    for g in range(num_groups):
        for c in range(cu_groups[g], cu_groups[g + 1]):
            index.append(g)
            index.extend(range(row, row + cands[c].numel() - 1))
            row += cands[c].numel() - 1
    return states[_index(index, device)]


def _forward_kv_cache_per_group(model, batch: PackedBatch, head: str) -> torch.Tensor:
    """kv-cache one group at a time: the prompt [1, P], the cache repeated k times, the candidates [k, R]."""
    prompts, cu_groups, cands = candidate_lists(batch)
    device, pieces = batch.targets.device, []
    for g, prompt in enumerate(prompts):
        group = cands[cu_groups[g] : cu_groups[g + 1]]
        k, plen = len(group), prompt.numel()
        prompt_last, prompt_out = _run(model, head, _index([plen - 1], device), input_ids=prompt[None], use_cache=True)
        cache = _repeatable_cache(model, _returned_cache(prompt_out))
        # repeat_interleave is differentiable: the gradients of the k copies sum into the prompt's keys and values.
        cache.batch_repeat_interleave(k)
        ids = _right_padded(group, batch.pad_token_id)  # [k, R]
        positions = plen + torch.arange(ids.shape[1], device=device)
        needed = [i * ids.shape[1] + t for i, cand in enumerate(group) for t in range(cand.numel() - 1)]
        cand_rows, _ = _run(
            model,
            head,
            _index(needed, device),
            input_ids=ids,
            position_ids=positions[None].expand(k, -1),
            cache=cache,
            use_cache=True,
        )
        row = 0
        for cand in group:
            pieces += [prompt_last, cand_rows[row : row + cand.numel() - 1]]
            row += cand.numel() - 1
    return torch.cat(pieces)


def _sequences(batch: PackedBatch):
    """Every candidate after its prompt: (ids [P + L], P) in targets order."""
    prompts, cu_groups, cands = candidate_lists(batch)
    return [
        (torch.cat([prompt, cands[c]]), prompt.numel())
        for g, prompt in enumerate(prompts)
        for c in range(cu_groups[g], cu_groups[g + 1])
    ]


def _forward_none(model, batch: PackedBatch, head: str) -> torch.Tensor:
    sequences = _sequences(batch)
    ids = _right_padded([seq for seq, _ in sequences], batch.pad_token_id)
    # Response token t of a sequence is predicted by position P - 1 + t.
    needed = [i * ids.shape[1] + t for i, (seq, plen) in enumerate(sequences) for t in range(plen - 1, seq.numel() - 1)]
    rows, _ = _run(model, head, _index(needed, ids.device), input_ids=ids, use_cache=False)
    return rows


def _forward_per_candidate(model, batch: PackedBatch, head: str) -> torch.Tensor:
    pieces = []
    for seq, plen in _sequences(batch):
        needed = torch.arange(plen - 1, seq.numel() - 1, device=seq.device)
        pieces.append(_run(model, head, needed, input_ids=seq[None], use_cache=False)[0])
    return torch.cat(pieces)


# Each mode's forward, as it is: no check that the mode can run on the model (prefix_forward makes that first).
FORWARDS = {
    "packed": _forward_packed,
    "kv-cache": _forward_kv_cache,
    "none": _forward_none,
    "per-candidate": _forward_per_candidate,
}


def prefix_forward(model, batch: PackedBatch, mode: str = "auto", head: str = "fused") -> torch.Tensor:
    """hidden [N, D]: row n is the final hidden state (after the final norm) that predicts batch.targets[n]; with
    head="logits" instead the model's own logits [N, V] that predict it.

    model   a Hugging Face causal LM (with head="fused" its body is run, its LM head is not)
    batch   a PackedBatch (moved to the model's device here)
    mode    "auto", "packed", "kv-cache", "none" or "per-candidate" (see the module docstring); a mode this model
            or attention implementation cannot serve raises ValueError naming the mode to use. This runs the mode
            unchecked: rrhf_fast.checked.model_loss checks it on the model first (rrhf_fast.probe).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    mode = resolve_mode(model, mode, batch)
    batch = batch.to(model.device)
    check_vocabulary(batch, model.get_input_embeddings().num_embeddings)
    return FORWARDS[mode](model, batch, head)


def batch_loss(model, batch: PackedBatch, mode: str, head: str, **loss_options):
    """The RRHF loss of `model` on `batch` through one mode and head, unchecked: prefix_forward, then
    rrhf_fast.loss.rrhf_loss with the LM head's weight and bias (head="fused") or rrhf_loss_from_logits on the
    model's own logits (head="logits")."""
    batch = batch.to(model.device)
    states = prefix_forward(model, batch, mode, head)
    if head == "logits":
        return rrhf_loss_from_logits(states, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, **loss_options)
    weight, bias = lm_head(model)
    return rrhf_loss(
        states, weight, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, bias=bias, **loss_options
    )
