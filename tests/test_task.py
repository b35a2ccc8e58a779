"""The built-in addition task (rrhf_fast.task) and the embedded tiny model (rrhf_fast.default_model)."""

import random

import pytest
import torch

from rrhf_fast import task
from rrhf_fast.data import parse_example
from rrhf_fast.default_model import build_model, build_tokenizer


def test_reward_values():
    """Hand-worked: 23 + 48 = 71; reward = 1 / (1 + |answer - 71| / 4)."""
    assert task.reward("23+48=", "71") == 1.0
    assert task.reward("23+48=", " 71 ") == 1.0  # surrounding white space is ignored
    assert task.reward("23+48=", "72") == pytest.approx(1 / 1.25)  # 0.8
    assert task.reward("23+48=", "17") == pytest.approx(1 / 14.5)  # |17 - 71| = 54
    assert task.reward("23+48=", "") == 0.0
    assert task.reward("23+48=", "7 1") == 0.0
    assert task.reward("23+48=", "-71") == 0.0
    assert task.reward("23+48=", "seventy-one") == 0.0
    with pytest.raises(ValueError):
        task.true_answer("what is 2+2?")


def test_candidates_are_distinct_graded_and_of_the_named_kinds():
    rng = random.Random(0)
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            query = f"{a}+{b}="
            exact, off, swapped, other = task.candidates(query, rng)
            assert exact == str(a + b)
            assert len({exact, off, swapped, other}) == 4
            assert len(off) == len(exact) and sum(x != y for x, y in zip(off, exact)) == 1
            assert sorted(swapped) == sorted(exact) or sum(x != y for x, y in zip(swapped, exact)) == 1
            assert all(c == "0" or not c.startswith("0") for c in (off, swapped, other))  # plain integers
            assert task.reward(query, exact) > max(task.reward(query, c) for c in (off, swapped, other))


def test_records_deterministic_disjoint_and_valid():
    train, held = task.make_records(300, 50, seed=3)
    again_train, again_held = task.make_records(300, 50, seed=3)
    assert train == again_train and held == again_held
    assert task.make_records(300, 50, seed=4)[0] != train
    assert len(train) == 300 and len(held) == 50
    assert not {r["query"] for r in train} & {r["query"] for r in held}
    for i, record in enumerate(train + held):
        parse_example(record, "mem", i + 1)  # passes the RRHF format checks
        assert record["scores"] == [task.reward(record["query"], r) for r in record["responses"]]
    with pytest.raises(ValueError, match="at most 10000"):
        task.make_records(9990, 20, seed=0)


def test_tiny_model_is_seeded_and_tokenizer_round_trips(tmp_path):
    tok = build_tokenizer()
    text = "23+48= héllo\n\t😀"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == 258 and tok.eos_token_id == 257 and tok.pad_token_id == 256
    a, b, c = (build_model(tok, seed=s, hidden_size=16, num_layers=1) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok.save_pretrained(tmp_path)
    a.save_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded_tok(text).input_ids == tok(text).input_ids and loaded_tok.eos_token_id == 257
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), loaded.parameters()))
