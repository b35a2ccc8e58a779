"""`python -m rrhf_fast.evaluate`: scores against an independent full-sequence forward, accuracy, rewards, errors."""

import json
import sys

import pytest
import torch

from rrhf_fast import evaluate, task

RECORDS = [
    {"query": "12+30=", "responses": ["42", "43", "24", "7"], "scores": [1.0, 0.8, 0.2, 0.0]},
    {"query": "5+5=", "responses": ["10", "11"], "scores": [1.0, 1.0]},  # a tie: no pair
    {"query": "99+1=", "responses": ["100", "1", "0100"], "scores": [0.5, 0.9, 0.1]},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def test_scores_and_accuracy_match_an_independent_forward(tiny_llama, data_file, tmp_path, full_sequence_score):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = tmp_path / "scores.jsonl", tmp_path / "eval.json"
    assert evaluate.cli(["--model", tiny_llama, "--data", data_file, "--out", str(out), "--json", str(summary)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    correct = pairs = 0
    for record, line in zip(RECORDS, lines):
        want = [full_sequence_score(model, tokenizer, record["query"], r) for r in record["responses"]]
        assert line["model_scores"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        r = record["scores"]
        for i in range(len(r)):
            for j in range(len(r)):
                if r[i] < r[j]:
                    pairs += 1
                    correct += want[i] < want[j]
    result = json.loads(summary.read_text())
    assert (result["pairs"], result["queries"], result["candidates"]) == (pairs, 3, 9) == (9, 3, 9)
    assert result["rank_acc"] == pytest.approx(correct / pairs)
    assert "reward" not in result


def answer_bytes(query, response):
    return float(len(response.encode()) + 0.5 * response.count("1"))


def test_reward_function_and_task_reward(tiny_llama, data_file, tmp_path, monkeypatch, independent_greedy_answers):
    """The mean reward of the greedy answers equals one computed from transformers' own generate: a constant reward,
    one that depends on the answer's bytes (a random model's answers differ in length), and the task's."""
    (tmp_path / "evaluate_test_reward.py").write_text(
        "def constant(query, response):\n    return 0.25\n\n"
        "def answer_bytes(query, response):\n    return float(len(response.encode()) + 0.5 * response.count('1'))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts the current directory on it
    summary = tmp_path / "eval.json"
    args = ["--model", tiny_llama, "--data", data_file, "--max-new-tokens", "3", "--json", str(summary)]
    queries = [r["query"] for r in RECORDS]
    answers = independent_greedy_answers(tiny_llama, queries, 3)
    want = [sum(f(q, a) for q, a in zip(queries, answers)) / len(queries) for f in (answer_bytes, task.reward)]
    for spec, expected in (("evaluate_test_reward:constant", 0.25), ("evaluate_test_reward:answer_bytes", want[0]),
                           ("task", want[1])):  # fmt: skip
        assert evaluate.cli([*args, "--reward", spec]) == 0
        assert json.loads(summary.read_text())["reward"] == pytest.approx(expected, abs=1e-12), spec


@pytest.mark.parametrize("returned", ["'0.5'", "float('nan')", "True", "None"])
def test_reward_that_is_not_a_finite_number_exits_2(tiny_llama, data_file, tmp_path, monkeypatch, capsys, returned):
    (tmp_path / "evaluate_bad_reward.py").write_text(f"def bad(query, response):\n    return {returned}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts the current directory on it
    argv = ["--model", tiny_llama, "--data", data_file, "--max-new-tokens", "2", "--reward", "evaluate_bad_reward:bad"]
    assert evaluate.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rrhf_fast.evaluate: error: --reward evaluate_bad_reward:bad: returned ")
    assert "expected a finite float" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "/nonexistent/model"], "no such model directory"),
        (["--data", "/nonexistent/data.jsonl"], "no such file"),
        (["--reward", "nocolon"], "expected 'task' or 'module:function'"),
        (["--reward", "no_such_module_xyz:f"], "No module named"),
        (["--batch-size", "0"], "--batch-size"),
        (["--length-penalty", "nan"], "not a finite number"),
        (["--model-max-length", "2000"], "--model-max-length 2000 is past the 1024 positions"),
        (["--device", "foo"], "--device foo: not a torch device"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--out", "/"], "--out /: is a directory"),
        (["--data", "/"], "/: is a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_llama, data_file, capsys, change, message):
    args = {"--model": tiny_llama, "--data": data_file}
    for flag, value in zip(change[::2], change[1::2]):
        args[flag] = value
    assert evaluate.cli([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.evaluate: error:") and message in err[0]


def test_bad_data_line_names_file_and_line(tiny_llama, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"query": "1+1=", "responses": ["2"]}\n')
    assert evaluate.cli(["--model", tiny_llama, "--data", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


def test_softcapped_model_scores_with_its_own_logits(tmp_path, full_sequence_score):
    """A tiny Gemma-2 whose final logits are capped at 0.02 (0.02 tanh(z / 0.02), below its random logits): the
    fused head (z itself) scores it wrongly, so evaluate and metrics.ranking_accuracy must take the probe's plan
    (the model's own logits) and equal a plain forward over every candidate alone."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from rrhf_fast import data, metrics
    from rrhf_fast.default_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, final_logit_softcapping=0.02, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out, summary = tmp_path / "scores.jsonl", tmp_path / "eval.json"
    argv = ["--model", str(tmp_path / "gemma2"), "--data", str(path), "--out", str(out), "--json", str(summary), "--batch-size", "2",
            "--model-max-length", "64"]
    with pytest.warns(UserWarning, match="with the model.s own logits: .*final_logit_softcapping=0.02"):  # said, once
        assert evaluate.cli(argv) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma2").eval()
    want = [[full_sequence_score(model, tokenizer, r["query"], c) for c in r["responses"]] for r in RECORDS]
    got = [json.loads(line)["model_scores"] for line in out.read_text().splitlines()]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-5)
    model.config.final_logit_softcapping = None  # the logits the fused head computes: so the check above can fail
    uncapped = [full_sequence_score(model, tokenizer, r["query"], c) for r in RECORDS for c in r["responses"]]
    model.config.final_logit_softcapping = 0.02
    assert max(abs(a - b) for a, b in zip(uncapped, [s for w in want for s in w])) > 0.1
    pairs = [(w[i], w[j]) for r, w in zip(RECORDS, want) for i in range(len(w)) for j in range(len(w)) if r["scores"][i] < r["scores"][j]]
    expected = sum(a < b for a, b in pairs) / len(pairs)
    assert json.loads(summary.read_text())["rank_acc"] == pytest.approx(expected)
    tokenized, _ = data.tokenize(data.read_examples(str(path)), tokenizer, 64)
    with pytest.warns(UserWarning, match="own logits"):
        accuracy = metrics.ranking_accuracy(model, tokenized, batch_size=2, mode="auto", loss_options={})
    assert accuracy == pytest.approx(expected)
