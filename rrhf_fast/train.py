"""RRHF training, one flat loop: `python -m rrhf_fast.train [flags]` (`--help` lists them).

With no flags it trains the embedded default: a tiny Llama initialised from --seed and a byte-level
tokenizer (rrhf_fast.default_model), on the built-in addition task (rrhf_fast.task), whose train and
held-out data it writes as RRHF JSONL under <output-dir>/data/. Give --model (a local Hugging Face model
directory) and --data (RRHF JSONL) for real use; the paper's hyperparameters are then the defaults.

Every step takes --batch-size queries (times --grad-accum, times the processes under torchrun), packs each
query's prompt once with its k candidates (rrhf_fast.pack_batch), runs the prefix-shared forward and the fused
RRHF loss (rrhf_fast.checked.model_loss), and steps AdamW under transformers' warm-up + cosine/linear/constant
schedule. Held-out ranking accuracy (and the task's greedy reward) is measured before and after; without a held-out
set (--data with no --eval-data) the same figures are taken on the first training queries and labelled train_set,
not eval: they are not held out.

The flags and their defaults are rrhf_fast.config.TrainConfig; what is loaded, and checked, is
rrhf_fast.loading; checkpoints are rrhf_fast.checkpoint. `main` below is the whole run, top to bottom.

Outputs in --output-dir:
    train_config.json       the resolved config
    metrics.jsonl           one line per logged step and per evaluation
    checkpoint-<step>/      every --save-every steps: model + tokenizer (HF format, safetensors), optimizer.pt,
                            scheduler.pt, rng.pt (rng-rank<r>.pt for the other ranks), trainer_state.json (step,
                            data position, processes), train_config.json;
                            written to a temporary directory, fsynced and renamed, so a crash never leaves half of
                            one; --save-total-limit N keeps the newest N. Under --fsdp sharded/ (every rank's
                            shard, torch.distributed.checkpoint) replaces the model and optimizer.pt
    final/                  the trained model and tokenizer in Hugging Face format (safetensors files of at most
                            --max-shard-size)
    With --lora-r, checkpoints and final/ hold the adapter (adapter_config.json + adapter_model.safetensors,
    for peft.PeftModel.from_pretrained on the --model base), and --merge-lora makes final/ the merged model.
    curves.png, summary.json (eval_before / eval_after, or train_set_before / train_set_after without a held-out set;
                            the prefix mode and head the probe chose, and its seconds)
    runs/, wandb/           with --report-to tensorboard / wandb / all: the metrics.jsonl scalars (rrhf_fast.report)
    data/tokenized/         the training set's tokens (rrhf_fast.token_cache), which a later run on the same data,
                            tokenizer, chat template and --model-max-length loads instead of tokenising; not with
                            --no-data-cache

Several processes: `torchrun --nproc_per_node N -m rrhf_fast.train [the same flags]` runs DDP (NCCL on CUDA,
gloo on CPU), or FSDP2 with --fsdp (rank 0 alone reads the weights); see rrhf_fast.distributed. Each rank reads its own share of every
micro-batch, so N processes with --batch-size B take the steps one process takes with --batch-size N x B; rank 0
alone logs and writes files.

A fresh run never replaces checkpoints or a finished run in --output-dir without --overwrite-output-dir;
--resume on a finished run says so and changes nothing. SIGINT (Ctrl-C) or SIGTERM saves a checkpoint at the
next step boundary, says where, and exits 130 / 143; --resume continues from it exactly.

Exit status: 0 done, 2 bad input (one line on stderr: file, line, what is wrong), 3 non-finite loss,
130 / 143 stopped by SIGINT / SIGTERM (a checkpoint written).
"""
import functools
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rrhf_fast import checkpoint, config, distributed, loading, report
from rrhf_fast.batch import pack_examples
from rrhf_fast.checkpoint import LoopState
from rrhf_fast.cli import InputError, bad_input, run
from rrhf_fast.config import PROG, TrainConfig


class NonFiniteLoss(Exception):
    """Training diverged: NonFiniteLoss(message, last checkpoint or None), printed as one line, exit status 3."""


@dataclass
class Setup:
    """What the loop works with, built once in main; the loop's own state is a checkpoint.LoopState."""

    cfg: TrainConfig
    world: distributed.World
    model: torch.nn.Module  # the Hugging Face model, for evaluation and saving
    tokenizer: object
    train_module: torch.nn.Module  # the model inside the module whose forward is the loss (DDP / FSDP2 / plain)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_options: dict
    pad_id: int
    micro_per_epoch: int  # micro-batches of --batch-size x processes queries in one epoch
    reporter: report.Reporter = field(default_factory=report.Reporter)  # --report-to, on rank 0
    online: object | None = None  # rrhf_fast.online.Source: the groups of every step sampled and scored (--reward)


@dataclass
class HeldOut:
    """The evaluation set: tokenised examples; the queries and reward for greedy answers (the built-in task only).

    kind names its figures: "eval" for a held-out set (--eval-data, or the built-in task's), "train_set" when there
    is none and the first training queries stand in, so that a number measured on data the model trains on is
    never labelled as held out (metrics.jsonl's record type, summary.json's <kind>_before / <kind>_after, the
    --report-to tags <kind>/..., the curves' labels)."""

    examples: object
    queries: list[str] | None
    reward_fn: object | None
    kind: str = "eval"
    online: object | None = None  # rrhf_fast.online.Source of the held-out prompts: their greedy answers' reward


def say(world, message: str) -> None:
    """Progress and warnings on stderr: rank 0 speaks for the job."""
    if world.is_main:
        print(message, file=sys.stderr)


def bf16_autocast(device, enabled: bool):
    """--bf16 without --fsdp (callers pass `cfg.bf16 and not cfg.fsdp`): bfloat16 autocast over the fp32 weights,
    without autocast's weight cache. (Under --fsdp, FSDP2 itself gathers the units' weights in bf16:
    distributed.wrap's MixedPrecisionPolicy.)

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


# ----------------------------------------------------------------------------------------------------------
# Before training: the output directory, the inputs, the model and the data. Bad input fails here.


def is_finished(out: str) -> bool:
    """A run that wrote its summary: final/ and summary.json are complete."""
    return os.path.isfile(os.path.join(out, "summary.json"))


def claim_output_dir(cfg: TrainConfig, world) -> str | None:
    """The checkpoint to resume from (None: a fresh run), after clearing --output-dir for a fresh one.

    A fresh run never silently replaces checkpoints or a finished run (final/, summary.json): it needs
    --overwrite-output-dir, which deletes them."""
    out = cfg.output_dir
    resume_from = checkpoint.latest(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        say(world, f"{PROG}: warning: --resume: no complete checkpoint in {out}; starting from scratch")
    if resume_from is not None:
        with bad_input():
            checkpoint.check_resumable(resume_from, world)
        return resume_from
    finished = is_finished(out) or os.path.isdir(os.path.join(out, "final"))
    if checkpoint.latest(out) and not cfg.overwrite_output_dir:
        raise InputError(f"{out}: holds checkpoints; pass --resume to continue or --overwrite-output-dir to start afresh")
    if finished and not cfg.overwrite_output_dir:
        raise InputError(f"{out}: holds a finished run (final/, summary.json); pass --overwrite-output-dir to replace it, "
                         f"or another --output-dir")  # fmt: skip
    held = finished or checkpoint.latest(out)
    if held and world.is_main:
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name.startswith(("checkpoint-", ".tmp-")) or name == "final":
                shutil.rmtree(path)
            elif name in ("summary.json", "curves.png"):
                os.remove(path)
    return None


def check_inputs(cfg: TrainConfig) -> None:
    """--model and its positions, --output-dir and --report-to's libraries, before anything is written or loaded."""
    with bad_input():
        if cfg.model is not None:
            model_config = loading.model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
            loading.check_max_length(model_config, cfg.model_max_length, cfg.model)
        loading.check_writable(cfg.output_dir)
        report.check(cfg.report_to)


def load_model(cfg: TrainConfig, resume_from: str | None, world):
    """(model, tokenizer) to train: from the checkpoint, --model or the embedded build. A LoRA checkpoint holds the
    adapter only, and an --fsdp one sharded state (restored after wrapping), so under either the model comes from
    --model (or the embedded build). Under --fsdp rank 0 alone reads the weights: the other ranks build the model
    on the meta device and receive their shards from rank 0 in distributed.wrap (the embedded build is cheap and
    made everywhere)."""
    source = cfg.model if cfg.lora_r or cfg.fsdp else resume_from or cfg.model
    if source is None:
        return loading.embedded_model(seed=cfg.seed, hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers,
                                      max_positions=max(cfg.model_max_length, 1024))  # fmt: skip
    with bad_input():
        return loading.load_model_and_tokenizer(source, trust_remote_code=cfg.trust_remote_code,
                                                on_meta=world.fsdp and not world.is_main)  # fmt: skip


@dataclass
class Texts:
    """The data as read, before tokenisation; eval None: the first training queries are held out."""

    train_path: str
    train: list
    eval_path: str | None
    eval: list | None
    reward_fn: object | None  # the built-in task's reward, for greedy answers on its held-out set
    chat_template: str | None = None  # --chat-template's Jinja text, for chat messages
    train_split: str = "train"
    online: bool = False  # train / eval are rrhf_fast.online.Prompts (prompts to sample from), not examples


def read_data(cfg: TrainConfig, world) -> Texts:
    """The training and held-out examples: --data / --eval-data (their --data-split / --eval-split; any format
    rrhf_fast.data reads), or the built-in task, written out as RRHF JSONL once and then read like any user file;
    and --chat-template's text."""
    from rrhf_fast import data, task

    if cfg.reward or cfg.reward_model:
        from rrhf_fast import online

        with bad_input():
            template = data.read_chat_template(cfg.chat_template) if cfg.chat_template else None
            train = online.read(cfg.data, cfg.data_split)
            held_out = online.read(cfg.eval_data, cfg.eval_split) if cfg.eval_data else None
        return Texts(cfg.data, train, cfg.eval_data, held_out, None, template, online=True)
    reward_fn = None
    train_path, eval_path = cfg.data, cfg.eval_data
    train_split = cfg.data_split if cfg.data else "train"
    eval_split = cfg.eval_split if cfg.eval_data else "train"
    if train_path is None:
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
    with bad_input():
        template = data.read_chat_template(cfg.chat_template) if cfg.chat_template else None
        train = loading.read_data(train_path, train_split)
        held_out = loading.read_data(eval_path, eval_split) if eval_path else None
    return Texts(train_path, train, eval_path, held_out, reward_fn, template, train_split)


def tokenize_data(texts: Texts, tokenizer, cfg: TrainConfig, world):
    """(the tokenised training set, a rrhf_fast.tokens.TokenizedData; the evaluation set), with a warning for what
    --model-max-length cut.

    The training set comes from <output-dir>/data/tokenized/ when an earlier run tokenised the same data with the
    same tokenizer, template and --model-max-length (rrhf_fast.token_cache; --no-data-cache turns it off); one
    process a machine writes it, after the tokens have passed check_encodes."""
    from rrhf_fast import data, token_cache

    eval_examples = (texts.eval or texts.train)[: cfg.eval_max_examples]
    directory = None if cfg.no_data_cache else os.path.join(cfg.output_dir, "data", "tokenized")
    with bad_input(f"{cfg.model or 'the embedded model'}: "):
        cached = token_cache.tokenize(texts.train, tokenizer, cfg.model_max_length, texts.chat_template,
                                      path=texts.train_path, split=texts.train_split, directory=directory)  # fmt: skip
        train_tok, train_cut = cached.data, cached.cut
        eval_tok, eval_cut = data.tokenize(eval_examples, tokenizer, cfg.model_max_length, texts.chat_template)
    with bad_input():
        loading.check_encodes(texts.train, train_tok, tokenizer, cfg.model or "the embedded model")
    if world.is_local_main:
        cached.store()
    for path, cut in ((texts.train_path, train_cut), (texts.eval_path or texts.train_path, eval_cut)):
        if cut.prompts or cut.responses:
            say(world, f"{PROG}: warning: {path}: {cut} to fit --model-max-length {cfg.model_max_length}")
    if texts.eval is None:
        say(world, f"{PROG}: warning: no --eval-data: the figures before and after training are on the first "
                   f"{len(eval_tok)} training queries, not held out (summary.json train_set_before / train_set_after)")  # fmt: skip
    queries = [ex.query for ex in eval_examples] if texts.reward_fn else None
    return train_tok, HeldOut(eval_tok, queries, texts.reward_fn, "eval" if texts.eval is not None else "train_set")


def tokenize_prompts(texts: Texts, model, tokenizer, cfg: TrainConfig, world, rewards=None) -> tuple[object, HeldOut]:
    """Online RRHF: (the rrhf_fast.online.Source of the training prompts, the held-out set as one of the held-out
    prompts), the prompts encoded once, with a warning for what --model-max-length cut."""
    from rrhf_fast import generation, online

    rewards = rewards if rewards is not None else load_rewards(cfg, world)
    options = online.Options(cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.seed,
                             cfg.sft_min_reward)  # fmt: skip
    with bad_input(f"{cfg.model or 'the embedded model'}: "):
        stops = generation.stop_token_ids(model, tokenizer)
        kwargs = dict(max_length=cfg.model_max_length, stop_token_ids=stops, chat_template=texts.chat_template)
        source = online.Source(texts.train, tokenizer, rewards, options, reference_column=cfg.reference_column, **kwargs)
        held = texts.eval or texts.train
        held = online.Prompts(held.path, *(column[: cfg.eval_max_examples] for column in (held.prompts, held.columns, held.lines)))
        eval_source = online.Source(held, tokenizer, rewards, options, **kwargs)
    for path, src in ((texts.train_path, source), (texts.eval_path or texts.train_path, eval_source)):
        if src.cut:
            say(world, f"{PROG}: warning: {path}: {src.cut} prompt(s) cut from the left to leave --max-completion-length "
                       f"{cfg.max_completion_length} tokens within --model-max-length {cfg.model_max_length}")  # fmt: skip
    if texts.eval is None:
        say(world, f"{PROG}: warning: no --eval-data: the figures before and after training are on the first "
                   f"{len(eval_source)} training prompts, not held out (summary.json train_set_before / train_set_after)")  # fmt: skip
    return source, HeldOut([], None, None, "eval" if texts.eval is not None else "train_set", online=eval_source)


def load_rewards(cfg: TrainConfig, world, functions=None):
    """The rrhf_fast.online.Rewards of --reward (module:function or task) and --reward-model (on this rank's device),
    weighted by --reward-weights; `functions` (callables, or reward-model paths) instead of the flags for
    rrhf_fast.trainer's reward_funcs."""
    from rrhf_fast import loading, online

    with bad_input():
        if functions is None:
            functions = [loading.reward_function(spec) for spec in cfg.reward or []] + list(cfg.reward_model or [])
            names = [spec.rpartition(":")[2] for spec in cfg.reward or []]
            names += [os.path.basename(os.path.normpath(p)) for p in cfg.reward_model or []]
        else:
            names = [os.path.basename(os.path.normpath(f)) if isinstance(f, str) else online.function_name(f) for f in functions]
        loaded = [loading.reward_model(f, on=world.device, batch_size=cfg.eval_batch_size, trust_remote_code=cfg.trust_remote_code)
                  if isinstance(f, str) else f for f in functions]  # fmt: skip
        return online.Rewards(loaded, names, list(cfg.reward_weights or []))


def wrap_model(model, cfg: TrainConfig, resume_from: str | None, world, first_batch):
    """(model, train_module, loss_options, (plan, probe seconds)): checkpointing, LoRA, the exactness probe on
    first_batch (plan_prefix_mode; under --fsdp rank 0 probes its whole weights and every rank adopts its plan), then
    the model inside the module whose forward is the loss, moved to the device (DDP, one process) or sharded over the
    processes (FSDP2)."""
    from rrhf_fast.loss import resolve_backend

    if cfg.gradient_checkpointing:  # renamed in transformers 5.2x; the old name still works before that
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_r:  # after checkpointing: peft then makes the embeddings' output require grad, as it needs
        from rrhf_fast import lora

        with bad_input():
            model = lora.add_lora(model, config.lora_options(cfg))
            if resume_from is not None and not world.fsdp:  # an --fsdp checkpoint's adapter comes back in resume()
                lora.load_adapter_weights(model, resume_from)
        say(world, lora.parameter_summary(model))
    model.config.use_cache = False
    model.train()
    loss_options = dict(
        length_penalty=cfg.length_penalty, rank_weight=cfg.rank_weight, sft_weight=cfg.sft_weight, margin=cfg.margin,
        sft_reduction=cfg.sft_reduction, backend=cfg.loss_backend,
    )
    with bad_input("--loss-backend: "):
        resolve_backend(cfg.loss_backend, world.device)
    if world.fsdp:  # the other ranks' weights are not there until wrap: rank 0 probes, every rank takes its plan
        t0 = time.time()
        with bad_input("--prefix-mode: "):
            chosen = distributed.probe_on_rank0(model, first_batch, world, mode=cfg.prefix_mode)
        plan = (chosen, time.time() - t0)
    else:
        model.to(world.device)
        plan = plan_prefix_mode(model, first_batch.to(world.device), cfg, world)
    with bad_input():
        train_module = distributed.wrap(model, world, mode=cfg.prefix_mode, loss_options=loss_options,
                                        bf16=cfg.bf16 and cfg.fsdp, cpu_offload=cfg.cpu_offload)  # fmt: skip
    return model, train_module, loss_options, plan


def plan_prefix_mode(model, batch, cfg: TrainConfig, world):
    """The exactness check on the first training micro-batch: rrhf_fast.probe.plan checks the fused head and
    --prefix-mode against every candidate re-encoded alone through the model's own logits (on a float64 twin of the
    model, so the verdict is the same whatever --bf16 says), and caches the plan on the model, so that the wrapped
    forward's model_loss runs it without checking again. An explicit mode that fails is exit 2 naming the mode that
    passed; a plan other than the one asked for (auto falling back, or the model's own logits instead of the fused
    head) is said once here.

    Returns (the Plan, seconds the check took)."""
    from rrhf_fast import probe

    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # probe.plan's own warning: said below as one line of this command's
        with bad_input("--prefix-mode: "), bf16_autocast(world.device, cfg.bf16 and not cfg.fsdp):
            plan = probe.plan(model, batch, cfg.prefix_mode)
    if plan.reason:
        head = "the fused LM head" if plan.head == "fused" else "the model's own logits"
        say(world, f"{PROG}: warning: --prefix-mode {cfg.prefix_mode}: {type(model).__name__} trains with mode "
                   f"{plan.mode} and {head}: {plan.reason}")  # fmt: skip
    return plan, time.time() - t0


def micro_batches_per_epoch(n_queries: int, cfg: TrainConfig, world) -> int:
    """With one process the last micro-batch of an epoch takes what is left. With several, every rank must have the
    same number of groups (the averaged gradient is then the mean over all groups), so an epoch deals whole global
    micro-batches of --batch-size x processes only."""
    if world.size == 1:
        return math.ceil(n_queries / cfg.batch_size)
    per_epoch, left_out = divmod(n_queries, cfg.batch_size * world.size)
    if per_epoch == 0:
        raise InputError(f"{n_queries} training queries do not fill one micro-batch of --batch-size {cfg.batch_size} on "
                         f"each of {world.size} processes ({cfg.batch_size * world.size} queries): lower --batch-size")  # fmt: skip
    if left_out:
        say(world, f"{PROG}: warning: {n_queries} training queries are not a multiple of --batch-size x processes "
                   f"({cfg.batch_size} x {world.size}): each epoch leaves out the last {left_out} of its shuffled order, "
                   f"so that every rank gets {cfg.batch_size} queries a micro-batch")  # fmt: skip
    return per_epoch


def make_optimizer(model, cfg: TrainConfig, max_steps: int):
    """AdamW (no weight decay on biases and norms) and transformers' warm-up + cosine / linear / constant schedule."""
    from transformers import get_scheduler

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * max_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)


# ----------------------------------------------------------------------------------------------------------
# The loop's pieces


def batch_indices(cfg: TrainConfig, world, micro_per_epoch: int, position: int, n_queries: int, rank: int | None = None) -> list[int]:
    """The share of `rank` (default: this rank) of micro-batch `position`, counted from the start of training: a
    fresh order each epoch."""
    rank = world.rank if rank is None else rank
    epoch, i = divmod(position, micro_per_epoch)
    order = torch.randperm(n_queries, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    first = i * cfg.batch_size * world.size + rank * cfg.batch_size
    return order[first : first + cfg.batch_size].tolist()


def micro_batch(train_data: list, indices: list[int], cfg: TrainConfig, pad_id: int, device):
    return pack_examples([train_data[i] for i in indices], max_tokens=cfg.row_tokens, pad_token_id=pad_id).to(device)


def train_step(setup: Setup, state: LoopState, train_data: list) -> tuple[dict, int]:
    """One optimizer step of --grad-accum micro-batches; (the logged numbers of the whole job, its tokens)."""
    from rrhf_fast.metrics import pair_accuracy

    cfg, world = setup.cfg, setup.world
    totals = {"loss": 0.0, "rank_loss": 0.0, "sft_loss": 0.0}
    correct = pairs = step_tokens = 0
    draws = []
    for micro in range(cfg.grad_accum):
        indices = batch_indices(cfg, world, setup.micro_per_epoch, state.data_position, len(train_data))
        if setup.online is None:
            batch = micro_batch(train_data, indices, cfg, setup.pad_id, world.device)
        else:
            draws.append(draw_online(setup, state.data_position, indices))
            batch = pack_examples(draws[-1].groups, max_tokens=cfg.row_tokens, pad_token_id=setup.pad_id).to(world.device)
        state.data_position += 1
        with distributed.gradient_sync(setup.train_module, world, sync=micro == cfg.grad_accum - 1):
            with bf16_autocast(world.device, cfg.bf16 and not cfg.fsdp):
                output = setup.train_module(batch)
            loss, sft_loss = output.loss, output.sft_loss
            if draws:  # --sft-min-reward: the groups below the bar keep their ranking term only
                from rrhf_fast.online import gated_loss

                loss, sft_loss = gated_loss(output, batch, draws[-1].sft_kept, setup.loss_options)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {state.step + 1}", checkpoint.latest(cfg.output_dir))
            (loss / cfg.grad_accum).backward()
        for key, value in (("loss", loss), ("rank_loss", output.rank_loss), ("sft_loss", sft_loss)):
            totals[key] += float(value.detach()) / cfg.grad_accum
        c, p = pair_accuracy(output.scores.detach().float().cpu(), batch.rewards.cpu(), batch.cu_groups.cpu())
        correct, pairs = correct + c, pairs + p
        step_tokens += int((batch.group_ids >= 0).sum())
    # the numbers of the whole step: each rank's loss is the mean over its groups, and they all have as many
    summed = distributed.sum_over_ranks([*totals.values(), correct, pairs, step_tokens], world)
    totals = {key: value / world.size for key, value in zip(totals, summed)}
    correct, pairs, step_tokens = (int(v) for v in summed[len(totals) :])
    grad_norm = distributed.clip_grad_norm(setup.model.parameters(), cfg.max_grad_norm, world)
    if not math.isfinite(grad_norm):
        raise NonFiniteLoss(f"non-finite gradient norm ({grad_norm}) at step {state.step + 1}", checkpoint.latest(cfg.output_dir))
    lr = setup.scheduler.get_last_lr()[0]
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += step_tokens
    row = dict(**totals, rank_acc=correct / pairs if pairs else float("nan"), lr=lr, grad_norm=grad_norm)
    if setup.online is not None:
        from rrhf_fast.online import step_figures

        everyone = distributed.gather_objects(draws, world)  # every rank's draws, on rank 0
        if world.is_main:
            row.update(step_figures([d for rank in everyone for d in rank], setup.online.rewards.names))
            row["prompts"] = state.data_position * cfg.batch_size * world.size
    return row, step_tokens


def draw_online(setup: Setup, position: int, indices: list[int]):
    """The sampled and scored groups of this rank's share of micro-batch `position` (rrhf_fast.online.Source.draw).

    The prompts drawn in a run are numbered in order, every rank's share of every micro-batch, so that this rank's
    j-th prompt of micro-batch m is prompt m x batch x processes + rank x batch + j and samples from the generator
    rrhf_fast.sample gives a queries file's line of that number. Under FSDP2 a forward is a collective over every
    rank's shard: every rank then samples the whole micro-batch (all ranks' prompts, so that all run the same
    forwards, inside the root's hooks) and keeps its own share."""
    cfg, world = setup.cfg, setup.world
    share = cfg.batch_size
    first = position * share * world.size
    if not world.fsdp:
        positions = [first + world.rank * share + j for j in range(len(indices))]
        with bad_input():  # a reward that raises or gives no finite number: the prompt named
            return setup.online.draw(setup.model, indices, positions)
    everyone = [batch_indices(cfg, world, setup.micro_per_epoch, position, len(setup.online), rank=r) for r in range(world.size)]
    all_indices = [i for rank in everyone for i in rank]
    positions = list(range(first, first + len(all_indices)))
    run = functools.partial(distributed.run_on_full_model, setup.train_module, world)
    with bad_input():
        whole = setup.online.draw(setup.model, all_indices, positions, generate=run)
    return whole.share(world.rank * share, (world.rank + 1) * share, cfg.num_generations, cfg.max_completion_length)


def measure(setup: Setup, held_out: HeldOut) -> dict:
    """Ranking accuracy on the evaluation set, and the mean reward and exact fraction of greedy answers where there is
    a reward."""
    from rrhf_fast.metrics import greedy_answers, mean_reward, ranking_accuracy

    cfg, model = setup.cfg, setup.model
    with bf16_autocast(setup.world.device, cfg.bf16 and not cfg.fsdp):
        if held_out.online is not None:  # prompts without candidates: the reward of the greedy answers
            from rrhf_fast.online import greedy_reward

            with bad_input():
                return greedy_reward(model, held_out.online, batch_size=cfg.eval_batch_size)
        result = {"rank_acc": ranking_accuracy(
            model, held_out.examples, batch_size=cfg.eval_batch_size, mode=cfg.prefix_mode,
            loss_options=setup.loss_options, max_tokens=cfg.row_tokens, pad_token_id=setup.pad_id,
        )}  # fmt: skip
        if held_out.reward_fn is not None:
            queries, reward_fn = held_out.queries, held_out.reward_fn
            answers = greedy_answers(model, setup.tokenizer, queries, batch_size=cfg.eval_batch_size, max_new_tokens=8)
            result["reward"] = mean_reward(reward_fn, queries, answers)
            result["exact"] = sum(reward_fn(q, a) == 1.0 for q, a in zip(queries, answers)) / len(answers)
    return result


def log_row(setup: Setup, row: dict) -> None:
    """A line of metrics.jsonl, and the same scalars to --report-to's libraries (rank 0 only)."""
    checkpoint.append_jsonl(os.path.join(setup.cfg.output_dir, "metrics.jsonl"), row)
    setup.reporter.log(row)


def evaluate(setup: Setup, held_out: HeldOut, step: int) -> tuple[dict | None, float]:
    """(the evaluation set's numbers at `step`, on rank 0, None on the others; seconds taken), logged to
    metrics.jsonl as a record of type held_out.kind."""
    t0 = time.time()
    result = distributed.run_on_full_model(setup.train_module, setup.world, functools.partial(measure, setup, held_out))
    if setup.world.is_main:
        log_row(setup, {"type": held_out.kind, "step": step, **result})
    return result, time.time() - t0


def save_checkpoint(setup: Setup, state: LoopState) -> str:
    path = checkpoint.write(
        setup.cfg.output_dir, state, model=setup.model, tokenizer=setup.tokenizer, train_module=setup.train_module,
        optimizer=setup.optimizer, scheduler=setup.scheduler, world=setup.world, config=asdict(setup.cfg),
        micro_per_epoch=setup.micro_per_epoch,
    )  # fmt: skip
    if setup.world.is_main:
        checkpoint.prune(setup.cfg.output_dir, setup.cfg.save_total_limit)
    return path


def resume(setup: Setup, resume_from: str) -> LoopState:
    """The loop state of the checkpoint, with its optimizer, schedule and RNG states; metrics.jsonl cut back to it."""
    state = checkpoint.load(resume_from, train_module=setup.train_module, optimizer=setup.optimizer,
                            scheduler=setup.scheduler, world=setup.world)  # fmt: skip
    metrics_path = os.path.join(setup.cfg.output_dir, "metrics.jsonl")
    if setup.world.is_main:
        rows = checkpoint.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
        with open(metrics_path, "w", encoding="utf-8") as f:
            f.writelines(checkpoint.json_line(r) + "\n" for r in rows if r["step"] <= state.step)
    changed = config.changed_settings(setup.cfg, checkpoint.load_json(os.path.join(resume_from, "train_config.json")))
    if changed:
        say(setup.world, f"{PROG}: warning: --resume with settings other than the checkpoint's: {', '.join(changed)}")
    say(setup.world, f"resuming from {resume_from} (step {state.step} of {setup.cfg.max_steps})")
    return state


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill) while training: remembered, so that the
    loop saves a checkpoint at the next step boundary and exits 128 + the signal. A second one stops at once."""

    def __enter__(self):
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def stop(self, world) -> int | None:
        """The signal any rank received (every rank stops at the same step), or None."""
        return int(max(distributed.sum_over_ranks([self.received or 0], world)) or 0) or None


def plot_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = checkpoint.read_jsonl(metrics_path)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] in ("eval", "train_set")]
    where = "training-set queries" if any(r["type"] == "train_set" for r in evals) else "held-out"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    for key in ("loss", "rank_loss", "sft_loss"):
        axes[0].plot(steps, [r[key] for r in train], label=key)
    axes[0].set_title("training loss")
    nan = float("nan")  # null in the file: a batch without a pair
    axes[1].plot(steps, [nan if r.get("rank_acc") is None else r["rank_acc"] for r in train], label="train batch", alpha=0.6)
    axes[1].plot([r["step"] for r in evals], [nan if r.get("rank_acc") is None else r["rank_acc"] for r in evals], "o-", label=where)
    axes[1].set_title("ranking accuracy")
    if any("reward" in r for r in evals):
        axes[2].plot([r["step"] for r in evals], [r.get("reward") for r in evals], "o-", label="greedy reward")
        axes[2].set_title(f"{where} greedy reward")
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
# The run


@dataclass
class Given:
    """What rrhf_fast.trainer.RRHFTrainer passes as objects rather than flags: a loaded model and tokenizer (instead
    of --model's directory) and reward functions (callables, or reward-model paths, instead of --reward)."""

    model: object | None = None
    tokenizer: object | None = None
    reward_funcs: list | None = None


def main(argv=None, given: Given | None = None) -> int:
    t_start = time.time()
    cfg = config.resolve(argv)
    given = given or Given()
    with bad_input():
        loading.device(cfg.device)  # --device cuda without CUDA, --device foo: one line, before anything starts
        world = distributed.init(cfg.device, fsdp=cfg.fsdp, timeout_s=cfg.ddp_timeout)
    out, device = cfg.output_dir, world.device
    if cfg.resume and is_finished(out):
        say(world, f"{out}: the run is finished (summary.json, final/); nothing to resume, nothing changed")
        return 0
    check_inputs(cfg)
    resume_from = claim_output_dir(cfg, world)
    distributed.barrier(world)  # rank 0 has cleared the old checkpoints

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    texts = read_data(cfg, world)
    if given.model is not None:  # a loaded model (rrhf_fast.trainer), trained in place; a checkpoint's weights into it
        model, tokenizer = given.model, given.tokenizer
        if resume_from is not None and not cfg.lora_r and not cfg.fsdp:  # (an adapter comes back in wrap_model)
            with bad_input("--resume: "):
                checkpoint.load_weights(model, resume_from)
    else:
        model, tokenizer = load_model(cfg, resume_from, world)
    if texts.online:  # the prompts to sample from, and the rewards
        rewards = load_rewards(cfg, world, given.reward_funcs) if given.reward_funcs is not None else None
        source, held_out = tokenize_prompts(texts, model, tokenizer, cfg, world, rewards)
        train_data = list(range(len(source)))  # the loop deals prompt indices; the source makes their groups
    else:
        source, (train_data, held_out) = None, tokenize_data(texts, tokenizer, cfg, world)
    del texts  # the text of the whole set: the loop needs only its tokens (and held_out's queries)
    micro_per_epoch = micro_batches_per_epoch(len(train_data), cfg, world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the probe's batch: rank 0's share of the first micro-batch, the same on every rank, so that all plan alike
    first_indices = batch_indices(cfg, world, micro_per_epoch, 0, len(train_data), rank=0)
    if source is None:
        first = micro_batch(train_data, first_indices, cfg, pad_id, "cpu")
    else:  # no sampling before the model is wrapped: candidates cut from the prompts' real tokens
        first = pack_examples(source.probe_groups(first_indices), max_tokens=cfg.row_tokens, pad_token_id=pad_id)
    model, train_module, loss_options, (plan, probe_s) = wrap_model(model, cfg, resume_from, world, first)
    cfg.max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * micro_per_epoch / cfg.grad_accum))
    if world.is_main:
        checkpoint.save_json(asdict(cfg), os.path.join(out, "train_config.json"))
    optimizer, scheduler = make_optimizer(model, cfg, cfg.max_steps)
    setup = Setup(cfg, world, model, tokenizer, train_module, optimizer, scheduler, loss_options, pad_id, micro_per_epoch,
                  online=source)  # fmt: skip

    metrics_path = os.path.join(out, "metrics.jsonl")
    state = resume(setup, resume_from) if resume_from is not None else None
    if world.is_main:
        setup.reporter = report.open_reporter(cfg.report_to, out, config=asdict(cfg), first_step=state and state.step + 1)
    if state is None:
        if world.is_main:
            open(metrics_path, "w").close()
        state = LoopState(eval_before=evaluate(setup, held_out, 0)[0])
        say(world, f"before training: {checkpoint.json_line(state.eval_before)}")

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="rrhf", dynamic_ncols=True, disable=None if world.is_main else True)
    t_train, eval_seconds, tokens_this_run = time.time(), 0.0, 0
    t_log, tokens_log = time.time(), 0
    sampling_seconds = 0.0  # online: sampling and scoring, the rest of the step being the model's forward and backward
    with StopSignals() as signals:
        while state.step < cfg.max_steps:
            t_step = time.time()
            row, step_tokens = train_step(setup, state, train_data)
            step, tokens_this_run, tokens_log = state.step, tokens_this_run + step_tokens, tokens_log + step_tokens
            if "generation_s" in row:
                row["train_s"] = time.time() - t_step - row["generation_s"] - row["reward_s"]
                sampling_seconds += row["generation_s"] + row["reward_s"]
            if (step % cfg.log_every == 0 or step == cfg.max_steps) and world.is_main:
                tps = tokens_log / max(time.time() - t_log, 1e-9)
                log_row(setup, dict(type="train", step=step, **row, tokens_per_s=tps, peak_mem_mb=peak_memory_mb(device),
                                    epoch=state.data_position / micro_per_epoch))  # fmt: skip
                shown = dict(loss=f"{row['loss']:.3f}", acc=f"{row['rank_acc']:.2f}", tok_s=f"{tps:.0f}")
                if "reward" in row:
                    shown.update(reward=f"{row['reward']:.3f}", zero_std=f"{row['frac_reward_zero_std']:.2f}",
                                 gen_s=f"{row['generation_s']:.1f}", train_s=f"{row['train_s']:.1f}")  # fmt: skip
                bar.set_postfix(**shown)
                if bar.disable:  # no terminal (a log file, a pipe): a plain line instead of the bar
                    print(f"step {step}/{cfg.max_steps} " + " ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr)
                t_log, tokens_log = time.time(), 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                result, seconds = evaluate(setup, held_out, step)
                eval_seconds += seconds
                if world.is_main:
                    bar.write(f"step {step}: {checkpoint.json_line(result)}")
            out_of_time = cfg.max_train_seconds is not None and step < cfg.max_steps and any(distributed.sum_over_ranks(
                [time.time() - t_train - eval_seconds >= cfg.max_train_seconds], world))  # fmt: skip  every rank stops alike
            saved = cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time)
            if saved:
                save_checkpoint(setup, state)
            bar.update(1)
            stopped_by = signals.stop(world) if step < cfg.max_steps else None
            if stopped_by:
                path = checkpoint.latest(out) if saved else save_checkpoint(setup, state)
                bar.close()
                setup.reporter.close()
                say(world, f"{PROG}: stopped by {signal.Signals(stopped_by).name} after step {step}: {path} written; "
                           f"--resume continues from it")  # fmt: skip
                return 128 + stopped_by
            if out_of_time:
                say(world, f"{PROG}: --max-train-seconds {cfg.max_train_seconds:g} reached after step {step} of {cfg.max_steps}")
                break
    bar.close()
    train_wall = time.time() - t_train - eval_seconds

    eval_after, _ = evaluate(setup, held_out, state.step)
    setup.reporter.close()
    say(world, f"after training:  {checkpoint.json_line(eval_after)}")
    weights = distributed.full_model_state(model, world, trained_only=bool(cfg.lora_r))  # FSDP2: gathered on rank 0
    if not world.is_main:
        return 0

    def write_final(tmp):
        checkpoint.save_model(tmp, model, tokenizer, weights, lora=bool(cfg.lora_r), merge=cfg.merge_lora,
                              max_shard_size=cfg.max_shard_size)  # fmt: skip
        checkpoint.save_json(asdict(cfg), os.path.join(tmp, "train_config.json"))

    checkpoint.atomic_dir(os.path.join(out, "final"), write_final)
    plot_curves(metrics_path, os.path.join(out, "curves.png"))
    summary = {
        f"{held_out.kind}_before": state.eval_before, f"{held_out.kind}_after": eval_after, "steps": state.step, "wall_s": time.time() - t_start,
        "train_wall_s": train_wall, "tokens_per_s": tokens_this_run / max(train_wall, 1e-9), "tokens": state.tokens,
        "peak_mem_mb": peak_memory_mb(device), "device": str(device), "resumed_from": resume_from, "processes": world.size,
        "prefix_mode": plan and plan.mode, "head": plan and plan.head, "probe_s": probe_s,
    }  # fmt: skip
    if source is not None:  # online: how the training time of this run split between sampling and the model's step
        summary.update(prompts=state.data_position * cfg.batch_size * world.size, sampling_s=sampling_seconds,
                       update_s=train_wall - sampling_seconds)  # fmt: skip
    checkpoint.save_json(summary, os.path.join(out, "summary.json"))
    say(world, f"wrote {out}/final, summary.json, metrics.jsonl, curves.png in {summary['wall_s']:.1f} s")
    return 0


def cli(argv=None) -> int:
    rank = os.environ.get("RANK", "0")  # under torchrun every rank reports its own errors; say which one speaks
    prog = PROG if rank == "0" else f"{PROG} (rank {rank})"

    def attempt():
        try:
            return run(main, prog, argv)
        except NonFiniteLoss as err:
            message, last = err.args
            kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written yet"
            print(f"{prog}: error: {message}; training stopped ({kept}; lower --learning-rate?)", file=sys.stderr)
            return 3

    return distributed.exit_status(attempt)


if __name__ == "__main__":
    sys.exit(cli())
