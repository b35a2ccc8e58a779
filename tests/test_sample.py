"""Tests of `python -m rrhf_fast.sample` on a tiny Llama: output format, determinism, the shared prompt cache,
the reward function and reward-model paths, resume, and bad input.

The real CLI runs in a subprocess once (exit status, progress on stderr, the file `rrhf_fast.train` reads);
the rest call `sample.cli(argv)` in-process to keep the suite quick.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from rrhf_fast import sample, task
from rrhf_fast.data import read_jsonl
from rrhf_fast.default_model import build_model, build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["12+34=", "7+5=", "99+1="]
FAST = ["-k", "3", "--max-new-tokens", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def policy(tiny_llama):
    """A tiny random causal LM and its byte tokenizer, saved in Hugging Face format."""
    return tiny_llama


@pytest.fixture()
def queries(tmp_path):
    """The queries as RRHF JSONL, each with two existing responses."""
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps({"query": q, "responses": ["46", "x"], "scores": [1.0, 0.0]}) + "\n" for q in QUERIES))
    return str(path)


def run_inprocess(args, capsys=None):
    torch.set_num_threads(1)
    rc = sample.cli(args)
    return rc, (capsys.readouterr().err if capsys is not None else "")


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------------------------------------
# The command


def test_cli_writes_rrhf_jsonl_that_train_reads_and_is_deterministic(policy, queries, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--model", policy, "--queries", queries, "--out", "a.jsonl", "--reward", "task", "--seed", "3", *FAST]
    proc = subprocess.run([sys.executable, "-m", "rrhf_fast.sample", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    examples = read_jsonl(str(tmp_path / "a.jsonl"))  # the trainer's own reader and checks
    assert [ex.query for ex in examples] == QUERIES
    for ex in examples:
        assert len(ex.responses) == 3
        assert ex.scores == [task.reward(ex.query, r) for r in ex.responses]
    assert set(lines(tmp_path / "a.jsonl")[0]) == {"query", "responses", "scores"}

    assert run_inprocess([*args[:5], str(tmp_path / "b.jsonl"), *args[6:]])[0] == 0
    assert lines(tmp_path / "a.jsonl") == lines(tmp_path / "b.jsonl")  # same seed, same file
    assert run_inprocess([*args[:5], str(tmp_path / "c.jsonl"), *args[6:-len(FAST)], *FAST, "--seed", "4"])[0] == 0
    assert lines(tmp_path / "a.jsonl") != lines(tmp_path / "c.jsonl")


def test_reward_function_and_keep_existing(policy, queries, tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def length(query, response):\n    return float(len(query) + 10 * len(response))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on it
    args = ["--model", policy, "--queries", queries, "--out", "o.jsonl", "--reward", "my_reward:length", "--keep-existing", *FAST]
    assert run_inprocess(args)[0] == 0
    for row, query in zip(lines("o.jsonl"), QUERIES):
        assert row["query"] == query and len(row["responses"]) == 5 and row["responses"][:2] == ["46", "x"]
        assert row["scores"] == [float(len(query) + 10 * len(r)) for r in row["responses"]]


def test_reward_model(policy, tmp_path):
    """A tiny random LlamaForSequenceClassification: the scores are logit 0 of query + response, batched or not."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUERIES) + "\n")
    out = tmp_path / "o.jsonl"
    args = ["--model", policy, "--queries", str(qfile), "--out", str(out), "--reward-model", str(tmp_path / "rm"), "--reward-batch-size", "2", *FAST]
    assert run_inprocess(args)[0] == 0
    for row, query in zip(lines(out), QUERIES):
        assert row["query"] == query and len(row["scores"]) == 3
        with torch.no_grad():  # one text at a time, no padding
            expect = [rm(**tokenizer(query + r, return_tensors="pt")).logits[0, 0].item() for r in row["responses"]]
        assert row["scores"] == pytest.approx(expect, abs=1e-5)


def test_resume_skips_written_queries(policy, queries, tmp_path):
    args = ["--model", policy, "--queries", queries, "--reward", "task", *FAST]
    full, part = str(tmp_path / "full.jsonl"), str(tmp_path / "part.jsonl")
    assert run_inprocess([*args, "--out", full])[0] == 0
    text = open(full, encoding="utf-8").read().splitlines(keepends=True)
    # the first query written, then a crash in the middle of the second line
    with open(part, "w", encoding="utf-8") as f:
        f.write(text[0] + text[1][:10])
    assert run_inprocess([*args, "--out", part])[0] == 0
    assert open(part, encoding="utf-8").read() == "".join(text)
    assert run_inprocess([*args, "--out", part])[0] == 0  # all written: nothing to do
    assert open(part, encoding="utf-8").read() == "".join(text)


# ----------------------------------------------------------------------------------------------------------
# Sharing the prompt's cache


def test_shared_prompt_cache_gives_the_same_candidates():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1, hidden_size=32, num_layers=2).eval()
    prompt = tokenizer("23+48=").input_ids
    eos = tokenizer.eos_token_id
    greedy = sample.sample_candidates(model, prompt, 3, max_new_tokens=6, eos_token_id=eos, temperature=0)
    with torch.no_grad():  # each candidate on its own, full prefill, by transformers' generate
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    assert greedy == [alone[0, len(prompt) :].tolist()] * 3

    draws = {}
    for share in (True, False):
        generator = torch.Generator().manual_seed(5)
        draws[share] = sample.sample_candidates(
            model, prompt, 4, max_new_tokens=6, eos_token_id=eos, temperature=1.3, top_p=0.95, generator=generator,
            share_prompt=share,
        )  # fmt: skip
    assert draws[True] == draws[False]
    assert len({tuple(c) for c in draws[True]}) > 1  # really sampled


def test_diversity_penalty_spreads_greedy_candidates():
    """The first candidate is plain greedy; a large penalty forces the k first tokens apart; a tiny one does not."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=1, hidden_size=32, num_layers=2).eval()
    prompt, eos = tokenizer("23+48=").input_ids, tokenizer.eos_token_id
    greedy = sample.sample_candidates(model, prompt, 1, max_new_tokens=6, eos_token_id=eos, temperature=0)
    apart = sample.sample_candidates(model, prompt, 4, max_new_tokens=6, eos_token_id=eos, diversity_penalty=1e6)
    assert apart[0] == greedy[0]
    assert len({c[0] if c else eos for c in apart}) == 4
    close = sample.sample_candidates(model, prompt, 4, max_new_tokens=6, eos_token_id=eos, diversity_penalty=1e-9)
    assert close == greedy * 4


def test_diverse_picks_by_hand():
    """Row 0 takes the best token; row 1 pays 1.0 for it, which makes the runner-up (0.5 nats behind) win."""
    logits = torch.log(torch.tensor([[0.6, 0.364, 0.036]])).expand(2, -1)
    assert sample.pick_diverse_tokens(logits, torch.tensor([False, False]), 1.0).tolist() == [0, 1]
    assert sample.pick_diverse_tokens(logits, torch.tensor([True, False]), 1.0).tolist() == [0, 0]  # a done row counts not


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    picked = sample.pick_tokens(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}  # 0.5 < 0.7, so the second token is needed; 0.8 reaches it
    assert sample.pick_tokens(logits[:1], temperature=0.0, top_p=1.0, generator=None).tolist() == [0]


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the file and line


@pytest.mark.parametrize(
    "content, where, what",
    [
        ('{"query": "1+1="}\n{"query": 3}\n', ":2:", "query must be a string"),
        ('{"query": "1+1="}\n\n{"q": "x"}\n', ":3:", '"query" key'),
        ('{"query": "1+1="\n', ":1:", "invalid JSON"),
        ('{"query": "1+1=", "responses": [1]}\n', ":1:", "list of strings"),
        ("", "queries.jsonl:", "no queries"),
    ],
)
def test_bad_queries_file(policy, tmp_path, capsys, content, where, what):
    path = tmp_path / "queries.jsonl"
    path.write_text(content)
    rc, err = run_inprocess(["--model", policy, "--queries", str(path), "--out", str(tmp_path / "o.jsonl"), "--reward", "task"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("rrhf_fast.sample: error: ")
    assert where in err and what in err


@pytest.mark.parametrize(
    "extra, what",
    [
        (["--reward", "nope"], "module:function"),
        (["--reward", "no_such_module_xyz:f"], "no_such_module_xyz"),
        ([], "exactly one"),
        (["--reward", "task", "--reward-model", "x"], "exactly one"),
        (["--reward", "task", "--diversity-penalty", "-1"], "--diversity-penalty"),
        (["--reward", "task", "-k", "0"], "-k"),
        (["--reward", "task", "--queries", "missing.jsonl"], "no such file"),
        (["--reward", "task", "--model", "missing_dir"], "no such model directory"),
        (["--reward", "task", "--out", "/"], "--out /: is a directory"),
        (["--reward", "task", "--device", "foo"], "--device foo: not a torch device"),
        (["--reward", "task", "--device", "cuda"] if not torch.cuda.is_available() else ["--reward", "task", "--device", "cuda:99"], "--device cuda"),
    ],
)
def test_bad_flags(policy, queries, tmp_path, capsys, extra, what):
    base = ["--model", policy, "--queries", queries, "--out", str(tmp_path / "o.jsonl")]
    rc, err = run_inprocess([*base, *extra], capsys)
    assert rc == 2 and err.count("\n") == 1 and what in err, err


def test_out_from_other_queries_is_refused(policy, queries, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"query": "other", "responses": ["a"], "scores": [0.0]}) + "\n")
    rc, err = run_inprocess(["--model", policy, "--queries", queries, "--out", str(out), "--reward", "task"], capsys)
    assert rc == 2 and "o.jsonl:1:" in err and "does not match" in err


@pytest.mark.parametrize("returned", ["'0.5'", "float('nan')"])
def test_reward_that_is_not_a_finite_number_exits_2(policy, queries, tmp_path, monkeypatch, capsys, returned):
    (tmp_path / "sample_bad_reward.py").write_text(f"def bad(query, response):\n    return {returned}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on it
    rc, err = run_inprocess(["--model", policy, "--queries", queries, "--out", "o.jsonl", "--reward", "sample_bad_reward:bad", *FAST], capsys)
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert rc == 2 and last.startswith("rrhf_fast.sample: error: --reward sample_bad_reward:bad: returned ")
    assert "finite float" in last and "Traceback" not in err
