"""RRHF training, one flat loop: `python -m rrhf_fast.train [flags]` (`--help` lists them).

With no flags it trains the embedded default: a tiny Llama initialised from --seed and a byte-level
tokenizer (rrhf_fast.default_model), on the built-in addition task (rrhf_fast.task), whose train and
held-out data it writes as RRHF JSONL under <output-dir>/data/. Give --model (a local Hugging Face model
directory) and --data (RRHF JSONL) for real use; the paper's hyperparameters are then the defaults.

Every step takes --batch-size queries (times --grad-accum, times the processes under torchrun), packs each
query's prompt once with its k candidates (rrhf_fast.pack_batch), runs the prefix-shared forward and the fused
RRHF loss (rrhf_fast.prefix.model_loss), and steps AdamW under a warm-up + cosine/linear/constant schedule.
Held-out ranking accuracy (and the task's greedy reward) is measured before and after.

Outputs in --output-dir:
    train_config.json       the resolved config
    metrics.jsonl           one line per logged step and per evaluation
    checkpoint-<step>/      every --save-every steps: model + tokenizer (HF format, safetensors), optimizer.pt,
                            scheduler.pt, rng.pt (rng-rank<r>.pt for the other ranks), trainer_state.json (step,
                            data position, processes), train_config.json;
                            written to a temporary directory and renamed, so a crash never leaves half of one
    final/                  the trained model and tokenizer in Hugging Face format
    With --lora-r, checkpoints and final/ hold the adapter (adapter_config.json + adapter_model.safetensors,
    for peft.PeftModel.from_pretrained on the --model base), and --merge-lora makes final/ the merged model.
    curves.png, summary.json

Several processes: `torchrun --nproc_per_node N -m rrhf_fast.train [the same flags]` runs DDP (NCCL on CUDA,
gloo on CPU), or FSDP2 with --fsdp (CUDA); see rrhf_fast.distributed. Each rank reads its own share of every
micro-batch, so N processes with --batch-size B take the steps one process takes with --batch-size N x B; rank 0
alone logs and writes files.

Exit status: 0 done, 2 bad input (one line on stderr: file, line, what is wrong), 3 non-finite loss.
"""

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from rrhf_fast import distributed
from rrhf_fast.cli import InputError, Parser, number, run

PROG = "rrhf_fast.train"
PAPER_HPARAMS = dict(
    learning_rate=2e-5, lr_scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0, batch_size=1, prefix_mode="auto",
    row_tokens=4096, threads=None, eval_every=0,
)
# The embedded default: many short groups, where one packed pass of short rows beats a per-group loop by far, and a
# model so small that a second CPU thread gains little and, on cores shared with other processes, costs a lot (on a
# busy 2-core machine the default run took 37 s with one thread, 107 s with two).
DEFAULT_HPARAMS = dict(
    learning_rate=3e-3, lr_scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0, batch_size=64, prefix_mode="packed",
    row_tokens=256, threads=1, eval_every=100,
)


@dataclass
class TrainConfig:
    # what to train on
    model: str | None = None  # None: the embedded tiny Llama
    data: str | None = None  # None: the built-in addition task
    eval_data: str | None = None
    output_dir: str = "out/rrhf"
    trust_remote_code: bool = False
    model_max_length: int = 512
    # how long and how
    max_steps: int | None = None  # None: from num_train_epochs (the embedded default: 300)
    num_train_epochs: float = 3.0
    batch_size: int | None = None  # queries per micro-batch
    grad_accum: int = 1
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    # the loss
    length_penalty: float = 1.0
    rank_weight: float = 1.0
    sft_weight: float = 1.0
    margin: float = 0.0
    sft_reduction: str = "mean"
    prefix_mode: str | None = None
    loss_backend: str = "auto"
    row_tokens: int | None = None
    threads: int | None = None  # CPU threads for torch; None: torch's default
    # bookkeeping
    log_every: int = 10
    eval_every: int | None = None
    eval_batch_size: int = 64
    eval_max_examples: int = 256
    save_every: int = 500
    resume: bool = False
    overwrite_output_dir: bool = False
    stop_after: int | None = None
    # LoRA adapters through peft (None: full fine-tuning)
    lora_r: int | None = None
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False
    # several processes (torchrun)
    fsdp: bool = False
    ddp_timeout: int = 1800
    # the embedded default (ignored with --model / --data)
    task_train_size: int = 9000
    task_eval_size: int = 200
    tiny_hidden_size: int = 96
    tiny_layers: int = 2


TORCHRUN_HELP = """\
several processes, the same flags (a step takes --batch-size x --grad-accum x processes queries):
  torchrun --nproc_per_node 8 -m rrhf_fast.train --model M --data D --bf16              # DDP on 8 GPUs
  torchrun --nproc_per_node 8 -m rrhf_fast.train --model M --data D --bf16 --fsdp       # FSDP2: weights sharded
  torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc_per_node 8 -m rrhf_fast.train ...
                                                       # 2 machines; R = 0 and 1, HOST = node 0's address
  torchrun --nproc_per_node 2 -m rrhf_fast.train --device cpu                           # DDP on CPU (gloo)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each flag's help; the torchrun examples kept as written."""


class NonFiniteLoss(Exception):
    """Training diverged: NonFiniteLoss(message, last checkpoint or None), printed as one line, exit status 3."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=TORCHRUN_HELP, formatter_class=HelpFormatter)
    pos_int, nonneg_int = number(int, 1), number(int, 0)
    pos, nonneg = number(float, 0, low_inclusive=False), number(float, 0)
    g = p.add_argument_group("data and model")
    g.add_argument("--model", "--model_name_or_path", help="local Hugging Face model directory (AutoModelForCausalLM + AutoTokenizer); default: the embedded tiny Llama")
    g.add_argument("--data", "--data_path", help="training data, RRHF JSONL ({query, responses, scores} a line); default: the built-in addition task")
    g.add_argument("--eval-data", "--eval_data", "--eval_data_path", help="held-out RRHF JSONL for ranking accuracy; default: the task's held-out set, or the first --eval-max-examples training queries")
    g.add_argument("--output-dir", "--output_dir", default=TrainConfig.output_dir, help="where checkpoints, final/, metrics and summary go")
    g.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", help="allow custom model code shipped in --model")
    g.add_argument("--model-max-length", "--model_max_length", type=pos_int, default=TrainConfig.model_max_length, help="tokens per candidate (prompt + response); longer prompts are cut from the left, responses from the right")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", "--max_steps", type=pos_int, help="optimizer steps; overrides --num-train-epochs (embedded default: 300)")
    g.add_argument("--num-train-epochs", "--num_train_epochs", "--epochs", type=pos, default=TrainConfig.num_train_epochs, help="passes over the data when --max-steps is not given")
    g.add_argument("--batch-size", "--per_device_train_batch_size", type=pos_int, help=f"queries per micro-batch, each with all its candidates (default: {DEFAULT_HPARAMS['batch_size']} embedded, {PAPER_HPARAMS['batch_size']} with --model)")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", "--gradient_accumulation_steps", type=pos_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", "--learning_rate", "--lr", type=pos, help=f"peak learning rate (default: {DEFAULT_HPARAMS['learning_rate']} embedded, {PAPER_HPARAMS['learning_rate']} with --model, the paper's)")
    g.add_argument("--lr-scheduler", "--lr_scheduler_type", choices=["cosine", "linear", "constant"], help="decay after warm-up (default: cosine)")
    g.add_argument("--warmup-ratio", "--warmup_ratio", type=nonneg, help="warm-up as a fraction of --max-steps (default: 0.03)")
    g.add_argument("--warmup-steps", "--warmup_steps", type=nonneg_int, help="warm-up steps; overrides --warmup-ratio")
    g.add_argument("--weight-decay", "--weight_decay", type=nonneg, help="AdamW weight decay (default: 0, the paper's)")
    g.add_argument("--max-grad-norm", "--max_grad_norm", type=nonneg, default=1.0, help="clip the gradient norm to this; 0 turns clipping off")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay float32)")
    g.add_argument("--gradient-checkpointing", "--gradient_checkpointing", action="store_true", help="recompute activations in the backward to save memory")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of the model init (embedded), data order, task data and every RNG")
    g.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    g.add_argument("--threads", type=pos_int, help="CPU threads for torch (default: 1 for the embedded model, torch's own default with --model)")
    g = p.add_argument_group("the RRHF loss (see rrhf_fast.rrhf_loss)")
    g.add_argument("--length-penalty", "--length_penalty", type=nonneg, default=1.0, help="score = sum log p / length ** length_penalty")
    g.add_argument("--rank-weight", "--rrhf_weight", type=nonneg, default=1.0, help="weight of the pairwise hinge ranking term")
    g.add_argument("--sft-weight", "--sft_weight", type=nonneg, default=1.0, help="weight of the SFT term on the best candidate")
    g.add_argument("--margin", type=number(float), default=0.0, help="hinge margin: max(0, p_i - p_j + margin) for r_i < r_j")
    g.add_argument("--sft-reduction", "--sft_reduction", choices=["mean", "sum"], default="mean", help="mean: SFT term per token; sum: the paper's literal sum")
    g.add_argument("--prefix-mode", "--prefix_mode", choices=["auto", "packed", "kv-cache", "none"], help="how the k candidates share their prompt: packed rows with a mask, a kv-cache per group, or none (re-encode, the original code's way); default: packed embedded, auto (rrhf_fast.prefix.resolve_mode) with --model")
    g.add_argument("--loss-backend", "--loss_backend", choices=["auto", "triton", "torch", "reference"], default="auto", help="rrhf_loss backend: auto is triton on CUDA, torch elsewhere")
    g.add_argument("--row-tokens", "--row_tokens", type=pos_int, help="packed-row length: whole query groups share a row up to this many tokens; attention costs row_tokens**2 a row (default: 256 embedded, 4096 with --model)")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-every", "--logging_steps", type=pos_int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--eval-every", "--eval_steps", type=nonneg_int, help="steps between held-out evaluations; 0: before and after training only (default: 100 embedded, 0 with --model)")
    g.add_argument("--eval-batch-size", "--per_device_eval_batch_size", type=pos_int, default=64, help="queries per evaluation batch")
    g.add_argument("--eval-max-examples", type=pos_int, default=256, help="held-out queries evaluated at most")
    g.add_argument("--save-every", "--save_steps", type=nonneg_int, default=500, help="steps between checkpoints (and the last step); 0: only final/")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    g.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true", help="start afresh even if --output-dir holds checkpoints (they are deleted)")
    g.add_argument("--stop-after", type=pos_int, help="stop after this step as if killed (for testing --resume): no final/, no summary")
    g = p.add_argument_group("LoRA adapters (peft): train low-rank adapters instead of every weight")
    g.add_argument("--lora-r", "--lora_r", type=pos_int, help="adapter rank; setting it turns LoRA on (default: off, full fine-tuning). LoRA usually wants a larger --learning-rate, 1e-4 to 2e-4")
    g.add_argument("--lora-alpha", "--lora_alpha", type=pos, help="adapter output scaled by alpha / r (default: 2 x --lora-r)")
    g.add_argument("--lora-dropout", "--lora_dropout", type=nonneg, default=TrainConfig.lora_dropout, help="dropout on the adapters' input, in [0, 1)")
    g.add_argument("--lora-target-modules", "--lora_target_modules", default=TrainConfig.lora_target_modules, help="all-linear (every linear layer but the LM head: q,k,v,o,gate,up,down_proj on Llama) or comma-separated module names")
    g.add_argument("--merge-lora", "--merge_lora", action="store_true", help="final/ holds the model with the adapters merged in (loads in plain transformers) instead of the adapter alone")
    g = p.add_argument_group("several processes (launched by torchrun; examples below)")
    g.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the GPUs with FSDP2 (one unit per decoder layer), instead of DDP's full copy on each")
    g.add_argument("--ddp-timeout", "--ddp_timeout", type=pos_int, default=TrainConfig.ddp_timeout, help="seconds a rank waits for the others in a collective before the job fails (a hung rank ends the job after this)")
    g = p.add_argument_group("the embedded default (ignored with --model / --data)")
    g.add_argument("--task-train-size", type=pos_int, default=9000, help="training queries of the addition task (train + held-out at most 10000)")
    g.add_argument("--task-eval-size", type=pos_int, default=200, help="held-out queries of the addition task")
    g.add_argument("--tiny-hidden-size", type=pos_int, default=96, help="hidden size of the embedded Llama (4 heads, so a multiple of 8)")
    g.add_argument("--tiny-layers", type=pos_int, default=2, help="layers of the embedded Llama")
    return p


def resolve_config(argv) -> TrainConfig:
    """Flags -> TrainConfig with every default filled in."""
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig)})
    hparams = PAPER_HPARAMS if cfg.model is not None else DEFAULT_HPARAMS
    for name, value in hparams.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.model is None and cfg.data is None and cfg.max_steps is None:
        cfg.max_steps = 300
    if cfg.data is None and cfg.task_train_size + cfg.task_eval_size > 10_000:
        raise InputError(f"--task-train-size + --task-eval-size must be at most 10000 (distinct queries), got {cfg.task_train_size + cfg.task_eval_size}")
    if cfg.lora_r is None:
        for flag, given in (("--lora-alpha", cfg.lora_alpha is not None), ("--merge-lora", cfg.merge_lora)):
            if given:
                raise InputError(f"{flag} needs --lora-r: LoRA is off without an adapter rank")
    else:
        lora_options(cfg)  # checks the values: bad ones are InputErrors before anything loads
        if cfg.fsdp:
            raise InputError("--lora-r with --fsdp is not supported: train the adapters with DDP (leave out --fsdp); "
                             "the frozen base is the same on every GPU")
    if cfg.model is None and cfg.tiny_hidden_size % 8:
        raise InputError(f"--tiny-hidden-size must be a multiple of 8 (4 heads of even size), got {cfg.tiny_hidden_size}")
    return cfg


def lora_options(cfg: TrainConfig):
    from rrhf_fast.lora import LoraOptions

    try:  # library code raises ValueError: bad input for the command
        return LoraOptions(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    except ValueError as err:
        raise InputError(str(err)) from None


# ----------------------------------------------------------------------------------------------------------
# Loading: model, tokenizer, data. Everything that can fail on user input fails here, before training.


def load_model_and_tokenizer(cfg: TrainConfig, source: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_fast.default_model import build_model, build_tokenizer

    if source is None:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed=cfg.seed, hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers)
        return model, tokenizer
    if not os.path.isdir(source):
        raise InputError(f"{source}: no such model directory")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise InputError(f"{source}: not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:  # anything from_pretrained raises on a user's directory is bad input, not a crash
        raise InputError(f"{source}: cannot load the model or tokenizer: {' '.join(str(err).split())}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_data(cfg: TrainConfig, tokenizer, world: distributed.World):
    """(train examples, eval examples, eval queries or None, reward function or None), tokenised."""
    from rrhf_fast import data, task

    reward_fn = None
    train_path, eval_path = cfg.data, cfg.eval_data
    if train_path is None:  # the built-in task: written out once, then read like any user file
        data_dir = os.path.join(cfg.output_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        train_path, eval_path = os.path.join(data_dir, "train.jsonl"), eval_path or os.path.join(data_dir, "eval.jsonl")
        if world.is_local_main:  # one writer a machine; the other ranks read the files once they are complete
            train_records, eval_records = task.make_records(cfg.task_train_size, cfg.task_eval_size, cfg.seed)
            task.write_jsonl(train_records, train_path)
            if cfg.eval_data is None:
                task.write_jsonl(eval_records, eval_path)
        distributed.barrier(world)
        if cfg.eval_data is None:
            reward_fn = task.reward
    train_examples = data.read_jsonl(train_path)
    eval_examples = data.read_jsonl(eval_path) if eval_path else train_examples
    eval_examples = eval_examples[: cfg.eval_max_examples]
    train_tok, cut = data.tokenize(train_examples, tokenizer, cfg.model_max_length)
    eval_tok, eval_cut = data.tokenize(eval_examples, tokenizer, cfg.model_max_length)
    for path, c in ((train_path, cut), (eval_path or train_path, eval_cut)):
        if (c.prompts or c.responses) and world.is_main:
            print(f"{PROG}: warning: {path}: {c} to fit --model-max-length {cfg.model_max_length}", file=sys.stderr)
    if eval_path is None and world.is_main:
        print(f"{PROG}: warning: no --eval-data; evaluating on the first {len(eval_tok)} training queries", file=sys.stderr)
    queries = [ex.query for ex in eval_examples] if reward_fn else None
    return train_tok, eval_tok, queries, reward_fn


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic directories, newest complete one found by name.


def latest_checkpoint(output_dir: str) -> str | None:
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def atomic_dir(final_path: str, write) -> None:
    """write(tmp_dir) into a fresh temporary directory beside final_path, then rename it into place."""
    parent = os.path.dirname(final_path) or "."
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_path)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final_path):  # a re-run of the same step: swap, then drop the old one
        old = f"{tmp}-old"
        os.replace(final_path, old)
        os.replace(tmp, final_path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final_path)


def save_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


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


def bf16_autocast(device, enabled: bool):
    """--bf16: bfloat16 autocast over the fp32 weights, without autocast's weight cache.

    The cache keeps the bf16 copy of every weight that needs a gradient until the autocast region ends, here the
    end of the forward. Without checkpointing the matmuls save those copies for their backward anyway; with it
    (and under FSDP2, whose gathered layers it would keep) the cache alone holds 2 bytes per weight of the whole
    model (16 GB for an 8B model; on the CPU, an 8-layer Llama of hidden 1024 under checkpointing kept 256 MiB,
    exactly its linear weights in bf16, until the region ended). Without it a weight is cast where it is used.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plot_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8")]
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    for key in ("loss", "rank_loss", "sft_loss"):
        axes[0].plot(steps, [r[key] for r in train], label=key)
    axes[0].set_title("training loss")
    axes[1].plot(steps, [r["rank_acc"] for r in train], label="train batch", alpha=0.6)
    axes[1].plot([r["step"] for r in evals], [r["rank_acc"] for r in evals], "o-", label="held-out")
    axes[1].set_title("ranking accuracy")
    if any("reward" in r for r in evals):
        axes[2].plot([r["step"] for r in evals], [r.get("reward") for r in evals], "o-", label="greedy reward")
        axes[2].set_title("held-out greedy reward")
    else:
        axes[2].plot(steps, [r["lr"] for r in train], label="lr")
        axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------


def check_resumable(checkpoint: str, world: distributed.World) -> None:
    """A checkpoint resumes only in a job of the same shape: its data position counts global micro-batches of
    --batch-size x processes, it holds one RNG state a rank, and under --fsdp its optimizer state is keyed by name."""
    state = json.load(open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8"))
    size, fsdp = state.get("world_size", 1), state.get("fsdp", False)
    if size != world.size:
        raise InputError(
            f"{checkpoint} was written by {size} process{'es' if size > 1 else ''} and this run has {world.size}: "
            f"--resume needs the same number (torchrun --nproc_per_node x --nnodes = {size}); to go on at another size, "
            f"start a new run from its weights with --model {checkpoint}"
        )
    if fsdp != world.fsdp:
        raise InputError(f"{checkpoint} was written {'with' if fsdp else 'without'} --fsdp: resume {'with' if fsdp else 'without'} it")


def main(argv=None) -> int:
    t_start = time.time()
    cfg = resolve_config(argv)
    try:
        world = distributed.init(cfg.device, fsdp=cfg.fsdp, timeout_s=cfg.ddp_timeout)
    except ValueError as err:
        raise InputError(str(err)) from None
    device = world.device

    def say(message):  # progress and warnings: rank 0 speaks for the job
        if world.is_main:
            print(message, file=sys.stderr)

    out = cfg.output_dir
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        say(f"{PROG}: warning: --resume: no complete checkpoint in {out}; starting from scratch")
    if resume_from is not None:
        check_resumable(resume_from, world)
    if not cfg.resume and latest_checkpoint(out) is not None:
        if not cfg.overwrite_output_dir:
            raise InputError(f"{out}: holds checkpoints; pass --resume to continue or --overwrite-output-dir to start afresh")
        if world.is_main:
            for name in os.listdir(out):
                if name.startswith(("checkpoint-", ".tmp-")) or name == "final":
                    shutil.rmtree(os.path.join(out, name))
    if cfg.model is not None and not os.path.isdir(cfg.model):
        raise InputError(f"{cfg.model}: no such model directory")
    for path in (cfg.data, cfg.eval_data):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
    os.makedirs(out, exist_ok=True)
    distributed.barrier(world)  # rank 0 has cleared the old checkpoints

    from transformers.utils import logging as hf_logging

    from rrhf_fast.batch import pack_batch
    from rrhf_fast.data import DataError
    from rrhf_fast.evaluate_model import greedy_answers, mean_reward, pair_accuracy, ranking_accuracy
    from rrhf_fast.loss import resolve_backend
    from rrhf_fast.prefix import resolve_mode

    hf_logging.disable_progress_bar()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    # A LoRA checkpoint holds the adapter only: the base model always comes from --model (or the embedded build).
    model, tokenizer = load_model_and_tokenizer(cfg, cfg.model if cfg.lora_r else resume_from or cfg.model)
    try:
        train_data, eval_data, eval_queries, reward_fn = load_data(cfg, tokenizer, world)
    except DataError as err:  # "<file>:<line>: <what is wrong>"
        raise InputError(str(err)) from None
    except ValueError as err:  # a tokenizer the data cannot be encoded with (no EOS, ...)
        raise InputError(f"{cfg.model}: {err}") from None
    if cfg.gradient_checkpointing:  # renamed in transformers 5.2x; the old name still works before that
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_r:  # after checkpointing: peft then makes the embeddings' output require grad, as it needs
        from rrhf_fast import lora

        try:
            model = lora.add_lora(model, lora_options(cfg))
            if resume_from is not None:
                lora.load_adapter_weights(model, resume_from)
        except ValueError as err:
            raise InputError(str(err)) from None
        say(lora.parameter_summary(model))
    model.config.use_cache = False
    model.train()
    loss_options = dict(
        length_penalty=cfg.length_penalty, rank_weight=cfg.rank_weight, sft_weight=cfg.sft_weight, margin=cfg.margin,
        sft_reduction=cfg.sft_reduction, backend=cfg.loss_backend,
    )
    # The model moved to the device (DDP, one process) or sharded over the GPUs (FSDP2), inside the module whose
    # forward is the loss; `model` stays the Hugging Face model, for evaluation and saving.
    train_module = distributed.wrap(model, world, mode=cfg.prefix_mode, loss_options=loss_options)
    for flag, check in (("--prefix-mode", lambda: resolve_mode(model, cfg.prefix_mode)),
                        ("--loss-backend", lambda: resolve_backend(cfg.loss_backend, device))):  # fmt: skip
        try:  # the checks model_loss makes on every call, made once before any work
            check()
        except ValueError as err:
            raise InputError(f"{flag}: {err}") from None

    # A micro-batch is --batch-size queries on each rank, global_batch in all. With one process the last micro-batch
    # of an epoch takes what is left. With several, every rank must have the same number of groups (the averaged
    # gradient is then the mean over all groups), so an epoch deals whole global micro-batches only.
    global_batch = cfg.batch_size * world.size
    if world.size == 1:
        micro_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    else:
        micro_per_epoch, left_out = divmod(len(train_data), global_batch)
        if micro_per_epoch == 0:
            raise InputError(
                f"{len(train_data)} training queries do not fill one micro-batch of --batch-size {cfg.batch_size} on each of "
                f"{world.size} processes ({global_batch} queries): lower --batch-size"
            )
        if left_out:
            say(f"{PROG}: warning: {len(train_data)} training queries are not a multiple of --batch-size x processes "
                f"({cfg.batch_size} x {world.size}): each epoch leaves out the last {left_out} of its shuffled order, "
                f"so that every rank gets {cfg.batch_size} queries a micro-batch")  # fmt: skip
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * micro_per_epoch / cfg.grad_accum))
    cfg.max_steps = max_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * max_steps)
    if world.is_main:
        save_json(asdict(cfg), os.path.join(out, "train_config.json"))

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate
    )

    def lr_factor(step):  # step counts from 0; warm-up linear from 1/warmup to 1, then the decay to 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[cfg.lr_scheduler]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = lambda: bf16_autocast(device, cfg.bf16)  # noqa: E731

    eval_seconds = []  # time spent in evaluate(), left out of the training tokens/s

    def measure():
        with autocast():
            result = {"rank_acc": ranking_accuracy(
                model, eval_data, batch_size=cfg.eval_batch_size, mode=cfg.prefix_mode, loss_options=loss_options,
                max_tokens=cfg.row_tokens, pad_token_id=pad_id,
            )}
            if reward_fn is not None:
                answers = greedy_answers(model, tokenizer, eval_queries, batch_size=cfg.eval_batch_size, max_new_tokens=8)
                result["reward"] = mean_reward(reward_fn, eval_queries, answers)
                result["exact"] = sum(reward_fn(q, a) == 1.0 for q, a in zip(eval_queries, answers)) / len(answers)
        return result

    def evaluate(step):  # the result on rank 0 (None on the others under DDP)
        t0 = time.time()
        result = distributed.run_on_full_model(train_module, world, measure)
        if world.is_main:
            with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"type": "eval", "step": step, **result}) + "\n")
        eval_seconds.append(time.time() - t0)
        return result

    def batch_indices(position):  # this rank's share of micro-batch `position`, counted from the start of training
        epoch, i = divmod(position, micro_per_epoch)
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        first = i * global_batch + world.rank * cfg.batch_size
        return order[first : first + cfg.batch_size].tolist()

    # state: fresh, or from the checkpoint (the model and tokenizer were loaded from it above)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if resume_from is not None:
        state = json.load(open(os.path.join(resume_from, "trainer_state.json"), encoding="utf-8"))
        distributed.load_optimizer_state(train_module, optimizer, os.path.join(resume_from, "optimizer.pt"), world)
        scheduler.load_state_dict(torch.load(os.path.join(resume_from, "scheduler.pt")))
        set_rng_states(torch.load(os.path.join(resume_from, rng_file(world.rank)), weights_only=False), device)
        step, position, eval_before, tokens_seen = state["step"], state["data_position"], state["eval_before"], state["tokens"]
        if world.is_main:
            kept = [line for line in open(metrics_path, encoding="utf-8") if json.loads(line)["step"] <= step] if os.path.exists(metrics_path) else []
            with open(metrics_path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        saved, defaults = json.load(open(os.path.join(resume_from, "train_config.json"), encoding="utf-8")), asdict(TrainConfig())
        ignored = ("resume", "stop_after", "overwrite_output_dir", "ddp_timeout")
        changed = [k for k, v in asdict(cfg).items() if k not in ignored and saved.get(k, defaults[k]) != v]
        if changed:
            say(f"{PROG}: warning: --resume with settings other than the checkpoint's: {', '.join(changed)}")
        say(f"resuming from {resume_from} (step {step} of {max_steps})")
    else:
        step, position, tokens_seen = 0, 0, 0
        if world.is_main:
            open(metrics_path, "w").close()
        eval_before = evaluate(0)
        say(f"before training: {json.dumps(eval_before)}")

    def save_model(tmp, weights, merge=False):  # the weights, or under LoRA the adapter (or the merged model)
        if cfg.lora_r and merge:
            from rrhf_fast.lora import merged_model

            merged_model(model).save_pretrained(tmp)
        elif cfg.lora_r:
            from rrhf_fast.lora import save_adapter

            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)

    def save_checkpoint(step):
        # Under --fsdp the weights and the optimizer state are gathered onto rank 0: every rank takes part.
        weights = distributed.full_model_state(model, world)
        optimizer_state = distributed.optimizer_state(train_module, optimizer, world)
        rngs = distributed.gather_objects(rng_states(device), world)
        if not world.is_main:
            return

        def write(tmp):
            save_model(tmp, weights)
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            for rank, states in enumerate(rngs):
                torch.save(states, os.path.join(tmp, rng_file(rank)))
            save_json(asdict(cfg), os.path.join(tmp, "train_config.json"))
            state = {
                "step": step, "data_position": position, "epoch": position / micro_per_epoch, "tokens": tokens_seen,
                "eval_before": eval_before, "world_size": world.size, "fsdp": world.fsdp,
            }
            save_json(state, os.path.join(tmp, "trainer_state.json"))  # written last: marks the checkpoint complete

        atomic_dir(os.path.join(out, f"checkpoint-{step}"), write)

    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="rrhf", dynamic_ncols=True, disable=None if world.is_main else True)
    t_train, train_tokens_this_run = time.time(), 0
    t_log, tokens_log = time.time(), 0
    while step < max_steps:
        # one optimizer step: grad_accum micro-batches of batch_size queries on each rank, each query's prompt shared
        # by its candidates
        totals = {"loss": 0.0, "rank_loss": 0.0, "sft_loss": 0.0}
        correct = pairs = step_tokens = 0
        for micro in range(cfg.grad_accum):
            chunk = [train_data[i] for i in batch_indices(position)]
            position += 1
            batch = pack_batch(
                [ex.prompt for ex in chunk], [ex.candidates for ex in chunk], [ex.rewards for ex in chunk],
                max_tokens=cfg.row_tokens, pad_token_id=pad_id,
            ).to(device)
            with distributed.gradient_sync(train_module, world, sync=micro == cfg.grad_accum - 1):
                with autocast():
                    output = train_module(batch)
                if not torch.isfinite(output.loss):
                    raise NonFiniteLoss(f"non-finite loss ({output.loss.item()}) at step {step + 1}", latest_checkpoint(out))
                (output.loss / cfg.grad_accum).backward()
            for key in totals:
                totals[key] += getattr(output, key).item() / cfg.grad_accum
            c, p = pair_accuracy(output.scores.detach().float().cpu(), batch.rewards.cpu(), batch.cu_groups.cpu())
            correct, pairs = correct + c, pairs + p
            step_tokens += int((batch.group_ids >= 0).sum())
        # the logged numbers of the whole step: each rank's loss is the mean over its groups, and they all have as many
        summed = distributed.sum_over_ranks([*totals.values(), correct, pairs, step_tokens], world)
        totals = {key: value / world.size for key, value in zip(totals, summed)}
        correct, pairs, step_tokens = (int(v) for v in summed[len(totals) :])
        grad_norm = distributed.clip_grad_norm(model.parameters(), cfg.max_grad_norm, world)
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"non-finite gradient norm ({grad_norm}) at step {step + 1}", latest_checkpoint(out))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        train_tokens_this_run += step_tokens
        tokens_log += step_tokens

        rank_acc = correct / pairs if pairs else float("nan")
        if (step % cfg.log_every == 0 or step == max_steps) and world.is_main:
            tps = tokens_log / max(time.time() - t_log, 1e-9)
            row = dict(type="train", step=step, **totals, rank_acc=rank_acc, lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                       peak_mem_mb=peak_memory_mb(device), epoch=position / micro_per_epoch)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{totals['loss']:.3f}", acc=f"{rank_acc:.2f}", tok_s=f"{tps:.0f}")
            if bar.disable:  # no terminal (a log file, a pipe): a plain line instead of the bar
                print(f"step {step}/{max_steps} loss {totals['loss']:.4f} rank_acc {rank_acc:.3f} tokens/s {tps:.0f}", file=sys.stderr)
            t_log, tokens_log = time.time(), 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            result = evaluate(step)
            if world.is_main:
                bar.write(f"step {step}: {json.dumps(result)}")
        if cfg.save_every and (step % cfg.save_every == 0 or step == max_steps):
            save_checkpoint(step)
        bar.update(1)
        if cfg.stop_after is not None and step >= cfg.stop_after and step < max_steps:
            bar.close()
            say(f"stopped after step {step} (--stop-after)")
            return 0
    bar.close()
    train_wall = time.time() - t_train - sum(eval_seconds[0 if resume_from else 1 :])  # eval_before came before t_train

    eval_after = evaluate(step)
    say(f"after training:  {json.dumps(eval_after)}")
    weights = distributed.full_model_state(model, world)
    if not world.is_main:
        return 0

    def write_final(tmp):
        save_model(tmp, weights, merge=cfg.merge_lora)
        save_json(asdict(cfg), os.path.join(tmp, "train_config.json"))

    atomic_dir(os.path.join(out, "final"), write_final)
    plot_curves(metrics_path, os.path.join(out, "curves.png"))
    summary = {
        "eval_before": eval_before, "eval_after": eval_after, "steps": step, "wall_s": time.time() - t_start,
        "train_wall_s": train_wall, "tokens_per_s": train_tokens_this_run / max(train_wall, 1e-9), "tokens": tokens_seen,
        "peak_mem_mb": peak_memory_mb(device), "device": str(device), "resumed_from": resume_from,
        "processes": world.size,
    }
    save_json(summary, os.path.join(out, "summary.json"))
    say(f"wrote {out}/final, summary.json, metrics.jsonl, curves.png in {summary['wall_s']:.1f} s")
    return 0


def cli(argv=None) -> int:
    rank = os.environ.get("RANK", "0")  # under torchrun every rank reports its own errors; say which one speaks
    prog = PROG if rank == "0" else f"{PROG} (rank {rank})"

    def attempt():
        try:
            return run(main, prog, argv)
        except NonFiniteLoss as err:
            message, checkpoint = err.args
            kept = f"the last checkpoint, {checkpoint}, is intact" if checkpoint else "no checkpoint was written yet"
            print(f"{prog}: error: {message}; training stopped ({kept}; lower --learning-rate?)", file=sys.stderr)
            return 3

    return distributed.exit_status(attempt)


if __name__ == "__main__":
    sys.exit(cli())
