"""Batched decoding from a causal LM: many queries at once, each prompt prefilled once, k candidates a query.

A wave of up to `batch_size` queries is decoded together. The waves are formed within a window of `sort_window`
waves' worth of queries sorted by prompt length, so that a wave pads its prompts to a length close to each one's
(the tokens do not depend on the wave, so the order is free; results still come out in the queries' order, a
window at a time):

    prefill   the wave's prompts, left-padded to the longest (attention mask 0 on the padding, position ids
              counting real tokens only, so every prompt sees the positions it would see alone); one forward,
              logits of the last position only. The key/value cache is then repeated to k rows a query
              (cache.batch_repeat_interleave), so a prompt of P tokens costs P, not kP.
    decode    one token a row a step. A row stops at a stop token (left out of the response) or at
              max_new_tokens; rows that stop are dropped from the batch (cache.batch_select_indices), so the
              steps that follow cost only the rows still running.

Stop tokens (stop_token_ids): the model's generation_config.eos_token_id (an id or a list), the tokenizer's EOS
and the chat template's end of turn (e.g. <|im_end|>), the special token the template writes after an
assistant message.

Reproducibility: a query's samples depend only on (seed, its position in the file), never on the batch it is
decoded in, its place in that batch or a resume. Each query owns a CPU torch.Generator seeded with
query_seed(seed, position); at every step the query draws k uniforms u_1..u_k from it (one a candidate,
whether that candidate is still running or not), and candidate j takes the token where the cumulative
distribution first passes u_j * (total kept probability):

    p        = softmax(logits / temperature)             top_p < 1: keep the most likely tokens whose
    token_j  = min { v : sum_{w <= v} p_w > u_j * sum p }   probability before them is below top_p (sorted)

Since each row's logits do not depend on the other rows (padding is masked, positions are per row), equal
logits give equal tokens whatever the batch. Exactness to the last bit needs a batch-invariant matmul, which no
BLAS promises; in float64 the differences are far below any draw's resolution (tested), in float32 a draw
that lands within rounding of a boundary may differ.

Greedy (temperature 0) takes the argmax; diversity_penalty > 0 decodes greedily with the Hamming penalty of
pick_diverse_tokens (diverse beam search with one beam a group, as in the paper).
"""

import inspect
import math
import numbers
import typing
from collections.abc import Callable, Iterator, Sequence

import torch


def query_seed(seed: int, position: int) -> int:
    """The seed of the generator of the query at `position` (0-based, in the queries file) for run seed `seed`."""
    return seed * 1_000_003 + position


# ----------------------------------------------------------------------------------------------------------
# Stop tokens


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """Sorted ids that end a candidate: generation_config.eos_token_id (int or list), tokenizer.eos_token_id and
    the end of turn the chat template writes after an assistant message. ValueError when there is none."""
    ids = set()
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        end_of_turn = chat_end_of_turn(tokenizer)
        if end_of_turn is not None:
            ids.add(end_of_turn)
    if not ids:
        raise ValueError(
            "no stop token: the model's generation_config has no eos_token_id and the tokenizer no eos_token; "
            "set model.generation_config.eos_token_id"
        )
    return sorted(int(i) for i in ids)


def chat_end_of_turn(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message's text, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7 marker"  # text no template rewrites
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that refuses these roles has no end of turn to learn from
        return None
    after = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def encode_queries(tokenizer, queries: Sequence[str]) -> list[list[int]]:
    """Token ids of each query as the tokenizer encodes it alone; an empty one becomes [BOS] (or [EOS])."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [tokenizer(q).input_ids or [start] for q in queries]


# ----------------------------------------------------------------------------------------------------------
# Picking the next token


def pick_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, uniforms: torch.Tensor | None) -> torch.Tensor:
    """[R] next tokens from [R, V] logits: argmax at temperature 0, else the inverse-CDF draw described in the
    module docstring with `uniforms` [R] in [0, 1) (top_p < 1: from the nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p; the most likely one always stays
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)  # [R, V]
    target = uniforms.to(cdf.device, dtype)[:, None] * cdf[:, -1:]
    # the first index whose cumulative probability passes the target: never a token of probability 0
    index = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    return index.squeeze(-1) if order is None else order.gather(-1, index).squeeze(-1)


def pick_diverse_tokens(
    logits: torch.Tensor, groups: torch.Tensor, penalty: float, live: torch.Tensor | None = None
) -> torch.Tensor:
    """[R] next tokens, greedy with a Hamming diversity penalty inside each group of rows.

    groups [R]: the query of each row, non-decreasing (a query's rows are contiguous and in candidate order).
    Each row takes the most likely token (log-softmax) after subtracting `penalty` for every earlier live row
    of its group that chose it at this step, as in diverse beam search; live [R] (default all) marks the rows
    whose picks count.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    rows = torch.arange(len(groups), device=logits.device)
    rank = rows - torch.searchsorted(groups, groups)  # [R] place of the row inside its group
    live = torch.ones_like(groups, dtype=torch.bool) if live is None else live
    chosen = logp.new_zeros(int(groups.max()) + 1 if len(groups) else 0, logp.shape[-1])  # [G, V] picks so far
    picks = torch.empty_like(groups)
    for j in range(int(rank.max()) + 1 if len(groups) else 0):
        at = rows[rank == j]
        token = (logp[at] - penalty * chosen[groups[at]]).argmax(-1)
        picks[at] = token
        chosen.index_put_((groups[at], token), live[at].to(chosen.dtype), accumulate=True)
    return picks


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _accepts(model, name: str) -> bool:
    """Whether the model's forward names the argument; a peft PeftModel passes **kwargs on to the model it wraps,
    whose signature is the one that counts."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return name in inspect.signature(model.forward).parameters


def _cache_ops(cache) -> tuple[bool, bool]:
    """Whether the cache can be repeated per candidate and have rows dropped (transformers' Cache, 5.17 on)."""
    return hasattr(cache, "batch_repeat_interleave"), hasattr(cache, "batch_select_indices")


def _cache_of(out):
    """The key/value cache of a model output: `cache` in newer transformers, `past_key_values` before."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def max_positions(model) -> int | None:
    """The model's position limit (config max_position_embeddings or n_positions), None when it states none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate_candidates(
    model,
    prompts: Sequence[Sequence[int]],
    k: int,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    diversity_penalty: float = 0.0,
    seed: int = 0,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    pad_token_id: int = 0,
    sort_window: int = 8,
) -> Iterator[list[list[int]]]:
    """Yield, for each prompt in order, its k continuations (token ids, the stop token left out).

    prompts: token ids, one list a query. positions: each query's place in the queries file (default
    0, 1, ...), which seeds its generator (query_seed(seed, position)): pass range(done, n) when resuming after
    `done` queries. The tokens of a query do not depend on batch_size or on the other prompts. sort_window: waves
    of queries sorted by prompt length together (1: waves in the queries' order). A candidate
    also ends where the model's positions run out (max_positions); a prompt that leaves no room is an error.
    """
    _check_options(k, max_new_tokens, temperature, top_p, diversity_penalty, batch_size, stop_token_ids)
    if not (isinstance(sort_window, int) and sort_window >= 1):
        raise ValueError(f"sort_window: got {sort_window!r}, expected an int >= 1")
    positions = list(range(len(prompts))) if positions is None else list(positions)
    if len(positions) != len(prompts):
        raise ValueError(f"positions: {len(positions)} given for {len(prompts)} prompts; give one a prompt")
    limit = max_positions(model)
    for position, prompt in zip(positions, prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts: query {position} has no tokens; encode an empty query as [BOS]")
        if limit is not None and len(prompt) >= limit:
            raise ValueError(
                f"prompts: query {position} has {len(prompt)} tokens, the model has {limit} positions; "
                "shorten it (one position must be left for the answer)"
            )
    budgets = [max_new_tokens if limit is None else min(max_new_tokens, limit - len(p)) for p in prompts]
    options = dict(
        stop_token_ids=stop_token_ids, temperature=temperature, top_p=top_p, diversity_penalty=diversity_penalty,
        pad_token_id=pad_token_id,
    )  # fmt: skip
    waves = _waves(model, prompts, budgets, positions, k, seed, batch_size, sort_window, options)
    return waves  # checked now, decoded lazily


@torch.no_grad()
def _waves(model, prompts, budgets, positions, k, seed, batch_size, sort_window, options):
    was_training = model.training
    model.eval()
    window = batch_size * sort_window
    try:
        for first in range(0, len(prompts), window):
            order = sorted(range(first, min(first + window, len(prompts))), key=lambda i: len(prompts[i]))
            decoded = {}
            for start in range(0, len(order), batch_size):
                wave = order[start : start + batch_size]
                generators = [torch.Generator().manual_seed(query_seed(seed, positions[i])) for i in wave]
                tokens = _decode_wave(model, [prompts[i] for i in wave], [budgets[i] for i in wave], generators, k, **options)
                decoded.update(zip(wave, tokens))
            yield from (decoded[i] for i in sorted(decoded))
    finally:
        model.train(was_training)


def sample_candidates(model, prompts: Sequence[Sequence[int]], k: int, **options) -> list[list[list[int]]]:
    """generate_candidates as a list: [query][candidate] -> token ids."""
    return list(generate_candidates(model, prompts, k, **options))


def _check_options(k, max_new_tokens, temperature, top_p, diversity_penalty, batch_size, stop_ids):
    checks = [
        ("k", k, isinstance(k, int) and k >= 1, "an int >= 1"),
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, "an int >= 1"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an int >= 1"),
        ("temperature", temperature, math.isfinite(temperature) and temperature >= 0, "a finite float >= 0"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("diversity_penalty", diversity_penalty, math.isfinite(diversity_penalty) and diversity_penalty >= 0, "a finite float >= 0"),
        ("stop_token_ids", stop_ids, len(stop_ids) > 0, "at least one id (see stop_token_ids(model, tokenizer))"),
    ]  # fmt: skip
    for name, value, ok, need in checks:
        if not ok:
            raise ValueError(f"{name}: got {value!r}, expected {need}")


def _decode_wave(model, prompts, budgets, generators, k, *, stop_token_ids, temperature, top_p, diversity_penalty, pad_token_id):
    """The k continuations of each prompt of one wave, decoded together (see the module docstring)."""
    device = next(model.parameters()).device
    num_queries, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((num_queries, longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((num_queries, longest), dtype=torch.long)
    for q, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[q, longest - len(prompt) :] = torch.tensor(prompt)
        mask[q, longest - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())
    position = (mask.cumsum(-1) - 1).clamp_min(0)  # [Q, P] real tokens count from 0 in every row

    # the cache repeated per candidate (transformers >= 5.17 caches); else the k copies are prefilled
    inputs = dict(use_cache=True)
    if _accepts(model, "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=position, **inputs)
    cache = _cache_of(out)
    can_repeat, can_drop = _cache_ops(cache)
    if can_repeat:
        cache.batch_repeat_interleave(k)
        logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # [Q * k, V]
    else:
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
        out = model(input_ids=rep(ids), attention_mask=rep(mask) if padded else None, position_ids=rep(position), **inputs)
        cache, logits = _cache_of(out), out.logits[:, -1]
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.2x

    row_query = torch.arange(num_queries).repeat_interleave(k)  # [R] on CPU: which query, which candidate
    row_slot = torch.arange(k).repeat(num_queries)
    live = torch.ones(len(row_query), dtype=torch.bool)  # rows still running (all of them when rows are dropped)
    mask = mask.repeat_interleave(k, dim=0)
    next_position = position[:, -1].repeat_interleave(k) + 1  # [R] on device
    budget = torch.tensor(budgets)
    stops = torch.tensor(sorted(stop_token_ids), device=device)
    tokens = [[[] for _ in range(k)] for _ in range(num_queries)]
    for step in range(max(budgets)):
        if diversity_penalty > 0:
            nxt = pick_diverse_tokens(logits, row_query.to(device), diversity_penalty, live.to(device))
        elif temperature == 0:
            nxt = logits.argmax(-1)
        else:
            running = row_query[live].unique().tolist()
            uniforms = torch.zeros(num_queries, k, dtype=torch.float64)
            for q in running:  # k draws a running query a step, whatever its rows' state
                uniforms[q] = torch.rand(k, generator=generators[q], dtype=torch.float64)
            nxt = pick_tokens(logits, temperature=temperature, top_p=top_p, uniforms=uniforms[row_query, row_slot])
        stopped = torch.isin(nxt, stops).cpu()
        picked = nxt.tolist()
        for row in torch.nonzero(live & ~stopped).squeeze(-1).tolist():
            tokens[row_query[row]][row_slot[row]].append(picked[row])
        live &= ~stopped & (budget[row_query] > step + 1)
        if not bool(live.any()):
            break
        if can_drop and not bool(live.all()):
            keep = torch.nonzero(live).squeeze(-1)
            cache.batch_select_indices(keep.to(device))
            row_query, row_slot, live = row_query[keep], row_slot[keep], live[keep]
            keep = keep.to(device)
            nxt, mask, next_position = nxt[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        out = model(
            input_ids=nxt[:, None], attention_mask=mask if padded else None, position_ids=next_position[:, None],
            **{cache_argument: cache}, **inputs,
        )  # fmt: skip
        cache, logits = _cache_of(out), out.logits[:, -1]
        next_position = next_position + 1
    return tokens


@torch.no_grad()
def greedy_answers(
    model, tokenizer, queries: Sequence, *, batch_size: int, max_new_tokens: int, chat_template: str | None = None
) -> list[str]:
    """The model's greedy continuation of each query (text, or chat messages rendered with the generation prompt
    as rrhf_fast.data.encode_prompts does), decoded (special tokens skipped), up to a stop token (stop_token_ids)
    or max_new_tokens; batch_size queries decoded together."""
    from rrhf_fast.data import encode_prompts

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = generate_candidates(
        model, encode_prompts(list(queries), tokenizer, chat_template), 1, max_new_tokens=max_new_tokens,
        temperature=0.0, stop_token_ids=stop_token_ids(model, tokenizer), batch_size=batch_size, pad_token_id=pad,
    )  # fmt: skip
    return [tokenizer.decode(candidates[0], skip_special_tokens=True) for candidates in tokens]


# ----------------------------------------------------------------------------------------------------------
# The reward stage


def is_batched_reward(fn) -> bool:
    """True for a reward that scores lists: `fn.batched = True`, or the signature
    f(queries: list[str], responses: list[str]) -> list[float] (its first two parameters annotated as lists)."""
    if getattr(fn, "batched", False):
        return True
    try:
        hints = typing.get_type_hints(fn)
        names = list(inspect.signature(fn).parameters)[:2]
    except Exception:  # no signature or unresolvable annotations: a per-item function
        return False
    return len(names) == 2 and all((typing.get_origin(hints.get(n)) or hints.get(n)) is list for n in names)


def score_responses(
    reward: Callable, queries: Sequence[str], responses: Sequence[Sequence[str]], *, name: str = "reward"
) -> list[list[float]]:
    """The reward of every response of every query: [query][response] -> float.

    reward is either per item, f(query, response) -> float, or batched (is_batched_reward), called once with
    the flattened pairs of all queries, f(queries, responses) -> list[float], for rewards that run a model
    themselves. ValueError naming the query (and `name`, e.g. "--reward mod:fn") when the reward raises or
    returns anything but a finite number; for a batched reward that raises, the queries are tried one by one to
    find the one it fails on.
    """
    flat_queries = [q for q, rs in zip(queries, responses) for _ in rs]
    flat_responses = [r for rs in responses for r in rs]
    if is_batched_reward(reward):
        try:
            scores = list(reward(flat_queries, flat_responses))
        except Exception as err:
            for query, rs in zip(queries, responses):  # find the query it fails on
                try:
                    reward([query] * len(rs), list(rs))
                except Exception as one:
                    raise ValueError(f"{name}: raised {type(one).__name__}: {one} on query {query!r}") from None
            raise ValueError(f"{name}: raised {type(err).__name__}: {err} on the batch of {len(queries)} queries from {queries[0]!r}") from None
        if len(scores) != len(flat_responses):
            raise ValueError(f"{name}: returned {len(scores)} scores for {len(flat_responses)} responses; give one a response")
    else:
        scores = []
        for query, response in zip(flat_queries, flat_responses):
            try:
                scores.append(reward(query, response))
            except Exception as err:
                raise ValueError(f"{name}: raised {type(err).__name__}: {err} on query {query!r}") from None
    for query, value in zip(flat_queries, scores):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name}: returned {value!r} for query {query!r}; expected a finite float")
    out, at = [], 0
    for rs in responses:
        out.append([float(v) for v in scores[at : at + len(rs)]])
        at += len(rs)
    return out
