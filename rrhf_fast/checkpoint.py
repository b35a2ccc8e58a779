"""Checkpoints of rrhf_fast.train: atomic directories, RNG states, find / write / load / prune.

A checkpoint is `<output-dir>/checkpoint-<step>/`:
    model + tokenizer     Hugging Face format (safetensors); under LoRA the adapter alone
    optimizer.pt          AdamW state
    under --fsdp instead of those two:
    sharded/              torch.distributed.checkpoint of the trained weights and their AdamW state, one file a
                          rank and the .metadata index (the adapter alone under LoRA); nothing is gathered
                          (rrhf_fast.distributed.save_checkpoint), so this is not a Hugging Face directory
    tokenizer             (under --fsdp too)
    scheduler.pt          the learning-rate schedule's state
    rng.pt                rank 0's RNG states (python, numpy, torch, this GPU's); rng-rank<r>.pt for rank r > 0
    train_config.json     the resolved TrainConfig
    trainer_state.json    step, data position, tokens, eval_before, world size: written last, so its presence
                          marks the checkpoint complete
Every directory is written into a temporary one beside it, its files fsynced, then renamed into place: a
crash leaves a `.tmp-*` directory, never half a checkpoint (under --fsdp every rank writes its shard into it
and rank 0 renames it once all have). JSON is written with NaN and infinities as null,
so that metrics.jsonl and summary.json stay valid JSON.
"""

import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rrhf_fast import distributed

STATE_FILE = "trainer_state.json"


@dataclass
class LoopState:
    """Where the training loop is: what a checkpoint needs to continue it exactly."""

    step: int = 0
    data_position: int = 0  # micro-batches taken since the start of training
    tokens: int = 0  # response tokens trained on since the start of training
    eval_before: dict | None = None  # the held-out evaluation before step 1


# ----------------------------------------------------------------------------------------------------------
# Files


def finite_or_none(obj):
    """obj with every NaN or infinite float replaced by None (JSON has no NaN), through dicts and lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_line(obj) -> str:
    """One line of strict JSON (NaN and infinities as null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False)


def save_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(finite_or_none(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str, obj) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(obj) + "\n")


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fsync_tree(directory: str) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(final_path: str, write) -> None:
    """write(tmp_dir) into a fresh temporary directory beside final_path, fsync it, then rename it into place."""
    parent = os.path.dirname(final_path) or "."
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_path)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    _fsync_tree(tmp)
    if os.path.exists(final_path):  # a re-run of the same step: swap, then drop the old one
        old = f"{tmp}-old"
        os.replace(final_path, old)
        os.replace(tmp, final_path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final_path)
    _fsync_dir(parent)  # the rename itself


# ----------------------------------------------------------------------------------------------------------
# RNG states


def rng_states(device) -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this process's GPU alone: asking for every GPU's would start a CUDA context on each
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        if isinstance(states["cuda"], (list, tuple)):  # every GPU's, as checkpoints before torchrun support hold
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            torch.cuda.set_rng_state(states["cuda"], device)


def rng_file(rank: int) -> str:
    """rng.pt: rank 0's RNG states (a single process's); rng-rank<r>.pt: the other ranks' under torchrun."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


# ----------------------------------------------------------------------------------------------------------
# Find, write, load, prune


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in output_dir, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir, or None."""
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def prune(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep None: delete none)."""
    if keep is None:
        return
    for _, path in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def save_model(directory: str, model, tokenizer, weights, *, lora: bool, merge: bool = False,
               max_shard_size: int | str = "5GB") -> None:  # fmt: skip
    """The weights, or under LoRA the adapter, or the merged model; and the tokenizer. weights: the full state dict
    (of the adapter alone under LoRA) gathered onto rank 0 under FSDP2, whose own tensors are shards; None: the
    model's own. Safetensors files of at most max_shard_size bytes, with the index from_pretrained reads."""
    if lora and merge:
        if weights is not None:
            raise ValueError("--merge-lora needs the whole model on rank 0: not under --fsdp")
        from rrhf_fast.lora import merged_model

        merged_model(model).save_pretrained(directory, max_shard_size=max_shard_size)
    elif lora:
        from rrhf_fast.lora import save_adapter

        save_adapter(model, directory, state_dict=weights)
    else:
        model.save_pretrained(directory, state_dict=weights, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)


def write(output_dir: str, state: LoopState, *, model, tokenizer, train_module, optimizer, scheduler, world, config: dict,
          micro_per_epoch: int) -> str:  # fmt: skip
    """checkpoint-<step>/ of the loop at `state`; every rank calls it. Under FSDP2 every rank writes its shard of
    the weights and of the optimizer state (distributed.save_checkpoint) and rank 0 the small files; otherwise
    rank 0 writes the model and optimizer.pt too."""
    rngs = distributed.gather_objects(rng_states(world.device), world)
    path = os.path.join(output_dir, f"checkpoint-{state.step}")

    def small_files(tmp):
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        for rank, states in enumerate(rngs):
            torch.save(states, os.path.join(tmp, rng_file(rank)))
        save_json(config, os.path.join(tmp, "train_config.json"))
        trainer_state = {**asdict(state), "epoch": state.data_position / micro_per_epoch, "world_size": world.size,
                         "fsdp": world.fsdp}  # fmt: skip
        save_json(trainer_state, os.path.join(tmp, STATE_FILE))  # written last: marks the checkpoint complete

    if world.fsdp:

        def sharded_rest(tmp):  # DCP fsyncs each rank's shard itself
            tokenizer.save_pretrained(tmp)
            small_files(tmp)
            _fsync_tree(tmp)

        distributed.save_checkpoint(path, train_module, optimizer, world, write_rest=sharded_rest)
        return path
    if not world.is_main:
        return path

    def fill(tmp):
        save_model(tmp, model, tokenizer, None, lora=bool(config["lora_r"]), max_shard_size=config["max_shard_size"])
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        small_files(tmp)

    atomic_dir(path, fill)
    return path


def read_state(checkpoint: str) -> dict:
    return load_json(os.path.join(checkpoint, STATE_FILE))


def check_resumable(checkpoint: str, world) -> None:
    """A checkpoint resumes only in a job of the same shape: its data position counts global micro-batches of
    --batch-size x processes, it holds one RNG state a rank, and under --fsdp its state is sharded (DCP could
    reshard it, but the data position would then mean other queries). ValueError otherwise."""
    state = read_state(checkpoint)
    size, fsdp = state.get("world_size", 1), state.get("fsdp", False)
    if size != world.size:
        if fsdp:  # sharded state, not a Hugging Face directory: --model cannot read it
            another = ("an --fsdp checkpoint is sharded state, not a model directory: to go on at another size, start a "
                       "new run with --model on the final/ of a finished run (a Hugging Face directory)")  # fmt: skip
        else:
            another = f"to go on at another size, start a new run from its weights with --model {checkpoint}"
        raise ValueError(
            f"{checkpoint} was written by {size} process{'es' if size > 1 else ''} and this run has {world.size}: "
            f"--resume needs the same number (torchrun --nproc_per_node x --nnodes = {size}); {another}"
        )
    if fsdp != world.fsdp:
        raise ValueError(f"{checkpoint} was written {'with' if fsdp else 'without'} --fsdp: resume {'with' if fsdp else 'without'} it")


def load_weights(model, checkpoint: str) -> None:
    """A checkpoint's safetensors weights into a model already in memory (one handed to rrhf_fast.trainer). A tied
    weight is saved once, so a key may be missing where its tensor shares storage with one that was loaded; any other
    missing or unexpected key means the checkpoint is of another model, a ValueError, never a partial load."""
    from safetensors.torch import load_file

    shards = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
    weights = {k: v for f in shards for k, v in load_file(os.path.join(checkpoint, f)).items()}
    result = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in weights if k in own}
    wrong = list(result.unexpected_keys) + [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if wrong:
        raise ValueError(f"{checkpoint}: its weights do not fit the model given ({', '.join(wrong[:3])}, ...): resume "
                         "with the model the run started from")  # fmt: skip


def load(checkpoint: str, *, train_module, optimizer, scheduler, world) -> LoopState:
    """Restore the optimizer, the schedule and this rank's RNG states; the loop state to continue from. Under
    FSDP2 the trained weights too (each rank reads its shard); otherwise the model's weights, or the adapter's,
    were loaded with the model, before it was wrapped."""
    state = read_state(checkpoint)
    if world.fsdp:
        distributed.load_checkpoint(checkpoint, train_module, optimizer, world)
    else:
        optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=world.device))
    scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt")))
    set_rng_states(torch.load(os.path.join(checkpoint, rng_file(world.rank)), weights_only=False), world.device)
    return LoopState(state["step"], state["data_position"], state["tokens"], state["eval_before"])
