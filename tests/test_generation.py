"""Tests of rrhf_fast.generation: batched decoding that gives every query the tokens it gets alone.

The models are tiny random Llamas in float64, where a row's logits do not depend on the batch to far below any
draw's resolution; the references are transformers' generate() on one query and hand-worked draws.
"""

import pytest
import torch

from rrhf_fast import generation
from rrhf_fast.default_model import build_model, build_tokenizer

# odd lengths: a one-token prompt, a long one, equal ones next to each other
QUERIES = ["12+34=", "7+5=", "x", "99+1=", "a longer query, 123+456=", "7+5=", "0+0="]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.set_num_threads(1)
    return build_model(tokenizer, seed=1, hidden_size=32, num_layers=2).double().eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return generation.encode_queries(tokenizer, QUERIES)


def decode(model, prompts, k=3, **options):
    options = dict(dict(max_new_tokens=7, stop_token_ids=[257], pad_token_id=256), **options)
    return generation.sample_candidates(model, prompts, k, **options)


def alone(model, prompt, max_new_tokens, eos_token_id=257):
    """transformers' greedy generate() on one query, the stop token cut off."""
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=256,
        eos_token_id=eos_token_id,
    )[0, len(prompt) :].tolist()  # fmt: skip
    stops = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


# ----------------------------------------------------------------------------------------------------------
# A query's tokens do not depend on its batch


@pytest.mark.parametrize("options", [dict(temperature=1.3, top_p=0.9), dict(temperature=0.7), dict(diversity_penalty=0.5)])
def test_batch_size_order_and_resume_do_not_change_the_tokens(model, prompts, options):
    by_size = {bs: decode(model, prompts, batch_size=bs, seed=5, **options) for bs in (1, 3, 8)}
    assert by_size[1] == by_size[3] == by_size[8]
    # reversed order: each query keeps its own position, so its own generator
    order = list(reversed(range(len(prompts))))
    backwards = decode(model, [prompts[i] for i in order], positions=order, batch_size=3, seed=5, **options)
    assert backwards == [by_size[1][i] for i in order]
    # a resume after 4 queries draws what the uninterrupted run drew
    tail = decode(model, prompts[4:], positions=range(4, len(prompts)), batch_size=2, seed=5, **options)
    assert tail == by_size[1][4:]
    assert all(len({tuple(c) for c in cands}) > 1 for cands in by_size[8])  # k really different candidates
    if "temperature" in options:  # sampled, so seeded: the seed and the position matter
        assert decode(model, prompts, batch_size=8, seed=6, **options) != by_size[8]
        assert QUERIES[1] == QUERIES[5] and by_size[8][1] != by_size[8][5]  # same text, other position


def test_waves_are_formed_by_prompt_length_within_a_window(model, prompts, monkeypatch):
    """sort_window 2 at batch 2: the first 4 queries (6, 4, 1, 5 tokens) are decoded as waves of (1, 4) and (5, 6)
    tokens, the last 3 (24, 4, 4) as (4, 4) and (24,): the same tokens as waves in file order, in file order."""
    in_order = decode(model, prompts, batch_size=2, sort_window=1, seed=3, temperature=1.0)
    lengths, real = [], generation._decode_wave

    def spy(model, wave_prompts, *args, **kwargs):
        lengths.append([len(p) for p in wave_prompts])
        return real(model, wave_prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "_decode_wave", spy)
    assert decode(model, prompts, batch_size=2, sort_window=2, seed=3, temperature=1.0) == in_order
    assert [len(p) for p in prompts] == [6, 4, 1, 5, 24, 4, 4]
    assert lengths == [[1, 4], [5, 6], [4, 4], [24]]


def test_diversity_penalty_spreads_greedy_candidates(model, prompts):
    """The first candidate is plain greedy; a large penalty forces the k first tokens apart; a tiny one does not."""
    greedy = decode(model, prompts[:2], k=1, temperature=0.0)
    apart = decode(model, prompts[:2], k=4, diversity_penalty=1e6)
    assert [cands[0] for cands in apart] == [g[0] for g in greedy]
    assert all(len({c[0] if c else 257 for c in cands}) == 4 for cands in apart)
    assert decode(model, prompts[:2], k=4, diversity_penalty=1e-9) == [g * 4 for g in greedy]


def test_greedy_equals_generate_on_each_query_alone(model, prompts):
    out = decode(model, prompts, k=2, temperature=0.0, batch_size=8, max_new_tokens=9)
    for prompt, cands in zip(prompts, out):
        assert cands == [alone(model, prompt, 9)] * 2


def test_stop_token_list_ends_rows_and_drops_them(model, prompts):
    """Stops taken from a generation_config list (as chat models have): 257 and a token greedy writes early; the
    rows that stop leave the batch, so the later forwards run fewer rows."""
    first = [alone(model, p, 9) for p in prompts]
    stop = first[0][2]  # the third token of query 0's answer
    model.generation_config.eos_token_id = [257, stop]
    try:
        stops = generation.stop_token_ids(model)
        assert stops == sorted([257, stop])
        rows = []
        hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
        try:
            out = decode(model, prompts, k=2, temperature=0.0, batch_size=8, max_new_tokens=9, stop_token_ids=stops)
        finally:
            hook.remove()
        for prompt, cands in zip(prompts, out):
            assert cands == [alone(model, prompt, 9, eos_token_id=[257, stop])] * 2
    finally:
        model.generation_config.eos_token_id = 257
    assert out[0][0] == first[0][:2]
    assert rows[0] == len(prompts)  # the prefill: one row a prompt, not k
    assert rows[1] == 2 * len(prompts)
    stopped_early = sum(2 for cands in out if len(cands[0]) < 9)
    assert stopped_early > 0 and rows[-1] <= 2 * len(prompts) - stopped_early


def test_without_cache_ops_the_prompts_are_prefilled_k_times_and_rows_masked(model, prompts, monkeypatch):
    """A cache that cannot be repeated or cut (not a transformers Cache): the same tokens, the slow way."""
    expect = decode(model, prompts, batch_size=8, seed=2, temperature=1.0)
    monkeypatch.setattr(generation, "_cache_ops", lambda cache: (False, False))
    assert decode(model, prompts, batch_size=8, seed=2, temperature=1.0) == expect


def test_model_positions_bound_the_answer(model, tokenizer, monkeypatch):
    """A model of 64 positions: a 62-token prompt gets 2 new tokens at most; a 64-token one is refused."""
    monkeypatch.setattr(model.config, "max_position_embeddings", 64)
    near = [[65] * 62]
    assert [len(c) for c in decode(model, near, max_new_tokens=7, temperature=1.0)[0]] == [2, 2, 2]
    with pytest.raises(ValueError, match="query 3 has 64 tokens.*64 positions"):
        decode(model, [[65] * 64], positions=[3])


@pytest.mark.parametrize(
    "options, what",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(k=0), "k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(diversity_penalty=float("nan")), "diversity_penalty"),
        (dict(stop_token_ids=[]), "stop_token_ids"),
        (dict(positions=[0]), "positions"),
        (dict(sort_window=0), "sort_window"),
    ],
)
def test_bad_options(model, prompts, options, what):
    with pytest.raises(ValueError, match=what):
        decode(model, prompts, **options)


def test_greedy_answers_match_generate_alone(model, tokenizer):
    answers = generation.greedy_answers(model, tokenizer, QUERIES, batch_size=3, max_new_tokens=5)
    prompts = generation.encode_queries(tokenizer, QUERIES)
    assert answers == [tokenizer.decode(alone(model, p, 5), skip_special_tokens=True) for p in prompts]


# ----------------------------------------------------------------------------------------------------------
# Stop tokens


def test_stop_tokens_include_the_chat_templates_end_of_turn(tokenizer, model):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert generation.chat_end_of_turn(tok) == end
    assert generation.stop_token_ids(model, tok) == [257, end]
    assert generation.chat_end_of_turn(tokenizer) is None  # no template


# ----------------------------------------------------------------------------------------------------------
# Picking tokens by hand


def test_inverse_cdf_draws_by_hand():
    """p = [0.5, 0.3, 0.15, 0.05], cumulative [0.5, 0.8, 0.95, 1.0]. top_p = 0.7 keeps 0.5 and 0.3 (0.5 < 0.7
    before the second token, 0.8 >= 0.7 before the third), cumulative [0.5, 0.8] of total 0.8:
    u = 0.6 -> 0.48 < 0.5: token 0; u = 0.7 -> 0.56: token 1; u = 0.99 -> 0.792: token 1.
    Without top_p: u = 0.6 -> 1; 0.9 -> 2; 0.99 -> 3."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(3, -1)
    u = torch.tensor([0.6, 0.7, 0.99], dtype=torch.float64)
    assert generation.pick_tokens(logits, temperature=1.0, top_p=0.7, uniforms=u).tolist() == [0, 1, 1]
    u = torch.tensor([0.6, 0.9, 0.99], dtype=torch.float64)
    assert generation.pick_tokens(logits, temperature=1.0, top_p=1.0, uniforms=u).tolist() == [1, 2, 3]
    assert generation.pick_tokens(logits, temperature=0.0, top_p=1.0, uniforms=None).tolist() == [0, 0, 0]
    # an even grid of uniforms lands on each token as often as its probability (temperature 2: p ~ sqrt(p))
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    picks = generation.pick_tokens(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(10_000, -1), temperature=2.0, top_p=1.0, uniforms=grid)
    expect = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(torch.bincount(picks, minlength=4) / 10_000.0, expect / expect.sum(), atol=2e-4, rtol=0)


def test_diverse_picks_by_hand():
    """Row 0 of a group takes the best token; row 1 pays 1.0 for it, so the runner-up (0.5 nats behind) wins.
    Two groups side by side do not penalise each other; a row that is not live counts not. One group of four at
    penalty 0.3 (log p = -0.511, -1.011, -3.324): row 0 takes 0; row 1: 0 at -0.811 beats 1 at -1.011; row 2: 0 at
    -1.111 loses to 1 at -1.011; row 3: 0 at -1.111 beats 1 at -1.311."""
    logits = torch.log(torch.tensor([[0.6, 0.364, 0.036]])).expand(4, -1)
    groups = torch.tensor([0, 0, 1, 1])
    assert generation.pick_diverse_tokens(logits, groups, 1.0).tolist() == [0, 1, 0, 1]
    live = torch.tensor([False, True, True, True])
    assert generation.pick_diverse_tokens(logits, groups, 1.0, live).tolist() == [0, 0, 0, 1]
    assert generation.pick_diverse_tokens(logits, torch.tensor([0, 0, 0, 0]), 0.3).tolist() == [0, 0, 1, 0]


# ----------------------------------------------------------------------------------------------------------
# The reward stage


def test_score_responses_per_item_and_batched():
    queries, responses = ["ab", "c"], [["x", "yy"], ["zzz"]]
    expect = [[3.0, 4.0], [4.0]]

    def per_item(query, response):
        return float(len(query) + len(response))

    calls = []

    def batched(queries: list[str], responses: list[str]) -> list[float]:
        calls.append(len(queries))
        return [float(len(q) + len(r)) for q, r in zip(queries, responses)]

    def flagged(queries, responses):
        return batched(queries, responses)

    flagged.batched = True
    assert not generation.is_batched_reward(per_item)
    assert generation.score_responses(per_item, queries, responses) == expect
    assert generation.score_responses(batched, queries, responses) == expect
    assert generation.score_responses(flagged, queries, responses) == expect
    assert calls == [3, 3]  # one call for all three responses


def test_score_responses_names_the_query_it_fails_on():
    def batched(queries: list, responses: list) -> list:
        if "bad" in queries:
            raise KeyError("no score")
        return [1.0] * len(queries)

    with pytest.raises(ValueError, match=r"--reward m:f: raised KeyError.*on query 'bad'"):
        generation.score_responses(batched, ["ok", "bad"], [["a"], ["b"]], name="--reward m:f")
    with pytest.raises(ValueError, match=r"raised ZeroDivisionError.*on query 'q'"):
        generation.score_responses(lambda q, r: 1 / 0, ["q"], [["a"]])
    with pytest.raises(ValueError, match=r"returned nan for query 'q'"):
        generation.score_responses(lambda q, r: float("nan"), ["q"], [["a"]])
    one_score = lambda queries, responses: [1.0]  # noqa: E731
    one_score.batched = True
    with pytest.raises(ValueError, match=r"returned 1 scores for 2 responses"):
        generation.score_responses(one_score, ["q"], [["a", "b"]])


def test_bad_options_are_refused_before_decoding(model, prompts):
    """generate_candidates checks its arguments when called, not at the first next() of its iterator."""
    with pytest.raises(ValueError, match="batch_size"):
        generation.generate_candidates(model, prompts, 2, max_new_tokens=3, stop_token_ids=[257], batch_size=0)
