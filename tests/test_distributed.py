"""Two processes on CPU over gloo, under `python -m torch.distributed.run --standalone` (a free port each time).

Everything through the trainer's command (`-m rrhf_fast.train`, or tests/faults.py for a run with a patched fault
or a recorded observation) on the tiny config of test_train.py: two processes with --batch-size 4 take the steps
one process takes with --batch-size 8. DDP equals that one process; --fsdp equals DDP, with bf16 it computes
like DDP's autocast, with LoRA it trains the adapter DDP trains; its sharded checkpoints resume exactly, and a
write killed midway leaves the previous checkpoint usable. Eight torchrun launches in all: each costs two
interpreters' start (torch and transformers imported twice), so a launch serves several assertions.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rrhf_fast import checkpoint, config, distributed, loading, train
from rrhf_fast.cli import InputError
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


def test_a_hung_rank_ends_the_job_when_the_collective_times_out_and_the_run_resumes_exactly(two_processes, tmp_path):
    """Rank 1 sleeps in the forward of step 3 (tests/faults.py) while rank 0 waits for it in the gradient
    all-reduce: the 5 s timeout ends the job, leaving checkpoint-2. Resumed from there (optimizer.pt, every rank's
    RNG state), the run ends with the weights and the logged numbers of the uninterrupted one, exactly (the same
    arithmetic on the same data in the same order)."""
    out, _ = two_processes
    t0 = time.monotonic()
    proc = torchrun(["--hang-at", "1:3", "--", *PER_RANK, "--output-dir", "out", "--ddp-timeout", "5"], tmp_path,
                    check_rc=None, program=[os.path.join(TESTS, "faults.py")])  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    assert "step 2/4" in proc.stderr and "step 3/4" not in proc.stderr
    assert "timed out" in proc.stderr.lower()
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (tmp_path / "out" / "final").exists()
    proc = torchrun([*PER_RANK, "--output-dir", "out", "--resume"], tmp_path)
    assert proc.stderr.count("resuming from") == 1
    final, expected = load_weights(tmp_path / "out" / "final"), load_weights(os.path.join(out, "final"))
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert metrics(tmp_path / "out") == metrics(out)


def test_resume_with_another_number_of_processes_says_what_is_wrong(two_processes, tmp_path, capsys):
    """DDP's checkpoint-N is a Hugging Face directory, which --model reads; an --fsdp one is sharded state, so the
    hint points at final/ instead."""
    out, _ = two_processes
    shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("final", "summary.json"))  # unfinished
    assert train.cli([*ONE_PROCESS, "--output-dir", str(tmp_path / "out"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint-4 was written by 2 processes and this run has 1" in err[-1] and "--model" in err[-1]
    state = json.load(open(tmp_path / "out" / "checkpoint-4" / "trainer_state.json"))
    json.dump({**state, "fsdp": True}, open(tmp_path / "out" / "checkpoint-4" / "trainer_state.json", "w"))
    with pytest.raises(ValueError, match="sharded state, not a model directory.* final/ of a finished run"):
        checkpoint.check_resumable(str(tmp_path / "out" / "checkpoint-4"), distributed.World(size=4, fsdp=True))


def test_too_few_queries_for_every_rank_is_bad_input():
    cfg = config.resolve([*PER_RANK, "--task-train-size", "7"])
    with pytest.raises(InputError, match="7 training queries do not fill one micro-batch of --batch-size 4 on each of 2 processes"):
        train.micro_batches_per_epoch(7, cfg, distributed.World(size=2))


# ----------------------------------------------------------------------------------------------------------
# FSDP2 on CPU, two processes, through the trainer's command


def load_shards(directory) -> dict:
    """Every tensor of a Hugging Face directory's safetensors files (one, or several with an index)."""
    from safetensors.torch import load_file

    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    return {key: value for name in names for key, value in load_file(os.path.join(directory, name)).items()}


def dcp_keys(checkpoint_dir) -> set[str]:
    """The tensors a sharded checkpoint holds, from DCP's index."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(os.path.join(checkpoint_dir, "sharded")).read_metadata()
    return set(metadata.state_dict_metadata)


FSDP = [*PER_RANK, "--fsdp", "--max-shard-size", "40KB"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted 4-step --fsdp run of two processes, checkpoints at steps 2 and 4: its output dir."""
    cwd = tmp_path_factory.mktemp("fsdp")
    torchrun([*FSDP, "--output-dir", "out"], cwd)
    return cwd / "out"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Runs of one process with the global batch (which DDP equals, tested above), in this process: the
    references of the --fsdp runs, each made once on first use."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def run(name, *flags):
        if name not in made:
            assert train.cli([*ONE_PROCESS, *flags, "--output-dir", str(root / name)]) == 0
            made[name] = root / name
        return made[name]

    return run


def test_fsdp_equals_ddp_and_writes_sharded_checkpoints_and_plain_transformers_weights(fsdp_run, two_processes):
    """Rank 0 reads the weights (here: builds the embedded model), every rank holds half of each parameter and of
    its Adam moments, evaluation runs through the Hugging Face model on every rank. Every logged number equals
    DDP's to 1e-6 relative (float32; the reductions add the same numbers in another order), the final weights
    too as one vector. checkpoint-N/ holds DCP's shards, one file a rank, and no Hugging Face weights; final/ is
    in several safetensors shards (--max-shard-size 40KB, a 1-layer model of ~120 KB) that plain
    from_pretrained loads to exactly the gathered weights."""
    from transformers import AutoModelForCausalLM

    ddp_out, _ = two_processes
    assert_same_training(metrics(fsdp_run), metrics(ddp_out), rel=1e-6)
    final = load_shards(fsdp_run / "final")
    assert relative_difference(final, load_weights(os.path.join(ddp_out, "final"))) < 1e-6
    assert len([n for n in os.listdir(fsdp_run / "final") if n.endswith(".safetensors")]) >= 3
    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")
    for key, value in final.items():
        assert torch.equal(model.state_dict()[key], value), key
    ckpt = fsdp_run / "checkpoint-4"
    assert sorted(os.listdir(ckpt / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not [n for n in os.listdir(ckpt) if n.endswith(".safetensors") or n == "optimizer.pt"]
    assert {f"model.model.{k}" for k in final if k != "lm_head.weight"} <= dcp_keys(ckpt)
    state = json.load(open(ckpt / "trainer_state.json"))
    assert state["fsdp"] is True and state["world_size"] == 2


def test_a_rank_killed_mid_checkpoint_ends_the_fsdp_job_and_the_previous_checkpoint_resumes_exactly(fsdp_run, tmp_path):
    """Rank 1's process dies while it writes its shard of checkpoint-4 (tests/faults.py), and rank 0 waits for it
    in DCP's collectives: the job ends at once, long before the 600 s timeout. checkpoint-4 never appears (only
    its temporary directory, without DCP's index); checkpoint-2 is whole. Resumed from it (each rank reads its
    shards of the weights and of Adam's moments), the run ends with the uninterrupted run's logged numbers and
    final weights exactly."""
    out, t0 = tmp_path / "out", time.monotonic()
    proc = torchrun(["--kill-in-save", "1:4", "--", *FSDP, "--output-dir", "out", "--ddp-timeout", "600"], tmp_path,
                    check_rc=None, program=[os.path.join(TESTS, "faults.py")])  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 90, (proc.returncode, elapsed, proc.stderr[-3000:])
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == [".tmp-checkpoint-4", "checkpoint-2"], proc.stderr[-3000:]
    assert not os.path.exists(out / ".tmp-checkpoint-4" / "sharded" / ".metadata")
    assert not (out / "final").exists()
    proc = torchrun([*FSDP, "--output-dir", "out", "--resume"], tmp_path)
    assert proc.stderr.count("resuming from") == 1
    assert metrics(out) == metrics(fsdp_run)
    final, expected = load_shards(out / "final"), load_shards(fsdp_run / "final")
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def test_fsdp_bf16_computes_in_bf16_over_fp32_shards_like_ddp_autocast(one_process, tmp_path):
    """--fsdp --bf16 --cpu-offload: the sharded parameters (half of each on a rank) and Adam's moments stay float32,
    a decoder layer's linear computes with bf16 weights and inputs (FSDP2's MixedPrecisionPolicy), not autocast.
    Against bf16 autocast with the global batch (as DDP --bf16), which rounds elsewhere (autocast keeps norms and
    residual additions in float32, FSDP2 casts the weights once), the losses agree to 2e-3 relative and the
    gradient norms to 5e-2 (measured: 8.7e-4 and 2.4e-2 at most over the 4 steps): bf16 keeps 8 significant bits
    (2^-9 = 2e-3 relative an operation); the loss is a mean over every response token of near-uniform log-probs
    (log 258 = 5.55), so its rounding averages out, and the gradient norm sums the squares of rounded gradients.
    Against the float32 run every loss differs by more than 1e-6 (the FSDP2-DDP agreement in float32; measured
    8.5e-6 at step 1, 8.5e-4 at step 4)."""
    dtypes = tmp_path / "dtypes.json"
    torchrun(["--record-dtypes", str(dtypes), "--", *FSDP, "--bf16", "--cpu-offload", "--save-every", "0",
              "--output-dir", "out"], tmp_path, program=[os.path.join(TESTS, "faults.py")])  # fmt: skip
    seen = json.load(open(dtypes))
    assert seen["compute_weight"] == seen["compute_input"] == "torch.bfloat16"
    assert seen["param_dtypes"] == seen["moment_dtypes"] == ["torch.float32"] and seen["param_types"] == ["DTensor"]
    assert 0.4 < seen["local_fraction"] < 0.6
    autocast, fp32 = metrics(one_process("bf16", "--bf16")), metrics(one_process("fp32"))
    train_rows = [r for r in metrics(tmp_path / "out") if r["type"] == "train"]
    for row, want, full in zip(train_rows, [r for r in autocast if r["type"] == "train"], [r for r in fp32 if r["type"] == "train"]):
        assert row["loss"] == pytest.approx(want["loss"], rel=2e-3), row["step"]
        assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-2), row["step"]
        assert row["loss"] != pytest.approx(full["loss"], rel=1e-6), row["step"]


def test_lora_under_fsdp_loading_on_rank_0_only_equals_lora_with_the_global_batch(one_process, tiny_llama, tmp_path):
    """--lora-r 2 with --fsdp on a --model directory: rank 0 reads the weights, rank 1 builds the model and its
    adapters on the meta device and receives rank 0's values (and its verdict of the exactness probe); the frozen
    base and the adapters share each decoder layer's FSDP2 unit. Every logged number equals one process's with
    the global batch (which DDP equals) to 1e-6 relative, the final adapter to 1e-5 as one vector (Adam divides by
    the root of the squared gradient, which turns the reductions' rounding into larger steps on 2-wide adapters).
    Checkpoints and final/ hold the adapter alone, and resuming from one ends with the same adapter exactly.
    Dropout off: each rank draws its own masks."""
    from safetensors.torch import load_file

    lora = ["--model", tiny_llama, "--lora-r", "2", "--lora-dropout", "0", "--learning-rate", "1e-2"]
    torchrun([*FSDP, *lora, "--output-dir", "out"], tmp_path)
    one = one_process("lora", *lora)
    assert_same_training(metrics(tmp_path / "out"), metrics(one), rel=1e-6)
    adapter, expected = (load_file(d / "final" / "adapter_model.safetensors") for d in (tmp_path / "out", one))
    assert adapter.keys() == expected.keys() and all(".lora_" in key for key in adapter)
    assert relative_difference(adapter, expected) < 1e-5
    assert any(t.abs().max() > 0 for name, t in expected.items() if "lora_B" in name)  # the adapter did train
    model_keys = {k for k in dcp_keys(tmp_path / "out" / "checkpoint-4") if k.startswith("model.")}
    assert model_keys and all(".lora_" in key for key in model_keys)

    # resumed from checkpoint-2 (its adapter shards; the frozen base from --model), the same adapter exactly
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")
    shutil.rmtree(tmp_path / "out" / "final")
    os.remove(tmp_path / "out" / "summary.json")
    torchrun([*FSDP, *lora, "--output-dir", "out", "--resume"], tmp_path)
    resumed = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[key], adapter[key]) for key in adapter)


def test_fsdp_refuses_what_it_cannot_do(capsys):
    """CPU offload without FSDP2, FSDP2 without torchrun, --merge-lora with --fsdp."""
    from rrhf_fast.default_model import build_model, build_tokenizer

    model = build_model(build_tokenizer(), seed=0, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="--cpu-offload .* pass --fsdp too"):
        distributed.wrap(model, distributed.World(), mode="packed", loss_options={}, cpu_offload=True)
    with pytest.raises(ValueError, match="--fsdp .* launch with torchrun"):
        distributed.init("cpu", fsdp=True, timeout_s=60)
    for flags, message in ((["--cpu-offload"], "--cpu-offload offloads FSDP2's shards"),
                           (["--fsdp", "--lora-r", "2", "--merge-lora"], "--merge-lora with --fsdp is not supported")):  # fmt: skip
        assert train.cli([*ONE_PROCESS, *flags]) == 2
        assert message in capsys.readouterr().err
