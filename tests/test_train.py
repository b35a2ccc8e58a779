"""End-to-end tests of `python -m rrhf_fast.train` on a tiny config, and of the ranking-accuracy metric.

The real CLI runs in a subprocess (exit status, stderr, files on disk); the many bad-input cases call the
same entry point in-process (`train.cli(argv)` returns the exit status) to keep the suite fast.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rrhf_fast import checkpoint, config, train
from rrhf_fast.metrics import pair_accuracy

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


def interrupt_during_step(monkeypatch, step, signum=signal.SIGINT):
    """Make the in-process run receive `signum` while it computes optimizer step `step` (counted from 1)."""
    real = train.train_step

    def step_with_signal(setup, state, train_data):
        if state.step == step - 1:
            os.kill(os.getpid(), signum)
        return real(setup, state, train_data)

    monkeypatch.setattr(train, "train_step", step_with_signal)


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


def test_outputs_exist_and_load_with_plain_transformers(full_run, independent_rank_acc):
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
    correct, pairs = independent_rank_acc(os.path.join(full_run, "final"), os.path.join(full_run, "data", "eval.jsonl"))
    assert pairs > 80 and summary["eval_after"]["rank_acc"] == pytest.approx(correct / pairs)  # 16 queries, k = 4
    for key in ("eval_before", "eval_after"):
        assert 0 <= summary[key]["reward"] <= 1
    config = json.load(open(os.path.join(full_run, "train_config.json")))
    assert config["max_steps"] == 6 and config["learning_rate"] == 3e-3 and config["prefix_mode"] == "packed"

    rows = [json.loads(line) for line in open(os.path.join(full_run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 6]
    needed = {"step", "loss", "rank_loss", "sft_loss", "rank_acc", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}
    assert all(needed <= set(r) for r in rows if r["type"] == "train")
    assert os.path.getsize(os.path.join(full_run, "curves.png")) > 1000


def test_interrupted_run_resumes_to_the_uninterrupted_run(full_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 3: checkpoint-3 is written at the step boundary, exit 130; --resume from it ends with the
    uninterrupted run's weights and every logged number (a temporary directory and an incomplete checkpoint, left
    by a crash, are passed over)."""
    out = str(tmp_path / "out")
    interrupt_during_step(monkeypatch, 3)
    assert train.cli([*RUN, "--output-dir", out]) == 130
    assert "stopped by SIGINT after step 3" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    assert not os.path.exists(os.path.join(out, "final"))
    monkeypatch.undo()
    os.makedirs(os.path.join(out, ".tmp-checkpoint-4-12345"))  # a crash while writing checkpoint-4
    os.makedirs(os.path.join(out, "checkpoint-9"))  # incomplete: no trainer_state.json
    assert train.cli([*RUN, "--output-dir", out, "--resume"]) == 0
    assert "checkpoint-3" in capsys.readouterr().err
    full, resumed = load_weights(os.path.join(full_run, "final")), load_weights(os.path.join(out, "final"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert metrics(out) == metrics(full_run)


def test_resume_of_a_finished_run_changes_nothing(full_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    assert train.cli([*RUN, "--output-dir", str(out), "--resume"]) == 0
    assert "the run is finished" in capsys.readouterr().err
    assert before == {name: (out / name).read_bytes() for name in before}


def test_killed_and_terminated_runs_resume_to_the_same_weights(full_run, tmp_path):
    """SIGKILL the process as soon as checkpoint-2 is complete (it may be mid-step or mid-way through writing
    checkpoint-4), or send it SIGTERM then (it saves a checkpoint at the next step boundary, says where and exits
    143); resume each, and the final weights equal the uninterrupted run's."""
    full = load_weights(os.path.join(full_run, "final"))
    for name, signum in (("killed", signal.SIGKILL), ("terminated", signal.SIGTERM)):
        proc = subprocess.Popen(**cli_command([*RUN, "--output-dir", name], tmp_path), stderr=subprocess.PIPE, text=True)
        marker = tmp_path / name / "checkpoint-2" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signum)
        err = proc.communicate()[1]
        assert marker.exists() and not (tmp_path / name / "final").exists(), "the run was not stopped mid-way"
        if signum == signal.SIGTERM:
            step = checkpoint.latest(str(tmp_path / name)).rsplit("-", 1)[1]
            assert proc.returncode == 143 and f"stopped by SIGTERM after step {step}: {name}/checkpoint-{step} written" in err
            assert "Traceback" not in err
        assert train.cli([*RUN, "--output-dir", str(tmp_path / name), "--resume"]) == 0  # in-process: no start-up
        resumed = load_weights(tmp_path / name / "final")
        for key in full:
            assert torch.equal(full[key], resumed[key]), (name, key)


def test_existing_checkpoints_need_resume_or_overwrite(full_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    assert train.cli([*RUN, "--output-dir", str(out)]) == 2
    assert checkpoint.latest(str(out)).endswith("checkpoint-6")


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
    a = config.resolve(["--max_steps", "7", "--learning_rate", "1e-4", "--per_device_train_batch_size", "3",
                              "--gradient_accumulation_steps", "2", "--warmup_ratio", "0.1", "--lr_scheduler_type", "linear",
                              "--weight_decay", "0.01", "--max_grad_norm", "0.5", "--save_steps", "5", "--output_dir", "x",
                              "--model_max_length", "64", "--rrhf_weight", "2", "--gradient_checkpointing"])  # fmt: skip
    b = config.resolve(["--max-steps", "7", "--learning-rate", "1e-4", "--batch-size", "3", "--grad-accum", "2",
                              "--warmup-ratio", "0.1", "--lr-scheduler", "linear", "--weight-decay", "0.01",
                              "--max-grad-norm", "0.5", "--save-every", "5", "--output-dir", "x", "--model-max-length", "64",
                              "--rank-weight", "2", "--gradient-checkpointing"])  # fmt: skip
    assert a == b and a.max_steps == 7 and a.grad_accum == 2 and a.rank_weight == 2.0


def test_help_documents_every_flag_and_each_default_once(capsys):
    with pytest.raises(SystemExit) as info:
        config.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in config.build_parser()._actions:
        assert action.help and action.help.count("default") <= 1, action.option_strings
    assert "(default: 64 embedded, 1 with --model)" in text and "(default: 0.003 embedded, 2e-05 with --model)" in text


def test_presets_fill_only_what_was_not_given():
    embedded, paper = config.resolve([]), config.resolve(["--model", "m"])
    for name in config.EMBEDDED:
        assert getattr(embedded, name) == config.EMBEDDED[name] and getattr(paper, name) == config.PAPER[name], name
    assert embedded.max_steps == config.EMBEDDED_TASK_STEPS and paper.max_steps is None
    assert config.resolve(["--model", "m", "--batch-size", "5"]).batch_size == 5
    assert config.resolve(["--data", "d"]).max_steps is None  # from --num-train-epochs


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
        (["--lora-r", "4", "--fsdp", "--merge-lora"], "--merge-lora with --fsdp is not supported"),
        (["--task-train-size", "9900"], "at most 10000"),
        (["--data", "/"], "/: is a directory"),
        (["--device", "foo"], "--device foo: not a torch device"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--output-dir", "/proc/version/o"], "--output-dir /proc/version/o: cannot write there"),
    ],
)
def test_bad_paths_and_flags(tmp_path, capsys, argv, message):
    assert train.cli(["--output-dir", str(tmp_path / "o"), *argv]) == 2
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


def short_run(out, *extra):
    """An in-process 3-step run of the tiny config without checkpoints: (metrics.jsonl rows, final weights)."""
    assert train.cli([*TINY, "--max-steps", "3", "--save-every", "0", "--eval-every", "0", "--device", "cpu",
                      "--output-dir", str(out), *extra]) == 0  # fmt: skip
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    return rows, load_weights(out / "final")


def assert_runs_close(a, b, *, rtol, atol):
    """Every logged number (timings aside) and every final weight of two runs agree to the tolerance."""
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert [(r["type"], r["step"]) for r in rows_a] == [(r["type"], r["step"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "rank_loss", "sft_loss", "grad_norm", "lr", "rank_acc", "reward"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rtol, abs=atol), (ra["type"], ra["step"], key)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def plain_short_run(tmp_path_factory):
    return short_run(tmp_path_factory.mktemp("plain") / "o")


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-size", "4", "--grad-accum", "2"],  # the same 8 queries a step, in two micro-batches
        ["--loss-backend", "reference"],  # the default on CPU is the chunked torch path
        ["--prefix-mode", "kv-cache"],
        ["--prefix-mode", "none"],
        ["--gradient-checkpointing"],
    ],
    ids=["grad-accum", "reference-backend", "kv-cache", "none", "checkpointing"],
)
def test_equivalent_options_give_the_same_run(plain_short_run, tmp_path, extra):
    """Each of these computes the same loss and gradients as the plain run (8 queries a step, packed rows, the torch
    backend), up to fp32 rounding. Measured after 3 steps: weights within 6e-8, losses within 1e-7 relative; the
    tolerances (1e-6 absolute, 1e-5 relative) fail a run whose learning rate is 1% off (weights 2.3e-4 apart) or
    one that accumulates without halving the batch (7e-3)."""
    assert_runs_close(plain_short_run, short_run(tmp_path / "o", *extra), rtol=1e-5, atol=1e-6)


def test_bf16_is_close_to_fp32(plain_short_run, tmp_path):
    """--bf16 autocast: step 1's loss (the same weights in both runs) within 0.2% of fp32's and its gradient norm
    within 2% (bfloat16 keeps 8 bits of mantissa, 2^-8 = 0.4% a rounding, averaged over many products; measured on
    the tiny model: 2e-5 and 7e-4). Later steps drift further: Adam's first steps are about lr x sign(gradient),
    and the signs of tiny gradient entries differ."""
    rows, _ = short_run(tmp_path / "o", "--bf16")
    step1 = [r for r in rows if r["type"] == "train"][0], [r for r in plain_short_run[0] if r["type"] == "train"][0]
    assert step1[0]["loss"] == pytest.approx(step1[1]["loss"], rel=2e-3)
    assert step1[0]["grad_norm"] == pytest.approx(step1[1]["grad_norm"], rel=2e-2)


def test_other_options_run(tmp_path):
    """Loss options and schedules that change the numbers: they run and write a model."""
    for i, extra in enumerate((
        ["--margin", "0.1", "--sft-reduction", "sum", "--length-penalty", "0.5"],
        ["--lr-scheduler", "linear", "--weight-decay", "0.1", "--max-grad-norm", "0", "--num-train-epochs", "0.5"],
    )):  # fmt: skip
        out = tmp_path / f"o{i}"
        assert train.cli([*TINY, "--max-steps", "2", "--save-every", "0", "--output-dir", str(out), *extra]) == 0, extra
        assert (out / "final" / "model.safetensors").is_file()


LORA = [*TINY, "--lora-r", "4", "--learning-rate", "1e-2", "--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--device", "cpu"]


def test_lora_checkpoints_hold_the_adapter_resume_exactly_and_merge(tmp_path, monkeypatch):
    """--lora-r: checkpoints hold the adapter alone; a run interrupted in step 3 and resumed ends with the
    uninterrupted run's adapter bit for bit; --merge-lora's final/ loads in plain transformers and differs from
    the base model in exactly the adapted projections."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rrhf_fast.default_model import build_model, build_tokenizer

    assert train.cli([*LORA, "--output-dir", str(tmp_path / "full"), "--merge-lora"]) == 0
    interrupt_during_step(monkeypatch, 3, signal.SIGTERM)
    assert train.cli([*LORA, "--output-dir", str(tmp_path / "part")]) == 143
    monkeypatch.undo()
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


def test_a_finished_run_is_not_replaced_without_overwrite(full_run, tmp_path, capsys):
    """final/ and summary.json, no checkpoints (as --save-every 0 leaves them): a new run there needs
    --overwrite-output-dir; nothing is touched before it says so."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = sorted(os.listdir(out))
    assert train.cli([*RUN, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run" in err[0] and "--overwrite-output-dir" in err[0]
    assert sorted(os.listdir(out)) == before


def save_model_dir(directory, model, tokenizer):
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # within the model's vocabulary, so that it loads
        setattr(model.config, name, 1)
        setattr(model.generation_config, name, 1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_models_that_do_not_fit_the_flags_or_data(tiny_llama, tmp_path, capsys):
    """Exit 2 with one line, before training: --model-max-length past the model's positions; a tokenizer with more
    tokens than the model's embeddings; a tokenizer that encodes every response to the same unknown token (what a
    model directory without its tokenizer files can get)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rrhf_fast.default_model import build_model, build_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "1+1=", "responses": ["2", "3"], "scores": [1, 0]}\n' * 4)
    base = ["--data", str(data), "--max-steps", "1", "--save-every", "0", "--output-dir", str(tmp_path / "o")]
    small = build_model(build_tokenizer(), seed=0, hidden_size=16, num_layers=1)
    small.resize_token_embeddings(200)
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    unk_only = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    tiny = build_model(build_tokenizer(), seed=0, hidden_size=16, num_layers=1)
    tiny.resize_token_embeddings(2)
    no_tokenizer = tmp_path / "no_tokenizer"
    build_model(build_tokenizer(), seed=0, hidden_size=16, num_layers=1).save_pretrained(no_tokenizer)
    cases = [
        # transformers either refuses to build a tokenizer (cannot load) or builds a placeholder (cannot encode)
        (str(no_tokenizer), [], "no_tokenizer: cannot"),
        (tiny_llama, ["--model-max-length", "2000"], "--model-max-length 2000 is past the 1024 positions"),
        (save_model_dir(tmp_path / "small", small, build_tokenizer()), [], "258 tokens but the model's input embeddings have 200 rows"),
        (save_model_dir(tmp_path / "unk", tiny, unk_only), [], "cannot encode this data"),
    ]
    for model, extra, message in cases:
        assert train.cli(["--model", model, *base, *extra]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("rrhf_fast.train: error: ") and message in err[-1] and "Traceback" not in "".join(err)


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "o"
    argv = [*TINY, "--max-steps", "4", "--save-every", "1", "--save-total-limit", "2", "--eval-every", "0", "--output-dir", str(out)]
    assert train.cli(argv) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]


def test_metrics_and_summary_are_strict_json_when_a_number_is_nan(tmp_path):
    """Every reward tied: no pair anywhere, so rank_acc is NaN in every row; it is written as null."""
    data = tmp_path / "ties.jsonl"
    data.write_text('{"query": "1+1=", "responses": ["2", "3"], "scores": [1, 1]}\n' * 8)
    out = tmp_path / "o"
    argv = [*TINY, "--data", str(data), "--max-steps", "2", "--save-every", "0", "--output-dir", str(out)]
    assert train.cli(argv) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON file")

    rows = [json.loads(line, parse_constant=refuse) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    assert len(rows) == 4 and all(r["rank_acc"] is None for r in rows)  # eval, two steps, eval
    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["train_set_before"]["rank_acc"] is None and summary["train_set_after"]["rank_acc"] is None


def test_without_eval_data_the_figures_are_labelled_training_set(tmp_path, capsys):
    """--data without --eval-data measures the first training queries: summary.json, metrics.jsonl, the --report-to
    tags and the warning call them training-set figures, never eval ones; --help of --eval-data says so."""
    from rrhf_fast import report

    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "1+1=", "responses": ["2", "3"], "scores": [1, 0]}\n' * 8)
    out = tmp_path / "o"
    assert train.cli([*TINY, "--data", str(data), "--max-steps", "2", "--save-every", "0", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"train_set_before", "train_set_after"} <= set(summary) and not {k for k in summary if k.startswith("eval")}
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    assert [r["type"] for r in rows] == ["train_set", "train", "train", "train_set"]
    assert set(report.scalars(rows[0])) == {"train_set/rank_acc"}
    assert "not held out (summary.json train_set_before / train_set_after)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--help"])
    assert "reported as training-set figures (summary.json train_set_before" in " ".join(capsys.readouterr().out.split())


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


# ----------------------------------------------------------------------------------------------------------
# The exactness probe in the trainer

PROBE_DATA = [
    {"query": "12+7=", "responses": ["19", "18", "1"], "scores": [1.0, 0.5, 0.0]},
    {"query": "3+4=", "responses": ["6", "7"], "scores": [0.0, 1.0]},
]


def probe_run(model_dir, tmp_path, *extra):
    """A 2-step in-process run on PROBE_DATA (both groups in step 1): (exit status, metrics rows or None)."""
    from test_train_formats import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", PROBE_DATA)
    out = tmp_path / "o"
    status = train.cli(["--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "2", "--batch-size",
                        "2", "--save-every", "0", "--log-every", "1", "--device", "cpu", "--threads", "1", *extra])  # fmt: skip
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")] if status == 0 else None
    return status, rows


def test_a_head_the_fused_path_gets_wrong_trains_with_the_models_own_logits(tiny_llama, tmp_path, monkeypatch, capsys):
    """tiny_llama with a softcap (logits = 0.2 tanh(logits / 0.2)) patched into the forward, where no config field says
    so: the probe finds the fused head wrong, says once that the model's own logits are used, and step 1's loss is
    the RRHF loss of the capped logits (computed with each candidate's own forward)."""
    import functools

    from test_train_formats import independent_loss
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.forward

    @functools.wraps(plain)
    def capped(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        out.logits = 0.2 * torch.tanh(out.logits / 0.2)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", capped)
    meaning = [(r["query"], r["responses"], r["scores"]) for r in PROBE_DATA]
    status, rows = probe_run(tiny_llama, tmp_path)
    assert status == 0
    step1 = next(r["loss"] for r in rows if r["type"] == "train")
    assert step1 == pytest.approx(independent_loss(tiny_llama, meaning), rel=1e-5)
    monkeypatch.setattr(LlamaForCausalLM, "forward", plain)
    assert step1 != pytest.approx(independent_loss(tiny_llama, meaning), rel=1e-4)  # the cap matters here
    said = [line for line in capsys.readouterr().err.splitlines() if "the model's own logits" in line]
    assert len(said) == 1 and said[0].startswith("rrhf_fast.train: warning: --prefix-mode auto: ")
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    assert summary["head"] == "logits" and summary["probe_s"] > 0


@pytest.fixture(scope="module")
def tiny_lfm2(tmp_path_factory):
    """A tiny Lfm2 (a short-convolution layer, then attention) with the byte tokenizer, in Hugging Face format."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from rrhf_fast.default_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Lfm2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, layer_types=["conv", "full_attention"],
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    directory = tmp_path_factory.mktemp("lfm2")
    Lfm2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_explicit_packed_on_a_recurrent_model_exits_2_naming_the_mode_that_works(tiny_lfm2, tmp_path, capsys):
    status, _ = probe_run(tiny_lfm2, tmp_path, "--prefix-mode", "packed")
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('rrhf_fast.train: error: --prefix-mode: mode="packed" puts the candidates')
    assert 'mode="none" passes the exactness check' in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # before anything trained


def test_auto_on_a_recurrent_model_falls_back_and_says_so(tiny_lfm2, tmp_path, capsys):
    """auto on Lfm2 (CPU): packed is left out by structure, kv-cache fails (its conv cache cannot be repeated over
    candidates), none passes: said once, and step 1's loss is the model's own per-candidate loss."""
    from test_train_formats import independent_loss

    status, rows = probe_run(tiny_lfm2, tmp_path)
    assert status == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rrhf_fast.train: warning: --prefix-mode")]
    assert len(said) == 1 and "trains with mode none" in said[0] and 'mode="kv-cache" is not exact' in said[0]
    meaning = [(r["query"], r["responses"], r["scores"]) for r in PROBE_DATA]
    step1 = next(r["loss"] for r in rows if r["type"] == "train")
    assert step1 == pytest.approx(independent_loss(tiny_lfm2, meaning), rel=1e-5)
    assert json.load(open(tmp_path / "o" / "summary.json"))["prefix_mode"] == "none"


def count_probes(monkeypatch) -> list:
    from rrhf_fast import probe

    calls, real = [], probe.run_probe

    def counted(model, batch, mode="auto", **options):
        calls.append(mode)
        return real(model, batch, mode, **options)

    monkeypatch.setattr(probe, "run_probe", counted)
    return calls


@pytest.mark.parametrize("extra", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_the_probe_runs_once_a_run(tmp_path, monkeypatch, extra):
    """The plan made before wrapping is the one the wrapped forward and the evaluations use: one probe in a run of 3
    steps with held-out evaluations before, during and after (under --bf16 too: the probe runs in the same autocast,
    and the compute dtype is part of the plan's cache key)."""
    calls = count_probes(monkeypatch)
    argv = [*TINY, "--max-steps", "3", "--eval-every", "2", "--save-every", "0", "--device", "cpu", *extra]
    assert train.cli([*argv, "--output-dir", str(tmp_path / "o")]) == 0
    assert calls == ["packed"]


def test_the_probe_runs_once_under_ddp(tmp_path, monkeypatch):
    """The same under DDP (one gloo process, in this interpreter): the plan is cached on the model inside DDP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    calls = count_probes(monkeypatch)
    argv = [*TINY, "--max-steps", "2", "--eval-every", "0", "--save-every", "0", "--device", "cpu"]
    assert train.cli([*argv, "--output-dir", str(tmp_path / "o")]) == 0
    assert not torch.distributed.is_initialized()
    assert calls == ["packed"]
    assert json.load(open(tmp_path / "o" / "summary.json"))["processes"] == 1
