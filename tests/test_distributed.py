"""`torchrun ... -m rrhf_fast.train` end to end: two processes on CPU (DDP over gloo), and FSDP2 on CUDA.

Every run is the real CLI under `python -m torch.distributed.run --standalone` (a free port each time) on the tiny
config of test_train.py. Two processes with --batch-size 4 take the steps one process takes with --batch-size 8.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rrhf_fast import train
from rrhf_fast.distributed import TEST_FAULT_ENV
from test_train import REPO, TINY, load_weights, metrics

# 96 training queries: 12 micro-batches of 8 an epoch, whether 8 on one process or 4 on each of two.
PER_RANK = [*TINY, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--save-every", "2", "--device", "cpu"]
ONE_PROCESS = [*PER_RANK, "--batch-size", "8"]  # the same global batch; argparse takes the last --batch-size


def torchrun(args, cwd, nproc=2, env=None, check_rc=0):
    """The CLI under torchrun, from `cwd`, on this checkout's sources; one thread a process (a tiny model)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "rrhf_fast.train", *args]  # fmt: skip
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-4000:]
    return proc


def relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |b| over all the tensors of two state dicts, as one vector."""
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[k].double().flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def assert_same_training(rows, expected, rel):
    """The logged steps of two runs agree: every number to `rel`, the rest exactly. rank_loss and sft_loss are
    parts of the loss, held to `rel` of the whole loss: the hinge is a difference of nearly equal scores, whose
    own relative rounding can be far larger."""
    assert [(r["type"], r["step"]) for r in rows] == [(r["type"], r["step"]) for r in expected]
    for row, want in zip(rows, expected):
        for key, value in want.items():
            if isinstance(value, float):
                part_of_loss = rel * want["loss"] if key in ("rank_loss", "sft_loss") else 0
                assert row[key] == pytest.approx(value, rel=rel, abs=part_of_loss), (row["step"], key)
            else:
                assert row[key] == value, (row["step"], key)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted 4-step run of two processes, checkpoints at steps 2 and 4: (output dir, stderr)."""
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun([*PER_RANK, "--output-dir", "out"], cwd)
    return str(cwd / "out"), proc.stderr


# ----------------------------------------------------------------------------------------------------------
# DDP on CPU, two processes


def test_two_processes_equal_one_process_with_the_global_batch(two_processes, tmp_path):
    """Each rank takes its own half of every micro-batch; DDP averages the two halves' gradients, which is the
    gradient of the mean over all 8 groups. Every logged loss and gradient norm agrees to 1e-6 relative, and so
    do the final weights, as one vector. (Not weight by weight: Adam divides by the root of the squared
    gradient, so a weight whose gradients nearly cancel turns a rounding difference into a visible one.)"""
    out, stderr = two_processes
    assert train.cli([*ONE_PROCESS, "--output-dir", str(tmp_path / "one")]) == 0
    assert_same_training(metrics(out), metrics(tmp_path / "one"), rel=1e-6)
    final, expected = load_weights(os.path.join(out, "final")), load_weights(tmp_path / "one" / "final")
    assert relative_difference(final, expected) < 1e-6
    initial = train.load_model_and_tokenizer(train.resolve_config(ONE_PROCESS), None)[0].state_dict()
    assert relative_difference(final, {k: initial[k] for k in final}) > 1e-3  # the runs did train

    # rank 0 alone logs and writes; the checkpoint records the job's shape and every rank's RNG states
    assert stderr.count("before training:") == 1 and stderr.count("step 4/4") == 1
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))
    assert state["world_size"] == 2 and state["fsdp"] is False and state["data_position"] == 8
    assert {"rng.pt", "rng-rank1.pt"} <= set(os.listdir(os.path.join(out, "checkpoint-4")))
    assert json.load(open(os.path.join(out, "summary.json")))["processes"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))


def test_lora_under_ddp_equals_one_process(tmp_path):
    """--lora-r under torchrun: DDP averages the adapters' gradients (the only ones there are), so two processes
    train the adapter one process trains with the global batch. Dropout off: each rank draws its own masks."""
    from safetensors.torch import load_file

    lora = ["--lora-r", "2", "--lora-dropout", "0", "--learning-rate", "1e-2", "--save-every", "0", "--eval-every", "0"]
    torchrun([*PER_RANK, *lora, "--output-dir", "two"], tmp_path)
    assert train.cli([*ONE_PROCESS, *lora, "--output-dir", str(tmp_path / "one")]) == 0
    assert_same_training(metrics(tmp_path / "two"), metrics(tmp_path / "one"), rel=1e-6)
    two, one = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in ("two", "one"))
    assert relative_difference(two, one) < 1e-6
    assert any(t.abs().max() > 0 for name, t in one.items() if "lora_B" in name)  # the adapter did train


def test_resume_under_two_processes_equals_the_uninterrupted_run(two_processes, tmp_path):
    out, _ = two_processes
    torchrun([*PER_RANK, "--output-dir", "out", "--stop-after", "3"], tmp_path)
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")) == ["checkpoint-2"]
    proc = torchrun([*PER_RANK, "--output-dir", "out", "--resume"], tmp_path)
    assert proc.stderr.count("resuming from") == 1
    final, expected = load_weights(tmp_path / "out" / "final"), load_weights(os.path.join(out, "final"))
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert metrics(tmp_path / "out") == metrics(out)


def test_resume_with_another_number_of_processes_says_what_is_wrong(two_processes, tmp_path, capsys):
    out, _ = two_processes
    shutil.copytree(out, tmp_path / "out")
    assert train.cli([*ONE_PROCESS, "--output-dir", str(tmp_path / "out"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint-4 was written by 2 processes and this run has 1" in err[-1] and "--model" in err[-1]


def test_too_few_queries_for_every_rank_is_bad_input(tmp_path):
    proc = torchrun([*PER_RANK, "--task-train-size", "7", "--output-dir", "out"], tmp_path, check_rc=None)
    assert proc.returncode != 0
    assert "7 training queries do not fill one micro-batch of --batch-size 4 on each of 2 processes" in proc.stderr


@pytest.mark.parametrize("fault,timeout", [("crash", "600"), ("hang", "5")])
def test_a_failing_rank_ends_the_job(tmp_path, fault, timeout):
    """Rank 1 raises (or hangs) at step 2 while rank 0 waits for it in the gradient all-reduce. A crash ends
    the job at once, long before the 600 s timeout; a hang ends it when rank 0's collective times out."""
    t0 = time.monotonic()
    proc = torchrun([*PER_RANK, "--output-dir", "out", "--ddp-timeout", timeout], tmp_path,
                    env={TEST_FAULT_ENV: f"1:2:{fault}"}, check_rc=None)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 90, (proc.returncode, elapsed)
    assert "step 1/4" in proc.stderr and "step 2/4" not in proc.stderr
    if fault == "crash":
        assert "injected failure on rank 1 at step 2" in proc.stderr
    else:
        assert "timed out" in proc.stderr.lower()
    assert not (tmp_path / "out" / "final").exists()


# ----------------------------------------------------------------------------------------------------------
# FSDP2 on CUDA


ON_GPU = [*TINY, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--save-every", "2"]


@pytest.fixture(scope="module")
def one_gpu_runs(tmp_path_factory):
    """One process on one GPU for 4 steps, with DDP (the plain path) and with --fsdp: their output dirs."""
    cwd = tmp_path_factory.mktemp("gpu")
    torchrun([*ON_GPU, "--output-dir", "ddp"], cwd, nproc=1)
    torchrun([*ON_GPU, "--output-dir", "fsdp", "--fsdp"], cwd, nproc=1)
    return str(cwd / "ddp"), str(cwd / "fsdp")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_gives_the_loss_and_weights_of_ddp(one_gpu_runs):
    ddp, fsdp = one_gpu_runs
    assert_same_training(metrics(fsdp), metrics(ddp), rel=1e-5)
    assert relative_difference(load_weights(os.path.join(fsdp, "final")), load_weights(os.path.join(ddp, "final"))) < 1e-5
    assert json.load(open(os.path.join(fsdp, "checkpoint-4", "trainer_state.json")))["fsdp"] is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_checkpoints_load_in_plain_transformers(one_gpu_runs):
    from transformers import AutoModelForCausalLM

    ddp, fsdp = one_gpu_runs
    for name in ("checkpoint-2", "final"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(fsdp, name))
        saved = load_weights(os.path.join(fsdp, name))
        assert saved.keys() == load_weights(os.path.join(ddp, name)).keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_resume_equals_the_uninterrupted_run(one_gpu_runs, tmp_path):
    _, fsdp = one_gpu_runs
    torchrun([*ON_GPU, "--output-dir", "out", "--fsdp", "--stop-after", "3"], tmp_path, nproc=1)
    torchrun([*ON_GPU, "--output-dir", "out", "--fsdp", "--resume"], tmp_path, nproc=1)
    assert_same_training(metrics(tmp_path / "out"), metrics(fsdp), rel=1e-6)
    assert relative_difference(load_weights(tmp_path / "out" / "final"), load_weights(os.path.join(fsdp, "final"))) < 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_with_activation_checkpointing_and_bf16_runs(tmp_path):
    torchrun([*ON_GPU, "--output-dir", "out", "--fsdp", "--gradient-checkpointing", "--bf16", "--max-steps", "2"], tmp_path, nproc=1)
    rows = [r for r in metrics(tmp_path / "out") if r["type"] == "train"]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_on_two_gpus_equals_one_gpu_with_the_global_batch(one_gpu_runs, tmp_path):
    ddp, _ = one_gpu_runs
    torchrun([*ON_GPU, "--batch-size", "2", "--output-dir", "out", "--fsdp"], tmp_path, nproc=2)
    assert_same_training(metrics(tmp_path / "out"), metrics(ddp), rel=1e-5)
    assert relative_difference(load_weights(tmp_path / "out" / "final"), load_weights(os.path.join(ddp, "final"))) < 1e-5
