"""Two processes on CPU over gloo, under `python -m torch.distributed.run --standalone` (a free port each time).

DDP through the trainer's command (`-m rrhf_fast.train`, or tests/faults.py for a run with a patched fault) on the
tiny config of test_train.py: two processes with --batch-size 4 take the steps one process takes with
--batch-size 8. FSDP2 through rrhf_fast.distributed's functions directly (tests/fsdp_driver.py, a 2-layer Llama
trained for 4 steps on random groups): it equals DDP, in float32 and with bf16, with LoRA; its sharded
checkpoints resume exactly, and a write killed midway leaves the previous checkpoint usable.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rrhf_fast import config, loading, train
from test_train import REPO, TINY, load_weights, metrics

# 96 training queries: 12 micro-batches of 8 an epoch, whether 8 on one process or 4 on each of two.
PER_RANK = [*TINY, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--save-every", "2", "--device", "cpu"]
ONE_PROCESS = [*PER_RANK, "--batch-size", "8"]  # the same global batch; argparse takes the last --batch-size


TESTS = os.path.join(REPO, "tests")


def torchrun(args, cwd, nproc=2, check_rc=0, program=("-m", "rrhf_fast.train")):
    """`program args` under torchrun (by default the trainer's command), from `cwd`, on this checkout's sources;
    one thread a process (a tiny model)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *program, *args]
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
    cfg = config.resolve(ONE_PROCESS)
    initial = loading.embedded_model(
        seed=cfg.seed, hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers, max_positions=cfg.model_max_length
    )[0].state_dict()
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


def test_a_crashed_rank_ends_the_job_and_the_run_resumes_to_the_uninterrupted_result(two_processes, tmp_path):
    """Rank 1 raises in the forward of step 4 (tests/faults.py) while rank 0 waits for it in the gradient
    all-reduce: the job ends at once, long before the 600 s timeout, leaving checkpoint-2. Resumed from there, the run ends with the weights and the logged numbers of the
    uninterrupted one, exactly (the same arithmetic on the same data in the same order)."""
    out, _ = two_processes
    t0 = time.monotonic()
    proc = torchrun(["--crash-at", "1:4", "--", *PER_RANK, "--output-dir", "out", "--ddp-timeout", "600"], tmp_path, check_rc=None,
                    program=[os.path.join(TESTS, "faults.py")])  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    assert "patched failure on rank 1 at step 4" in proc.stderr and "step 4/4" not in proc.stderr
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (tmp_path / "out" / "final").exists()
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


def test_a_hung_rank_ends_the_job_when_the_collective_times_out(tmp_path):
    """Rank 1 sleeps in the forward of step 2; rank 0 waits for it in the gradient all-reduce until the 5 s
    timeout ends it."""
    t0 = time.monotonic()
    proc = torchrun(["--hang-at", "1:2", "--", *PER_RANK, "--output-dir", "out", "--ddp-timeout", "5"], tmp_path,
                    check_rc=None, program=[os.path.join(TESTS, "faults.py")])  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    assert "step 1/4" in proc.stderr and "step 2/4" not in proc.stderr
    assert "timed out" in proc.stderr.lower()
    assert not (tmp_path / "out" / "final").exists()


# ----------------------------------------------------------------------------------------------------------
# FSDP2 on CPU, two processes, through rrhf_fast.distributed (tests/fsdp_driver.py)


def drive(out, *flags, check_rc=0):
    """tests/fsdp_driver.py OUT flags under torchrun: (its result.json or None, the process)."""
    proc = torchrun([str(out), *flags], os.path.dirname(out), check_rc=check_rc, program=[os.path.join(TESTS, "fsdp_driver.py")])
    result = os.path.join(out, "result.json")
    return (json.load(open(result)) if os.path.exists(result) else None), proc


def assert_same_losses(result, expected, rel):
    """Every step's (loss, gradient norm) within `rel` relative of the expected run's."""
    assert len(result["losses"]) == len(expected["losses"]) == 4
    for got, want in zip(result["losses"], expected["losses"]):
        assert got == pytest.approx(want, rel=rel)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Driver runs by name, each made once a module on first use: (result, output dir). Names starting with
    "one" run in this process without torchrun: one process with the global batch, which DDP equals (tested
    above through the trainer), at no process start-up."""
    import fsdp_driver

    root, made = tmp_path_factory.mktemp("fsdp"), {}

    def run(name, *flags):
        if name not in made:
            if name.startswith("one"):
                fsdp_driver.main([str(root / name), *flags])
                made[name] = json.load(open(root / name / "result.json")), root / name
            else:
                made[name] = drive(root / name, *flags)[0], root / name
        return made[name]

    run.root = root
    return run


@pytest.fixture(scope="module")
def initial_model_dir(runs):
    """The driver's initial model saved as a Hugging Face directory, for the runs that load weights."""
    from rrhf_fast.default_model import build_model, build_tokenizer

    directory = runs.root / "initial"
    build_model(build_tokenizer(), seed=0, hidden_size=32, num_layers=2).save_pretrained(directory)
    return str(directory)


def test_fsdp_loading_on_rank_0_only_equals_ddp_and_saves_plain_transformers_weights(runs, initial_model_dir):
    """Rank 0 reads the weights, rank 1 builds the model on the meta device and receives its shards (and the
    rotary buffers) from rank 0. Every loss and gradient norm then equals one process's with the global batch
    (as DDP's) to 1e-6 relative (float32; the reductions add the same numbers in another order), and so do the
    final weights as one vector. Each rank holds
    half of every parameter and of its Adam moments; evaluation through the Hugging Face model
    (run_on_full_model), before the first training forward and after the last step, gives one process's mean
    logit to 1e-6; final/ loads in plain transformers with exactly the gathered weights."""
    from transformers import AutoModelForCausalLM

    ddp, ddp_out = runs("one", "--from-dir", initial_model_dir)
    fsdp, fsdp_out = runs("fsdp", "--fsdp", "--from-dir", initial_model_dir, "--save-every", "2")
    assert_same_losses(fsdp, ddp, rel=1e-6)
    final, expected = load_weights(fsdp_out / "final"), load_weights(ddp_out / "final")
    assert relative_difference(final, expected) < 1e-6
    initial = load_weights(initial_model_dir)
    assert relative_difference(final, initial) > 1e-2  # the runs did train
    seen = fsdp["observed"]
    assert seen["param_is_shard"] and 2 * seen["local_numel"] == seen["numel"] and seen["param_dtype"] == "torch.float32"
    for key in ("mean_logit_before", "mean_logit_after"):
        assert seen[key] == pytest.approx(ddp["observed"][key], rel=1e-6), key
    assert seen["mean_logit_before"] != pytest.approx(seen["mean_logit_after"], rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(fsdp_out / "final")
    assert model.state_dict().keys() >= final.keys()
    for key, value in final.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_rank_killed_mid_checkpoint_ends_the_fsdp_job_and_leaves_the_previous_checkpoint(runs, initial_model_dir, tmp_path):
    """Rank 1's process dies while it writes its shard of checkpoint-4, and rank 0 waits for it in DCP's
    collectives: the job ends at once, long before the 600 s timeout. checkpoint-4 never appears (only its
    temporary directory, without DCP's index), checkpoint-2 is whole. Resumed from it, the run ends with the
    uninterrupted run's losses and final weights exactly. DCP reshards on load: one process resumed from the same
    two-rank checkpoint ends with the same losses to 1e-6 (the driver deals the same groups at any world size)."""
    fsdp, fsdp_out = runs("fsdp", "--fsdp", "--from-dir", initial_model_dir, "--save-every", "2")
    out, t0 = tmp_path / "out", time.monotonic()
    result, proc = drive(out, "--fsdp", "--from-dir", initial_model_dir, "--save-every", "2", "--kill-in-save", "1:4",
                         "--timeout", "600", check_rc=None)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and result is None and elapsed < 90, (proc.returncode, elapsed, proc.stderr[-3000:])
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == [".tmp-checkpoint-4", "checkpoint-2"], proc.stderr[-3000:]
    assert not os.path.exists(out / ".tmp-checkpoint-4" / "sharded" / ".metadata")
    assert sorted(os.listdir(out / "checkpoint-2" / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(out / "checkpoint-2", tmp_path / "one" / "checkpoint-2")
    result, _ = drive(out, "--fsdp", "--from-dir", initial_model_dir, "--save-every", "2", "--resume")
    assert result["losses"] == fsdp["losses"]
    final, expected = load_weights(out / "final"), load_weights(fsdp_out / "final")
    for name in expected:
        assert torch.equal(final[name], expected[name]), name

    import fsdp_driver

    fsdp_driver.main([str(tmp_path / "one"), "--from-dir", initial_model_dir, "--resume"])
    assert_same_losses(json.load(open(tmp_path / "one" / "result.json")), fsdp, rel=1e-6)


def test_fsdp_bf16_computes_in_bf16_over_fp32_shards_like_ddp_autocast(runs):
    """--fsdp --bf16 (with CPU offload): the sharded parameters and Adam's moments stay float32, a decoder
    layer's linear sees bf16 weights and inputs. Against bf16 autocast (one process with the global batch, as
    DDP), which rounds differently
    (autocast keeps the norms and the residual additions in float32), the losses agree to 2e-3 relative and
    the gradient norms to 0.3: bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 an operation), the
    loss is a mean, so its rounding stays near that; a gradient norm sums the squares of every rounded gradient
    and, after three updates at lr 1e-2, of weights that moved apart (measured: 3.0e-4 and 0.15 at most)."""
    ddp, _ = runs("one-bf16", "--bf16")
    fsdp, _ = runs("fsdp-bf16", "--fsdp", "--bf16", "--cpu-offload")
    seen = fsdp["observed"]
    assert seen["compute_weight"] == seen["compute_input"] == "torch.bfloat16"
    assert seen["param_dtype"] == seen["optimizer_dtype"] == "torch.float32" and seen["param_is_shard"]
    for (loss, norm), (want_loss, want_norm) in zip(fsdp["losses"], ddp["losses"]):
        assert loss == pytest.approx(want_loss, rel=2e-3) and norm == pytest.approx(want_norm, rel=0.3)


def test_lora_under_fsdp_equals_lora_in_one_process(runs):
    """LoRA r=2 on every linear layer: the frozen base weights and the adapters share each decoder layer's
    FSDP2 unit (mixed requires_grad). Losses and gradient norms agree with one process's (as DDP's, with the
    global batch) to 1e-6 relative, the final adapter
    to 1e-5 as one vector (measured 1.4e-6: Adam at lr 1e-2 divides by the root of the squared gradient, which
    turns the reductions' rounding into larger steps on 2-wide adapters); final/ holds the adapter alone
    (gathered with trained_only=True)."""
    from safetensors.torch import load_file

    ddp, ddp_out = runs("one-lora", "--lora")
    fsdp, fsdp_out = runs("fsdp-lora", "--fsdp", "--lora")
    assert_same_losses(fsdp, ddp, rel=1e-6)
    assert fsdp["observed"]["numel"] == 2 * fsdp["observed"]["local_numel"]
    adapter, expected = (load_file(out / "final" / "adapter_model.safetensors") for out in (fsdp_out, ddp_out))
    assert adapter.keys() == expected.keys() and all(".lora_" in key for key in adapter)
    assert relative_difference(adapter, expected) < 1e-5


def test_wrap_refuses_what_it_cannot_do():
    """CPU offload without FSDP2, and FSDP2 without torchrun."""
    from rrhf_fast import distributed
    from rrhf_fast.default_model import build_model, build_tokenizer

    model = build_model(build_tokenizer(), seed=0, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="--cpu-offload .* pass --fsdp too"):
        distributed.wrap(model, distributed.World(), mode="packed", loss_options={}, cpu_offload=True)
    with pytest.raises(ValueError, match="--fsdp .* launch with torchrun"):
        distributed.init("cpu", fsdp=True, timeout_s=60)
