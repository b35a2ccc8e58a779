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
                (Models with a sliding window shorter than P + R run one group at a time, without padding.)
    "none"      every candidate re-encoded after its prompt, right-padded, in one pass: the original RRHF code's
                way, and the baseline for tests and benchmarks.
    "auto"      "packed" under FlexAttention on CUDA or gradient checkpointing, else "kv-cache" (see resolve_mode).

Only the model body (`model.base_model`, which ends in the final norm) runs: the [tokens, vocab] logits are never
formed; the loss applies the LM head (`model_loss` passes its weight and bias to `rrhf_fast.loss.rrhf_loss`).
"""

import inspect

import torch

from rrhf_fast.batch import PackedBatch
from rrhf_fast.loss import rrhf_loss

MODES = ("auto", "packed", "kv-cache", "none")

# Attention implementations that take the packed mask, and the form it takes for each.
_PACKED_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

# Config or model attributes that make the logits more than `hidden @ W^T + b` (Gemma 2/3 softcapping, Cohere's
# logit_scale, Granite's logits_scaling, output_multiplier); a fused head loss would silently drop them.
_LOGIT_SOFTCAPS = ("final_logit_softcapping", "logit_softcap")
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier")


def _body(model) -> torch.nn.Module:
    """The decoder stack without the LM head; its last_hidden_state already has the final norm applied.

    A peft PeftModel's `base_model` is its tuner, whose forward runs the whole causal LM; the transformers model
    inside (`get_base_model()`) holds the adapter layers in place, so its body runs them."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    body = model.base_model
    if body is model or model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no LM head: pass the causal LM (e.g. AutoModelForCausalLM), not its base model"
        )
    return body


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, D] and bias [V] (None without one), after checking logits = hidden @ W^T + b."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for owner in (config, model):
        for name in _LOGIT_SOFTCAPS + _LOGIT_SCALES:
            value = getattr(owner, name, None)
            # Any softcap changes the logits; a scale does unless it is 1.
            if value is not None and (name in _LOGIT_SOFTCAPS or value != 1):
                raise ValueError(
                    f"{type(model).__name__} computes its logits with {name}={value}, not as a plain linear head of the "
                    "final hidden state, so the fused head loss would be wrong. Compute logits = model(...).logits for "
                    "the response tokens and use rrhf_fast.rrhf_loss_from_logits instead."
                )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__}'s output embeddings are a {type(head).__name__}, not a torch.nn.Linear; compute the "
            "logits with the model and use rrhf_fast.rrhf_loss_from_logits instead"
        )
    return head.weight, head.bias


def _attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _packed_positions_problem(model) -> str | None:
    """Why the packed layout's positions cannot reach this model, or None when they can: it takes its positions
    from `position_ids` (rotary or learned absolute embeddings), not from the 2-D padding mask (ALiBi)."""
    body = _body(model)
    if "position_ids" not in inspect.signature(body.forward).parameters:
        return f"{type(body).__name__}.forward takes no position_ids"
    if getattr(model.config, "alibi", False):
        return "its ALiBi biases are built from a 2-D padding mask, not from position_ids"
    return None


def _is_checkpointing(model) -> bool:
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


def resolve_mode(model, mode: str = "auto") -> str:
    """The mode prefix_forward will run, or a ValueError naming the mode to use instead.

    "auto" picks "packed" on CUDA and under gradient checkpointing (which "kv-cache" cannot run under), else
    "kv-cache". On a CPU a dense [T, T] mask makes SDPA and eager compute every masked pair of a packed row, while
    the cache attends over k R (P + R) pairs per group, the least of the three; on a 2-core CPU it measured at
    least as fast as "packed" (benchmarks/bench_prefix.py). On an H100 the cache's expand-and-concatenate and its
    small per-group batches cost more than the masked pairs: a whole bf16 step of a 1B Llama at P=512, R=128,
    k=4 took 78 ms packed and 161 ms with the cache (benchmarks/results/2026-11-24-step-nvidia-h100-80gb-hbm3.md).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    impl = _attn_implementation(model)
    mask_ok = impl in _PACKED_MASK_IMPLEMENTATIONS and (impl != "flex_attention" or model.device.type == "cuda")
    positions_problem = _packed_positions_problem(model)
    packed_ok = mask_ok and positions_problem is None
    checkpointing = _is_checkpointing(model)
    if mode == "auto":
        if checkpointing:
            return "packed" if packed_ok else "none"
        return "packed" if packed_ok and model.device.type == "cuda" else "kv-cache"
    if mode == "packed" and not packed_ok:
        instead = 'mode="none"' if checkpointing else 'mode="kv-cache"'
        if positions_problem is not None:
            raise ValueError(
                f'mode="packed" restarts the position ids of every candidate, but {type(model).__name__} cannot take '
                f"them: {positions_problem}. Use {instead}."
            )
        where = f" on {model.device.type}" if impl == "flex_attention" else ""
        raise ValueError(
            f'mode="packed" needs attention that takes a prepared mask (sdpa, eager, or flex_attention on CUDA); this '
            f'model uses {impl}{where}. Use {instead}, or load the model with attn_implementation="sdpa".'
        )
    if mode == "kv-cache" and checkpointing:
        instead = 'mode="packed"' if packed_ok else 'mode="none"'
        raise ValueError(
            'mode="kv-cache" cannot run under gradient checkpointing: transformers drops the cache inside checkpointed '
            f"layers, so the candidates would not see their prompt. Use {instead}."
        )
    return mode


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
    and sliding-window layers (transformers takes such a dict as the prepared masks of each layer type)."""
    impl = _attn_implementation(model)
    dtype = model.get_input_embeddings().weight.dtype
    full = packed_attention_mask(batch, impl, dtype)
    window, mixed = _sliding_windows(model.config)
    # A window no shorter than the longest position never cuts anything: skip building a second mask.
    if window is None or int(batch.position_ids.max()) < window:
        return full
    sliding = packed_attention_mask(batch, impl, dtype, window)
    return {"full_attention": full, "sliding_attention": sliding} if mixed else sliding


def _forward_packed(model, batch: PackedBatch) -> torch.Tensor:
    out = _body(model)(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=_packed_mask_argument(model, batch),
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [rows, T, D]
    return hidden.reshape(-1, hidden.shape[-1])[batch.hidden_index]


def _candidate_lists(batch: PackedBatch):
    """Python-side bounds: for every group its prompt ids [P] and the range of its candidates."""
    flat_ids = batch.input_ids.reshape(-1)
    starts, lengths = batch.prompt_starts.tolist(), batch.prompt_lengths.tolist()
    prompts = [flat_ids[s : s + n] for s, n in zip(starts, lengths)]
    return prompts, batch.cu_groups.tolist(), batch.cu_seqlens.tolist()


def _right_padded(pieces: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """[n, max len] ids, each piece followed by padding.

    Right padding comes after every real token of its sequence, so causal attention alone keeps it out of the
    real tokens: no padding mask is passed. (One would also leave the queries of padding beyond a sliding window
    with nothing to attend to, and the NaN of an empty softmax row spreads through the next layer's values.)
    """
    width = max(p.numel() for p in pieces)
    ids = pieces[0].new_full((len(pieces), width), pad_value)
    for i, p in enumerate(pieces):
        ids[i, : p.numel()] = p
    return ids


def _repeatable_cache(model, cache):
    if not hasattr(cache, "batch_select_indices") or not hasattr(cache, "batch_repeat_interleave"):
        raise ValueError(
            f'mode="kv-cache" needs a cache that can be repeated over candidates; {type(model).__name__} returned '
            f'{type(cache).__name__}. Use mode="packed" (or "none").'
        )
    return cache


def _forward_kv_cache(model, batch: PackedBatch) -> torch.Tensor:
    """All prompts in one pass, right-padded to P_max; the cache rows picked for every candidate; all candidates,
    right-padded to R_max, in a second pass. A [C, P_max + R_max] padding mask hides the gap between a short prompt
    and its candidates, so each candidate sees its own prompt's P_g tokens and then itself."""
    window, _ = _sliding_windows(model.config)
    prompt_width, cand_width = int(batch.prompt_lengths.max()), int(batch.candidate_lengths.max())
    if window is not None and prompt_width + cand_width > window:
        # A sliding window counts cache slots, gap included, and the cache keeps only the last window - 1 of them:
        # run each group on its own so that there is no gap.
        return _forward_kv_cache_per_group(model, batch)
    body = _body(model)
    prompts, cu_groups, cu_seqlens = _candidate_lists(batch)
    num_groups, num_cands, device = len(prompts), len(cu_seqlens) - 1, batch.targets.device

    prompt_ids = _right_padded(prompts, batch.pad_token_id)  # [G, P_max]
    prompt_positions = torch.arange(prompt_width, device=device)[None].expand(num_groups, -1)
    prompt_out = body(input_ids=prompt_ids, position_ids=prompt_positions, use_cache=True)
    cache = _repeatable_cache(model, prompt_out.past_key_values)
    # Indexing is differentiable: the gradients of a prompt's k rows sum into its keys and values.
    group_of = torch.repeat_interleave(torch.arange(num_groups, device=device), batch.cu_groups.diff())  # [C]
    cache.batch_select_indices(group_of)

    cands = [batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]] for c in range(num_cands)]
    cand_ids = _right_padded(cands, batch.pad_token_id)  # [C, R_max]
    prompt_len = batch.prompt_lengths[group_of]  # [C]
    cand_positions = prompt_len[:, None] + torch.arange(cand_width, device=device)[None]  # [C, R_max]
    prompt_keys = torch.arange(prompt_width, device=device)[None] < prompt_len[:, None]  # [C, P_max]
    key_mask = torch.cat([prompt_keys, torch.ones_like(cand_ids, dtype=torch.bool)], dim=1).long()  # [C, P_max + R_max]
    cand_out = body(
        input_ids=cand_ids, attention_mask=key_mask, position_ids=cand_positions, past_key_values=cache, use_cache=True
    )

    # Gather in targets order from [prompt last states (G rows); candidate states (C * R_max rows)].
    prompt_last = prompt_out.last_hidden_state[torch.arange(num_groups, device=device), batch.prompt_lengths - 1]
    states = torch.cat([prompt_last, cand_out.last_hidden_state.reshape(num_cands * cand_width, -1)])
    index = []
    for g in range(num_groups):
        for c in range(cu_groups[g], cu_groups[g + 1]):
            index.append(g)
            index.extend(range(num_groups + c * cand_width, num_groups + c * cand_width + cands[c].numel() - 1))
    return states[torch.tensor(index, device=device)]


def _forward_kv_cache_per_group(model, batch: PackedBatch) -> torch.Tensor:
    """kv-cache one group at a time: the prompt [1, P], the cache repeated k times, the candidates [k, R]."""
    body = _body(model)
    prompts, cu_groups, cu_seqlens = _candidate_lists(batch)
    pieces = []
    for g, prompt in enumerate(prompts):
        first, last = cu_groups[g], cu_groups[g + 1]
        k, plen = last - first, prompt.numel()
        prompt_out = body(input_ids=prompt[None], use_cache=True)
        cache = _repeatable_cache(model, prompt_out.past_key_values)
        # repeat_interleave is differentiable: the gradients of the k copies sum into the prompt's keys and values.
        cache.batch_repeat_interleave(k)
        cands = [batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]] for c in range(first, last)]
        ids = _right_padded(cands, batch.pad_token_id)  # [k, R]
        positions = plen + torch.arange(ids.shape[1], device=ids.device)
        cand_out = body(input_ids=ids, position_ids=positions[None].expand(k, -1), past_key_values=cache, use_cache=True)
        prompt_last = prompt_out.last_hidden_state[0, -1]  # [D]
        for i, cand in enumerate(cands):
            pieces.append(prompt_last[None])
            pieces.append(cand_out.last_hidden_state[i, : cand.numel() - 1])
    return torch.cat(pieces)


def _forward_none(model, batch: PackedBatch) -> torch.Tensor:
    prompts, cu_groups, cu_seqlens = _candidate_lists(batch)
    sequences, spans = [], []  # spans: (prompt length, candidate length) of every sequence
    for g, prompt in enumerate(prompts):
        for c in range(cu_groups[g], cu_groups[g + 1]):
            cand = batch.targets[cu_seqlens[c] : cu_seqlens[c + 1]]
            sequences.append(torch.cat([prompt, cand]))
            spans.append((prompt.numel(), cand.numel()))
    ids = _right_padded(sequences, batch.pad_token_id)
    hidden = _body(model)(input_ids=ids, use_cache=False).last_hidden_state
    # Response token t of a sequence is predicted by position P - 1 + t.
    return torch.cat([hidden[i, plen - 1 : plen - 1 + clen] for i, (plen, clen) in enumerate(spans)])


_FORWARDS = {"packed": _forward_packed, "kv-cache": _forward_kv_cache, "none": _forward_none}


def prefix_forward(model, batch: PackedBatch, mode: str = "auto") -> torch.Tensor:
    """hidden [N, D]: row n is the final hidden state (after the final norm) that predicts batch.targets[n].

    model   a Hugging Face causal LM (its body is run, its LM head is not)
    batch   a PackedBatch (moved to the model's device here)
    mode    "auto", "packed", "kv-cache" or "none" (see the module docstring); a mode this model or attention
            implementation cannot serve raises ValueError naming the mode to use
    """
    mode = resolve_mode(model, mode)
    return _FORWARDS[mode](model, batch.to(model.device))


def model_loss(model, batch: PackedBatch, *, mode: str = "auto", **loss_options):
    """The RRHF loss of `model` on `batch`: prefix_forward, then rrhf_fast.loss.rrhf_loss with the LM head's
    weight and bias. loss_options go to rrhf_loss (length_penalty, rank_weight, sft_weight, margin,
    sft_reduction, backend). Returns rrhf_loss's output (loss, rank_loss, sft_loss, scores)."""
    weight, bias = lm_head(model)
    batch = batch.to(model.device)
    hidden = prefix_forward(model, batch, mode)
    return rrhf_loss(
        hidden, weight, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups, bias=bias, **loss_options
    )
