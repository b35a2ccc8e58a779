"""End-to-end tests of `python -m rrhf_fast.train` on a tiny config, and of the ranking-accuracy metric.

The real CLI runs in a subprocess (exit status, stderr, files on disk); the many bad-input cases call the
same entry point in-process (`train.cli(argv)` returns the exit status) to keep the suite fast.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from rrhf_fast import train
from rrhf_fast.evaluate_model import pair_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--tiny-hidden-size", "32", "--tiny-layers", "1", "--task-train-size", "96", "--task-eval-size", "16",
    "--batch-size", "8", "--eval-batch-size", "16", "--log-every", "1",
]  # fmt: skip
RUN = TINY + ["--max-steps", "6", "--save-every", "2", "--device", "cpu"]  # resume is exact on CPU


def cli_command(args, cwd):
    """The CLI in a fresh interpreter, from `cwd`, on this checkout's sources; one thread (a tiny model)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return dict(args=[sys.executable, "-m", "rrhf_fast.train", *args], cwd=cwd, env=env)


def run_cli(args, cwd, check_rc=0):
    proc = subprocess.run(**cli_command(args, cwd), capture_output=True, text=True)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def load_weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb")} for r in rows]  # drop timings


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    cwd = tmp_path_factory.mktemp("full")
    run_cli([*RUN, "--output-dir", "out"], cwd)
    return str(cwd / "out")


# ----------------------------------------------------------------------------------------------------------
# The metric


def test_pair_accuracy_hand_made():
    """Two groups. Group 0: rewards [1, 3, 2], scores [-1.0, -0.5, -2.0]. Pairs with r_i < r_j:
    (0, 1): -1.0 < -0.5 right; (0, 2): -1.0 < -2.0 wrong; (2, 1): -2.0 < -0.5 right  -> 2 of 3.
    Group 1: rewards [5, 5, 0], scores [-3.0, -1.0, -1.0]. The tie 5 = 5 makes no pair; (2, 0): -1.0 < -3.0
    wrong; (2, 1): -1.0 < -1.0 is a score tie, counted wrong -> 0 of 2. In all: 2 of 5 = 0.4."""
    scores = torch.tensor([-1.0, -0.5, -2.0, -3.0, -1.0, -1.0])
    rewards = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 0.0])
    assert pair_accuracy(scores, rewards, torch.tensor([0, 3, 6])) == (2, 5)
    assert pair_accuracy(scores[:3], rewards[:3], [0, 3]) == (2, 3)
    assert pair_accuracy(torch.tensor([0.0]), torch.tensor([1.0]), [0, 1]) == (0, 0)  # one candidate, no pair


# ----------------------------------------------------------------------------------------------------------
# Outputs, resume


def test_outputs_exist_and_load_with_plain_transformers(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("final", "checkpoint-2", "checkpoint-4", "checkpoint-6"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(full_run, name))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(full_run, name))
        assert model.config.num_hidden_layers == 1 and tokenizer.eos_token == "</s>"
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "train_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(full_run, "checkpoint-4", name)), name
    assert json.load(open(os.path.join(full_run, "checkpoint-4", "trainer_state.json")))["step"] == 4
    assert not [n for n in os.listdir(full_run) if n.startswith(".tmp")]

    summary = json.load(open(os.path.join(full_run, "summary.json")))
    assert summary["steps"] == 6 and summary["wall_s"] > 0 and summary["tokens_per_s"] > 0
    for key in ("eval_before", "eval_after"):
        assert 0 <= summary[key]["rank_acc"] <= 1 and 0 <= summary[key]["reward"] <= 1
    config = json.load(open(os.path.join(full_run, "train_config.json")))
    assert config["max_steps"] == 6 and config["learning_rate"] == 3e-3 and config["prefix_mode"] == "packed"

    rows = [json.loads(line) for line in open(os.path.join(full_run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 6]
    needed = {"step", "loss", "rank_loss", "sft_loss", "rank_acc", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}
    assert all(needed <= set(r) for r in rows if r["type"] == "train")
    assert os.path.getsize(os.path.join(full_run, "curves.png")) > 1000


def test_resumed_run_equals_uninterrupted_run(full_run, tmp_path):
    """Stop after step 3 (checkpoint-2 is the newest), resume: the final weights and every logged number match."""
    proc = run_cli([*RUN, "--output-dir", "out", "--stop-after", "3"], tmp_path)
    out = str(tmp_path / "out")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not os.path.exists(os.path.join(out, "final"))
    # A crash while writing checkpoint-4 would leave only a temporary directory, and no trainer_state.json.
    os.makedirs(os.path.join(out, ".tmp-checkpoint-4-12345"))
    os.makedirs(os.path.join(out, "checkpoint-9"))  # incomplete: no trainer_state.json
    proc = run_cli([*RUN, "--output-dir", "out", "--resume"], tmp_path)
    assert "checkpoint-2" in proc.stderr
    full, resumed = load_weights(os.path.join(full_run, "final")), load_weights(os.path.join(out, "final"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert metrics(out) == metrics(full_run)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the process as soon as checkpoint-4 is complete (it may be mid-step or mid-way through writing
    checkpoint-6), resume, and the final weights equal an uninterrupted run's."""
    args = [*TINY, "--max-steps", "40", "--save-every", "2", "--eval-every", "0", "--device", "cpu"]
    run_cli([*args, "--output-dir", "full"], tmp_path)
    proc = subprocess.Popen(**cli_command([*args, "--output-dir", "killed"], tmp_path), stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert marker.exists() and not (tmp_path / "killed" / "final").exists(), "the run was not killed mid-way"
    run_cli([*args, "--output-dir", "killed", "--resume"], tmp_path)
    full, resumed = load_weights(tmp_path / "full" / "final"), load_weights(tmp_path / "killed" / "final")
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_existing_checkpoints_need_resume_or_overwrite(full_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    assert train.cli([*RUN, "--output-dir", str(out)]) == 2
    assert train.latest_checkpoint(str(out)).endswith("checkpoint-6")


# ----------------------------------------------------------------------------------------------------------
# Real use: a Hugging Face model directory and user data files


def test_model_directory_and_data_files(full_run, tmp_path):
    data = os.path.join(full_run, "data")
    proc = run_cli(
        [*TINY, "--model", os.path.join(full_run, "final"), "--data", os.path.join(data, "train.jsonl"),
         "--eval-data", os.path.join(data, "eval.jsonl"), "--max_steps", "2", "--output_dir", "out",
         "--model-max-length", "7", "--save-every", "0"],
        tmp_path,
    )  # fmt: skip
    assert "cut from the left" in proc.stderr  # "12+34=" (6) + "46</s>" (3) > 7
    config = json.load(open(tmp_path / "out" / "train_config.json"))
    assert config["learning_rate"] == 2e-5 and config["lr_scheduler"] == "cosine" and config["warmup_ratio"] == 0.03
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert set(summary["eval_after"]) == {"rank_acc"}  # no task reward for user data
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path / "out"))


def test_hugging_face_flag_spellings():
    a = train.resolve_config(["--max_steps", "7", "--learning_rate", "1e-4", "--per_device_train_batch_size", "3",
                              "--gradient_accumulation_steps", "2", "--warmup_ratio", "0.1", "--lr_scheduler_type", "linear",
                              "--weight_decay", "0.01", "--max_grad_norm", "0.5", "--save_steps", "5", "--output_dir", "x",
                              "--model_max_length", "64", "--rrhf_weight", "2", "--gradient_checkpointing"])  # fmt: skip
    b = train.resolve_config(["--max-steps", "7", "--learning-rate", "1e-4", "--batch-size", "3", "--grad-accum", "2",
                              "--warmup-ratio", "0.1", "--lr-scheduler", "linear", "--weight-decay", "0.01",
                              "--max-grad-norm", "0.5", "--save-every", "5", "--output-dir", "x", "--model-max-length", "64",
                              "--rank-weight", "2", "--gradient-checkpointing"])  # fmt: skip
    assert a == b and a.max_steps == 7 and a.grad_accum == 2 and a.rank_weight == 2.0


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        train.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    for action in train.build_parser()._actions:
        assert action.help, action.option_strings


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line naming the file, the line and the problem


BAD_DATA = [
    ("not json at all", "invalid JSON"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0]}', "2 responses but 1 scores"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0, NaN]}', "scores[1] is nan"),
    ('{"query": "a", "responses": [], "scores": []}', "empty responses list"),
    ('{"query": "a", "responses": ["b"]}', "missing key 'scores'"),
    ('{"query": "a", "responses": ["b", 3], "scores": [1, 2]}', "responses[1] must be a string"),
]


@pytest.mark.parametrize("line,message", BAD_DATA)
@pytest.mark.parametrize("which", ["--data", "--eval-data"])
def test_bad_data_file(tmp_path, capsys, line, message, which):
    good = tmp_path / "good.jsonl"
    good.write_text('{"query": "1+1=", "responses": ["2", "3"], "scores": [1, 0]}\n' * 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "1+1=", "responses": ["2"], "scores": [1]}\n\n' + line + "\n")
    files = {"--data": good, "--eval-data": good, which: bad}
    argv = [*TINY, "--data", str(files["--data"]), "--eval-data", str(files["--eval-data"]), "--output-dir", str(tmp_path / "o")]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[0].startswith(f"rrhf_fast.train: error: {bad}:3: ") and message in err[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl: no such file"),
        (["--eval-data", "/nonexistent/eval.jsonl"], "/nonexistent/eval.jsonl: no such file"),
        (["--model", "/nonexistent/model"], "/nonexistent/model: no such model directory"),
        (["--max-steps", "0"], "must be >= 1"),
        (["--max_steps", "three"], "'three' is not an integer"),
        (["--learning-rate", "nan"], "not a finite number"),
        (["--learning-rate", "-1"], "must be > 0"),
        (["--prefix-mode", "sideways"], "invalid choice"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--tiny-hidden-size", "30"], "multiple of 8"),
        (["--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
        (["--merge-lora"], "--merge-lora needs --lora-r"),
        (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout) must be in [0, 1)"),
        (["--lora-r", "4", "--lora-target-modules", " , "], "name no module"),
        (["--lora-r", "4", "--fsdp"], "--lora-r with --fsdp is not supported"),
        (["--task-train-size", "9900"], "at most 10000"),
    ],
)
def test_bad_paths_and_flags(tmp_path, capsys, argv, message):
    assert train.cli([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.train: error: ") and message in err[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prefix-mode", "kv-cache", "--gradient-checkpointing"], "--prefix-mode: mode=\"kv-cache\" cannot run under gradient checkpointing"),
        (["--loss-backend", "triton", "--device", "cpu"], "--loss-backend: backend='triton' needs"),
        (["--lora-r", "2", "--lora-target-modules", "q_proj,wq"], "wq"),
        (["--lora-r", "2", "--lora-target-modules", "lm_head"], "LM head"),
    ],
)
def test_flag_combinations_the_model_cannot_run(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the root conftest sets it on machines without CUDA
    assert train.cli([*TINY, *argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rrhf_fast.train: error: ") and message in err[-1]


def test_bf16_autocast_keeps_no_weight_cache():
    """--bf16 autocasts without the weight cache, which would hold a bf16 copy of every weight through the forward."""
    with train.bf16_autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
        layer = torch.nn.Linear(8, 8)
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with train.bf16_autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")


def test_other_options_run(tmp_path):
    """bf16 autocast, gradient checkpointing, accumulation, the other prefix modes, loss options and schedules."""
    for i, extra in enumerate((
        ["--bf16", "--gradient-checkpointing", "--grad-accum", "2"],
        ["--prefix-mode", "kv-cache", "--loss-backend", "reference", "--margin", "0.1", "--sft-reduction", "sum", "--length-penalty", "0.5"],
        ["--prefix-mode", "none", "--lr-scheduler", "linear", "--weight-decay", "0.1", "--max-grad-norm", "0", "--num-train-epochs", "0.5"],
    )):  # fmt: skip
        out = tmp_path / f"o{i}"
        assert train.cli([*TINY, "--max-steps", "2", "--save-every", "0", "--output-dir", str(out), *extra]) == 0, extra
        assert (out / "final" / "model.safetensors").is_file()


LORA = [*TINY, "--lora-r", "4", "--learning-rate", "1e-2", "--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--device", "cpu"]


def test_lora_checkpoints_hold_the_adapter_resume_exactly_and_merge(tmp_path):
    """--lora-r: checkpoints hold the adapter alone; a run stopped after step 3 and resumed ends with the
    uninterrupted run's adapter bit for bit; --merge-lora's final/ loads in plain transformers and differs from
    the base model in exactly the adapted projections."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rrhf_fast.default_model import build_model, build_tokenizer

    assert train.cli([*LORA, "--output-dir", str(tmp_path / "full"), "--merge-lora"]) == 0
    assert train.cli([*LORA, "--output-dir", str(tmp_path / "part"), "--stop-after", "3"]) == 0
    assert train.cli([*LORA, "--output-dir", str(tmp_path / "part"), "--resume"]) == 0
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    full = load_file(checkpoint / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "part" / "final" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(".lora_" in name for name in full)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    base = build_model(build_tokenizer(), seed=0, hidden_size=32, num_layers=1).state_dict()
    assert merged.keys() == base.keys()
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed == {name for name in base if name.endswith(tuple(f"{p}.weight" for p in projections))}


def test_broken_model_directories(full_run, tmp_path, capsys):
    import shutil

    (tmp_path / "empty_model").mkdir()
    assert train.cli(["--model", str(tmp_path / "empty_model"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    shutil.copytree(os.path.join(full_run, "final"), tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_text("not safetensors")
    assert train.cli(["--model", str(tmp_path / "broken"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rrhf_fast.train: error: {tmp_path / 'broken'}: cannot load the model or tokenizer: ")


def test_bad_input_exit_status_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "responses": ["a", "b"], "scores": [1, Infinity]}\n')
    for args, message in (
        (["--data", str(bad)], f"{bad}:1: scores[1] is inf"),
        (["--batch-size", "-2"], "must be >= 1"),
    ):
        proc = run_cli([*TINY, *args, "--output-dir", "o"], tmp_path, check_rc=2)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_exits_3_and_keeps_the_last_checkpoint(tmp_path):
    """A learning rate of 1e30 takes the weights to ~1e30 in one Adam step; step 2's forward overflows."""
    proc = run_cli([*TINY, "--max-steps", "6", "--save-every", "1", "--warmup-steps", "0", "--learning-rate", "1e30",
                    "--output-dir", "out"], tmp_path, check_rc=3)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in last and "at step 2" in last and "checkpoint-1" in last and "Traceback" not in proc.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-1", "data", "metrics.jsonl", "train_config.json"]
    assert json.load(open(out / "checkpoint-1" / "trainer_state.json"))["step"] == 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")


# ----------------------------------------------------------------------------------------------------------
# The default run learns


def test_shortened_default_run_raises_held_out_ranking_accuracy(tmp_path):
    """The embedded default model and task (full size), 60 steps instead of the default's."""
    run_cli(["--max-steps", "60", "--task-eval-size", "100", "--log-every", "20", "--output-dir", "out"], tmp_path)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    before, after = summary["eval_before"]["rank_acc"], summary["eval_after"]["rank_acc"]
    assert after >= before + 0.12, (before, after)  # measured: 0.507 -> 0.734
