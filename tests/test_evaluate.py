"""`python -m rrhf_fast.evaluate`: scores against an independent full-sequence forward, accuracy, rewards, errors."""

import json

import pytest
import torch

from rrhf_fast import evaluate
from rrhf_fast.default_model import build_model, build_tokenizer

RECORDS = [
    {"query": "12+30=", "responses": ["42", "43", "24", "7"], "scores": [1.0, 0.8, 0.2, 0.0]},
    {"query": "5+5=", "responses": ["10", "11"], "scores": [1.0, 1.0]},  # a tie: no pair
    {"query": "99+1=", "responses": ["100", "1", "0100"], "scores": [0.5, 0.9, 0.1]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=3, hidden_size=32, num_layers=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def full_sequence_score(model, tokenizer, query, response):
    """Mean log-probability of response + EOS after the query, from one plain forward over the whole text."""
    prompt = tokenizer(query)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    picked = logp[len(prompt) - 1 :].gather(1, torch.tensor(answer)[:, None])
    return picked.mean().item()


def test_scores_and_accuracy_match_an_independent_forward(model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = tmp_path / "scores.jsonl", tmp_path / "eval.json"
    assert evaluate.cli(["--model", model_dir, "--data", data_file, "--out", str(out), "--json", str(summary)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
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


def test_reward_function_and_task_reward(model_dir, data_file, tmp_path, monkeypatch):
    (tmp_path / "evaluate_test_reward.py").write_text("def constant(query, response):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "eval.json"
    args = ["--model", model_dir, "--data", data_file, "--max-new-tokens", "3", "--json", str(summary)]
    assert evaluate.cli([*args, "--reward", "evaluate_test_reward:constant"]) == 0
    assert json.loads(summary.read_text())["reward"] == 0.25
    assert evaluate.cli([*args, "--reward", "task"]) == 0
    assert 0.0 <= json.loads(summary.read_text())["reward"] <= 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "/nonexistent/model"], "no such model directory"),
        (["--data", "/nonexistent/data.jsonl"], "no such file"),
        (["--reward", "nocolon"], "expected 'task' or 'module:function'"),
        (["--reward", "no_such_module_xyz:f"], "No module named"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dir, data_file, capsys, change, message):
    args = {"--model": model_dir, "--data": data_file}
    for flag, value in zip(change[::2], change[1::2]):
        args[flag] = value
    assert evaluate.cli([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.evaluate: error:") and message in err[0]


def test_bad_data_line_names_file_and_line(model_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"query": "1+1=", "responses": ["2"]}\n')
    assert evaluate.cli(["--model", model_dir, "--data", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err
