"""Shared set-up for tests and benchmark suites: Triton kernels run through the interpreter on CPU tensors when
there is no GPU; the tiny model every command test trains, samples from or evaluates; the independent score."""

import os
import shutil

import pytest
import torch

# The interpreter is chosen when a kernel is decorated, so this must happen before rrhf_fast.kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A directory holding a tiny random Llama (hidden 32, one layer, seed 0, 1024 positions) and the embedded byte
    tokenizer (258 tokens), in Hugging Face format. Read it; do not write into it."""
    from rrhf_fast.default_model import build_model, build_tokenizer

    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, hidden_size=32, num_layers=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def chat_model_dir(tiny_llama, tmp_path_factory):
    """f(template) -> a copy of tiny_llama whose tokenizer has `template` as its chat template."""
    from transformers import AutoTokenizer

    def make(template: str) -> str:
        directory = tmp_path_factory.mktemp("chat_llama")
        shutil.copytree(tiny_llama, directory, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(directory)
        return str(directory)

    return make


def _full_sequence_score(model, tokenizer, query: str, response: str) -> float:
    """Mean log-probability (float64) of response + EOS after the query, from one plain forward over the whole text:
    the RRHF score at length penalty 1, computed without rrhf_fast."""
    prompt = tokenizer(query)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0, :-1].double(), -1)
    return logp[len(prompt) - 1 :].gather(1, torch.tensor(answer)[:, None]).mean().item()


@pytest.fixture(scope="session")
def full_sequence_score():
    """f(model, tokenizer, query, response) -> the mean log-probability of response + EOS, from a plain forward."""
    return _full_sequence_score


@pytest.fixture(scope="session")
def independent_rank_acc():
    """f(model directory, RRHF JSONL) -> (correct, pairs): the ranking accuracy from full_sequence_score, counted
    without rrhf_fast.metrics (pairs with r_i < r_j where p_i < p_j)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def rank_acc(model_dir, data_path):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
        correct = pairs = 0
        with open(data_path, encoding="utf-8") as f:
            for record in map(json.loads, f):
                p = [_full_sequence_score(model, tokenizer, record["query"], r) for r in record["responses"]]
                r = record["scores"]
                for i in range(len(r)):
                    for j in range(len(r)):
                        pairs += r[i] < r[j]
                        correct += r[i] < r[j] and p[i] < p[j]
        return correct, pairs

    return rank_acc


@pytest.fixture(scope="session")
def independent_greedy_answers():
    """f(model directory, queries, max_new_tokens) -> each query's greedy answer from transformers' generate on that
    query alone (no batch, no padding), decoded without special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def answers(model_dir, queries, max_new_tokens):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
        out = []
        for query in queries:
            ids = tokenizer(query, return_tensors="pt").input_ids
            new = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True))
        return out

    return answers
