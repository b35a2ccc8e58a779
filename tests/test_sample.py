"""Tests of `python -m rrhf_fast.sample` on a tiny Llama: output format, determinism, samples independent of
--batch-size and of a resume, the reward function (per item and batched) and reward-model paths, and bad input.
The decoding itself is tested in tests/test_generation.py, the formats in tests/test_commands_formats.py.

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
from rrhf_fast.default_model import build_tokenizer

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
# Batches and waves


MANY = ["12+34=", "7+5=", "x", "99+1=", "a longer query, 123+456=", "7+5=", "0+0="]  # odd lengths, a repeat


@pytest.fixture()
def many(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("\n".join(MANY) + "\n")
    return str(path)


def test_batch_size_and_resume_do_not_change_the_file(policy, many, tmp_path):
    """--batch-size 1, 3 and 8 write the same bytes (float64: batch rounding is far below any draw's resolution),
    and a run stopped after 4 queries (the first 4 lines kept) and resumed at another batch size writes them too."""
    args = ["--model", policy, "--queries", many, "--reward", "task", "-k", "3", "--max-new-tokens", "5",
            "--device", "cpu", "--dtype", "float64", "--temperature", "1.3", "--top-p", "0.9", "--seed", "2"]  # fmt: skip
    files = {}
    for size in (1, 3, 8):
        files[size] = tmp_path / f"b{size}.jsonl"
        assert run_inprocess([*args, "--batch-size", str(size), "--out", str(files[size])])[0] == 0
    text = files[1].read_text()
    assert files[3].read_text() == text == files[8].read_text()
    rows = lines(files[1])
    assert [r["query"] for r in rows] == MANY and rows[1] != rows[5]  # same text, own position, own draws
    assert all(len(set(r["responses"])) > 1 for r in rows)  # really sampled
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(text.splitlines(keepends=True)[:4]))
    assert run_inprocess([*args, "--batch-size", "2", "--out", str(resumed)])[0] == 0
    assert resumed.read_text() == text


def test_batched_reward_gets_a_whole_wave(policy, many, tmp_path, monkeypatch):
    """A reward with the list signature is called once a wave of --batch-size queries, k responses each."""
    (tmp_path / "wave_reward.py").write_text(
        "CALLS = []\n\n"
        "def score(prompts: list, responses: list) -> list:\n"
        "    CALLS.append(len(prompts))\n"
        "    return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on it
    args = ["--model", policy, "--queries", many, "--out", "o.jsonl", "--reward", "wave_reward:score", "--batch-size", "3", *FAST]
    assert run_inprocess(args)[0] == 0
    import wave_reward

    assert wave_reward.CALLS == [9, 9, 3]  # 7 queries in waves of 3, k = 3
    for row in lines(tmp_path / "o.jsonl"):
        assert row["scores"] == [float(len(row["query"]) + len(r)) for r in row["responses"]]
    sys.modules.pop("wave_reward")


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the file and line


@pytest.mark.parametrize(
    "content, where, what",
    [
        ('{"query": "1+1="}\n{"query": 3}\n', ":2:", "query must be a string"),
        ('{"query": "1+1="}\n\n{"q": "x"}\n', ":3:", "missing key 'query'"),
        ('{"query": "1+1="\n', ":1:", "invalid JSON"),
        ('{"query": "1+1=", "responses": [1]}\n', ":1:", "list of strings"),
        ("", "queries.jsonl:", "empty"),
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
        (["--reward", "task", "--batch-size", "0"], "--batch-size"),
        (["--reward", "task", "--dtype", "float16"], "--dtype"),
        (["--reward", "task", "--chat-template", "absent.jinja"], "absent.jinja: no such file"),
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


def test_reward_that_raises_names_the_query(policy, queries, tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_reward.py").write_text(
        "def score(prompts: list, responses: list) -> list:\n"
        "    if '7+5=' in prompts:\n"
        "        raise KeyError('no answer')\n"
        "    return [0.0] * len(prompts)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on it
    rc, err = run_inprocess(["--model", policy, "--queries", queries, "--out", "o.jsonl", "--reward", "raising_reward:score", *FAST], capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert last == "rrhf_fast.sample: error: --reward raising_reward:score: raised KeyError: 'no answer' on query '7+5='"


def test_prompt_past_the_models_positions_exits_2(policy, tmp_path, capsys):
    """The tiny Llama has 1024 positions; a 1024-byte prompt (one token a byte) leaves none for the answer."""
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"query": "1+1="}) + "\n" + json.dumps({"query": "9" * 1024}) + "\n")
    rc, err = run_inprocess(["--model", policy, "--queries", str(path), "--out", str(tmp_path / "o.jsonl"), "--reward", "task"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"{path}:2: the prompt has 1024 tokens, the model has 1024 positions" in err
