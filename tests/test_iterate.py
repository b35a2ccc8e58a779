"""Iterated RRHF end to end, as docs/sampling.md runs it: train, sample from the result, train on the samples,
evaluate. On a tiny config, so this checks the commands fit together, not how much the reward rises."""

import json
import os
import subprocess
import sys

import pytest

from rrhf_fast import task
from rrhf_fast.data import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny-hidden-size", "32", "--tiny-layers", "1", "--task-train-size", "48", "--task-eval-size", "8"]
SHORT = ["--max-steps", "3", "--batch-size", "8", "--eval-batch-size", "8", "--device", "cpu"]


def run(module, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_iterations_of_sample_then_train(tmp_path, independent_rank_acc, independent_greedy_answers):
    run("rrhf_fast.train", *TINY, *SHORT, "--output-dir", "iter1", cwd=tmp_path)
    data = tmp_path / "iter1" / "data"
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:6]))

    samples = tmp_path / "iter2.jsonl"
    run(
        "rrhf_fast.sample", "--model", "iter1/final", "--queries", str(queries), "--out", str(samples),
        "-k", "2", "--keep-existing", "--reward", "task", "--max-new-tokens", "4", "--device", "cpu",
        cwd=tmp_path,
    )  # fmt: skip
    examples = read_jsonl(str(samples))
    assert len(examples) == 6 and all(len(ex.responses) == 4 + 2 for ex in examples)  # 4 kept + 2 sampled

    run(
        "rrhf_fast.train", "--model", "iter1/final", "--data", str(samples), "--eval-data", str(data / "eval.jsonl"),
        "--output-dir", "iter2", "--learning-rate", "1e-3", *SHORT, cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((tmp_path / "iter2" / "summary.json").read_text())
    correct, pairs = independent_rank_acc(str(tmp_path / "iter2" / "final"), str(data / "eval.jsonl"))
    assert summary["steps"] == 3 and summary["eval_after"]["rank_acc"] == pytest.approx(correct / pairs)

    out = run(
        "rrhf_fast.evaluate", "--model", "iter2/final", "--data", str(data / "eval.jsonl"), "--reward", "task",
        "--max-new-tokens", "4", "--json", "eval.json", cwd=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["queries"] == 8 and result["rank_acc"] == pytest.approx(correct / pairs) and "ranking accuracy" in out.stdout
    queries = [ex.query for ex in read_jsonl(str(data / "eval.jsonl"))]
    answers = independent_greedy_answers(str(tmp_path / "iter2" / "final"), queries, 4)
    assert result["reward"] == pytest.approx(sum(task.reward(q, a) for q, a in zip(queries, answers)) / len(queries))
