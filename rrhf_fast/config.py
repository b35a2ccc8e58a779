"""TrainConfig: every flag of `python -m rrhf_fast.train`, its default, help text and Hugging Face spellings.

Each field is the one source of its flag: `--field-name` plus the aliases in its metadata (HF Trainer's
`--learning_rate`, `--per_device_train_batch_size`, ...), its argparse type and its help. The parser is
generated from the fields, so a default is written once. A field that opens a new `--help` section names it
(`section=`); the fields after it belong to that section until the next one.

A few defaults depend on what is trained. They are None in the dataclass and come from one of two presets,
applied in `resolve`:
    EMBEDDED  the embedded tiny Llama (no --model): many short groups, a high learning rate, one CPU thread
    PAPER     a Hugging Face model (--model): the RRHF paper's and original code's settings
"""

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields

from rrhf_fast.cli import InputError, Parser, number
from rrhf_fast.prefix import MODES

PROG = "rrhf_fast.train"
DESCRIPTION = "RRHF training, one flat loop: `python -m rrhf_fast.train [flags]` (`--help` lists them)."

# The embedded default: many short groups, where one packed pass of short rows beats a per-group loop by far, and a
# model so small that a second CPU thread gains little and, on cores shared with other processes, costs a lot (on a
# busy 2-core machine the default run took 37 s with one thread, 107 s with two).
EMBEDDED = dict(learning_rate=3e-3, batch_size=64, prefix_mode="packed", row_tokens=256, threads=1, eval_every=100)
PAPER = dict(learning_rate=2e-5, batch_size=1, prefix_mode="auto", row_tokens=4096, threads=None, eval_every=0)
EMBEDDED_TASK_STEPS = 300  # --max-steps of the embedded model on the built-in task (no --model, no --data)
TASK_QUERIES = 10_000  # distinct queries of the addition task: train + held-out at most this many

POSITIVE_INT, NONNEGATIVE_INT = number(int, 1), number(int, 0)
POSITIVE, NONNEGATIVE = number(float, 0, low_inclusive=False), number(float, 0)


def file_size(text: str) -> int:
    """--max-shard-size: bytes, or a number with KB / MB / GB (powers of 1000) or KiB / MiB / GiB (of 1024)."""
    from transformers.utils.hub import convert_file_size_to_int

    size = convert_file_size_to_int(text.strip())  # ValueError for what it cannot read: argparse's one-line error
    if not isinstance(size, int) or size < 1:
        raise ValueError(text)
    return size


def flag(default, help: str, *aliases: str, type=None, choices=None, section=None, action=None, nargs=None):
    """A TrainConfig field: its default and what its flag needs (help, HF aliases, argparse type, choices; action
    "append" for a flag given once a value, nargs "+" for one that takes several)."""
    meta = dict(help=help, aliases=aliases, type=type, choices=choices, section=section, action=action, nargs=nargs)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    model: str | None = flag(None, "local Hugging Face model directory (AutoModelForCausalLM + AutoTokenizer); default: the embedded tiny Llama", "--model_name_or_path", section="data and model")
    data: str | None = flag(None, "training data: preference records in any format rrhf_fast.data reads (RRHF, TRL listwise / pairwise / implicit prompt, UltraFeedback, Nectar, on-policy), a .jsonl / .json / .parquet file, a save_to_disk directory or a dataset in the local Hugging Face cache; default: the built-in addition task", "--data_path")
    eval_data: str | None = flag(None, "held-out data for ranking accuracy, in the same formats as --data; default: the task's held-out set; with --data and no --eval-data there is no held-out set: the first --eval-max-examples training queries are measured and reported as training-set figures (summary.json train_set_before / train_set_after, metrics.jsonl type train_set, --report-to tags train_set/...), not held-out ones", "--eval_data", "--eval_data_path")
    output_dir: str = flag("out/rrhf", "where checkpoints, final/, metrics and summary go", "--output_dir")
    trust_remote_code: bool = flag(False, "allow custom model code shipped in --model", "--trust_remote_code")
    model_max_length: int = flag(512, "tokens per candidate (prompt + response); longer prompts are cut from the left, responses from the right; at most the model's positions", "--model_max_length", type=POSITIVE_INT)
    data_split: str = flag("train", "split of --data to train on (a save_to_disk DatasetDict or a cached dataset; a file is one split, train)", "--data_split")
    eval_split: str = flag("train", "split of --eval-data to evaluate on (e.g. test); with no --eval-data, --data's split")
    chat_template: str | None = flag(None, "file holding a Jinja chat template, for conversational data (chat messages) and a tokenizer without one; replaces the tokenizer's own", "--chat_template")
    no_data_cache: bool = flag(False, "tokenise the training data afresh every run; by default its tokens are kept in <output-dir>/data/tokenized/, keyed by the data's bytes, the tokenizer's files, the chat template, --model-max-length and the code, and a later run on the same ones loads them instead of tokenising")

    max_steps: int | None = flag(None, f"optimizer steps; overrides --num-train-epochs (embedded default: {EMBEDDED_TASK_STEPS})", "--max_steps", type=POSITIVE_INT, section="optimisation")
    num_train_epochs: float = flag(3.0, "passes over the data when --max-steps is not given", "--num_train_epochs", "--epochs", type=POSITIVE)
    batch_size: int | None = flag(None, "queries per micro-batch, each with all its candidates", "--per_device_train_batch_size", type=POSITIVE_INT)
    grad_accum: int = flag(1, "micro-batches per optimizer step", "--gradient-accumulation-steps", "--gradient_accumulation_steps", type=POSITIVE_INT)
    learning_rate: float | None = flag(None, "peak learning rate (the paper's with --model)", "--learning_rate", "--lr", type=POSITIVE)
    lr_scheduler: str = flag("cosine", "decay after warm-up (transformers.get_scheduler)", "--lr_scheduler_type", choices=["cosine", "linear", "constant"])
    warmup_ratio: float = flag(0.03, "warm-up as a fraction of --max-steps", "--warmup_ratio", type=NONNEGATIVE)
    warmup_steps: int | None = flag(None, "warm-up steps; overrides --warmup-ratio", "--warmup_steps", type=NONNEGATIVE_INT)
    weight_decay: float = flag(0.0, "AdamW weight decay (the paper's: none)", "--weight_decay", type=NONNEGATIVE)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this; 0 turns clipping off", "--max_grad_norm", type=NONNEGATIVE)
    bf16: bool = flag(False, "bfloat16 autocast (weights and optimizer stay float32)")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward to save memory", "--gradient_checkpointing")
    seed: int = flag(0, "seed of the model init (embedded), data order, task data and every RNG", type=NONNEGATIVE_INT)
    device: str = flag("auto", "torch device: cpu, cuda, cuda:N; auto: cuda when available, else cpu")
    threads: int | None = flag(None, "CPU threads for torch", type=POSITIVE_INT)

    length_penalty: float = flag(1.0, "score = sum log p / length ** length_penalty", "--length_penalty", type=NONNEGATIVE, section="the RRHF loss (see rrhf_fast.rrhf_loss)")
    rank_weight: float = flag(1.0, "weight of the pairwise hinge ranking term", "--rrhf_weight", type=NONNEGATIVE)
    sft_weight: float = flag(1.0, "weight of the SFT term on the best candidate", "--sft_weight", type=NONNEGATIVE)
    margin: float = flag(0.0, "hinge margin: max(0, p_i - p_j + margin) for r_i < r_j", type=number(float))
    sft_reduction: str = flag("mean", "mean: SFT term per token; sum: the paper's literal sum", "--sft_reduction", choices=["mean", "sum"])
    prefix_mode: str | None = flag(None, "how the k candidates share their prompt: packed rows with a mask, a kv-cache per group, none (re-encode, the original code's way) or per-candidate (one forward each: slow, exact for any model); auto: the fastest that the exactness check on the first batch passes (rrhf_fast.probe); an explicit mode that fails it is an error", "--prefix_mode", choices=list(MODES))
    loss_backend: str = flag("auto", "rrhf_loss backend: auto is triton on CUDA, torch elsewhere", "--loss_backend", choices=["auto", "triton", "torch", "reference"])
    row_tokens: int | None = flag(None, "packed-row length: whole query groups share a row up to this many tokens; attention costs row_tokens**2 a row", "--row_tokens", type=POSITIVE_INT)

    log_every: int = flag(10, "steps between metrics.jsonl lines", "--logging_steps", type=POSITIVE_INT, section="logging, evaluation and checkpoints")
    eval_every: int | None = flag(None, "steps between held-out evaluations; 0: before and after training only", "--eval_steps", type=NONNEGATIVE_INT)
    eval_batch_size: int = flag(64, "queries per evaluation batch", "--per_device_eval_batch_size", type=POSITIVE_INT)
    eval_max_examples: int = flag(256, "held-out queries evaluated at most", type=POSITIVE_INT)
    max_train_seconds: float | None = flag(None, "stop after this many seconds of training (held-out evaluations and checkpoints not counted) even before --max-steps, then finish as at the last step (final/, summary.json); the schedule still runs over --max-steps", "--max_train_seconds", type=POSITIVE)
    save_every: int = flag(500, "steps between checkpoints (and the last step); 0: only final/", "--save_steps", type=NONNEGATIVE_INT)
    save_total_limit: int | None = flag(None, "keep only the newest N checkpoints (None: keep all)", "--save_total_limit", type=POSITIVE_INT)
    resume: bool = flag(False, "continue from the newest complete checkpoint in --output-dir")
    overwrite_output_dir: bool = flag(False, "start afresh even if --output-dir holds checkpoints or a finished run (they are deleted)", "--overwrite_output_dir")
    report_to: str = flag("none", "also log the metrics.jsonl scalars to tensorboard (event files in <output-dir>/runs/), wandb (offline, files in <output-dir>/wandb/ for `wandb sync`, unless WANDB_MODE=online), all (both) or none", "--report_to", choices=["none", "tensorboard", "wandb", "all"])

    lora_r: int | None = flag(None, "adapter rank; setting it turns LoRA on (default: off, full fine-tuning). LoRA usually wants a larger --learning-rate, 1e-4 to 2e-4", "--lora_r", type=POSITIVE_INT, section="LoRA adapters (peft): train low-rank adapters instead of every weight")
    lora_alpha: float | None = flag(None, "adapter output scaled by alpha / r (default: 2 x --lora-r)", "--lora_alpha", type=POSITIVE)
    lora_dropout: float = flag(0.05, "dropout on the adapters' input, in [0, 1)", "--lora_dropout", type=NONNEGATIVE)
    lora_target_modules: str = flag("all-linear", "all-linear (every linear layer but the LM head: q,k,v,o,gate,up,down_proj on Llama) or comma-separated module names", "--lora_target_modules")
    merge_lora: bool = flag(False, "final/ holds the model with the adapters merged in (loads in plain transformers) instead of the adapter alone", "--merge_lora")

    fsdp: bool = flag(False, "shard weights, gradients and optimizer state over the processes with FSDP2 (one unit per decoder layer), instead of DDP's full copy on each; with --bf16, bf16 compute over fp32 shards; checkpoints sharded (torch.distributed.checkpoint)", section="several processes (launched by torchrun; examples below)")
    ddp_timeout: int = flag(1800, "seconds a rank waits for the others in a collective before the job fails (a hung rank ends the job after this)", "--ddp_timeout", type=POSITIVE_INT)
    cpu_offload: bool = flag(False, "with --fsdp: keep the shards, their gradients and the optimizer step in host memory (FSDP2's CPUOffloadPolicy)")
    max_shard_size: int = flag(5 * 10**9, "bytes in the largest safetensors file of final/ and of non-sharded checkpoints (also 500MB, 5GB, 2GiB)", "--save_max_shard_size", type=file_size)

    reward: list[str] | None = flag(None, "online RRHF: sample the candidates of every step from the model being trained and score them with this reward, module:function (TRL's signature f(prompts, completions, **columns) -> list[float], or rrhf_fast.sample's f(prompt, response) -> float) or task; repeat it for several, summed with --reward-weights. --data then holds prompts (their other columns go to the function)", "--reward_funcs", action="append", section="online RRHF (a reward instead of scored candidates: rrhf_fast.online)")
    reward_model: list[str] | None = flag(None, "online RRHF with a local Hugging Face sequence-classification model as a reward (logit 0 of prompt + completion); repeatable, and combines with --reward (functions first, then models)", "--reward_model", action="append")
    reward_weights: list[float] | None = flag(None, "one weight a reward (--reward ones first, then --reward-model ones): the reward of a completion is sum weight_i x reward_i, as TRL's reward_weights (default: all 1)", "--reward_weights", type=number(float), nargs="+")
    num_generations: int = flag(4, "candidates sampled a prompt at every step (k)", "-k", "--num_generations", type=POSITIVE_INT)
    max_completion_length: int = flag(128, "tokens a sampled candidate (and a held-out greedy answer) at most; prompts are cut from the left to leave them room within --model-max-length", "--max_completion_length", "--max-new-tokens", type=POSITIVE_INT)
    temperature: float = flag(1.0, "sampling temperature; 0: greedy (all k the same)", type=NONNEGATIVE)
    top_p: float = flag(1.0, "nucleus sampling: draw from the most likely tokens whose probabilities reach this", "--top_p", type=number(float, 0, low_inclusive=False))
    reference_column: str | None = flag(None, "a column of --data holding each prompt's reference answer: added to the k samples as one more candidate, scored by the same rewards (the paper's use of the dataset's response)", "--reference_column")
    sft_min_reward: float | None = flag(None, "the SFT term only on groups whose best reward is at least this; a group below it trains with the ranking term only, so that the best of k wrong answers is not imitated (default: off, SFT on every group: on SmolLM2's multiplication task the ranking term alone collapsed the model within 4 steps; a --reference-column answer in every group did best)", "--sft_min_reward", type=number(float))

    task_train_size: int = flag(9000, f"training queries of the addition task (train + held-out at most {TASK_QUERIES})", type=POSITIVE_INT, section="the embedded default (ignored with --model / --data)")
    task_eval_size: int = flag(200, "held-out queries of the addition task", type=POSITIVE_INT)
    tiny_hidden_size: int = flag(96, "hidden size of the embedded Llama (4 heads, so a multiple of 8)", type=POSITIVE_INT)
    tiny_layers: int = flag(2, "layers of the embedded Llama", type=POSITIVE_INT)


# Settings that do not change what a resumed run computes: --resume may differ from the checkpoint's in these
# (--output-dir is where the checkpoint was found; it may be spelt another way).
NOT_RESUMED = ("resume", "overwrite_output_dir", "output_dir", "ddp_timeout", "save_total_limit", "report_to", "max_shard_size",
               "no_data_cache", "max_train_seconds")

TORCHRUN_HELP = """\
several processes, the same flags (a step takes --batch-size x --grad-accum x processes queries):
  torchrun --nproc_per_node 8 -m rrhf_fast.train --model M --data D --bf16              # DDP on 8 GPUs
  torchrun --nproc_per_node 8 -m rrhf_fast.train --model M --data D --bf16 --fsdp       # FSDP2: weights sharded
  torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc_per_node 8 -m rrhf_fast.train ...
                                                       # 2 machines; R = 0 and 1, HOST = node 0's address
  torchrun --nproc_per_node 2 -m rrhf_fast.train --device cpu                           # DDP on CPU (gloo)
  torchrun --nproc_per_node 2 -m rrhf_fast.train --device cpu --fsdp                    # FSDP2 on CPU (gloo)
"""


def default_text(f) -> str:
    """What --help says a field defaults to: the preset values, or the field's own default; '' for None / flags."""
    if f.name in EMBEDDED:
        embedded, paper = EMBEDDED[f.name], PAPER[f.name]
        paper = "torch's own" if paper is None else paper
        return f" (default: {embedded} embedded, {paper} with --model)"
    if f.default is None or f.default is MISSING or isinstance(f.default, bool):
        return ""
    return f" (default: {f.default})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=DESCRIPTION, epilog=TORCHRUN_HELP,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    group = p
    for f in fields(TrainConfig):
        meta = f.metadata
        if meta["section"]:
            group = p.add_argument_group(meta["section"])
        names = ["--" + f.name.replace("_", "-"), *meta["aliases"]]
        kwargs = dict(dest=f.name, default=f.default, help=meta["help"] + default_text(f))
        if isinstance(f.default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"])
            kwargs.update({key: meta[key] for key in ("action", "nargs") if meta[key]})
        group.add_argument(*names, **kwargs)
    return p


def resolve(argv) -> TrainConfig:
    """Flags -> TrainConfig with the preset filled in and the combinations checked (InputError on bad ones)."""
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    for name, value in (EMBEDDED if cfg.model is None else PAPER).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.model is None and cfg.data is None and cfg.max_steps is None:
        cfg.max_steps = EMBEDDED_TASK_STEPS
    if cfg.data is None and cfg.task_train_size + cfg.task_eval_size > TASK_QUERIES:
        raise InputError(f"--task-train-size + --task-eval-size must be at most {TASK_QUERIES} (distinct queries), "
                         f"got {cfg.task_train_size + cfg.task_eval_size}")  # fmt: skip
    if cfg.lora_r is None:
        for name, given in (("--lora-alpha", cfg.lora_alpha is not None), ("--merge-lora", cfg.merge_lora)):
            if given:
                raise InputError(f"{name} needs --lora-r: LoRA is off without an adapter rank")
    else:
        lora_options(cfg)  # checks the values: bad ones are errors before anything loads
        if cfg.fsdp and cfg.merge_lora:
            raise InputError("--merge-lora with --fsdp is not supported: final/ holds the adapter; merge it afterwards with "
                             "peft.PeftModel.from_pretrained(base, 'final').merge_and_unload().save_pretrained(...)")
    online = cfg.reward or cfg.reward_model
    if online and cfg.data is None:
        raise InputError("--reward / --reward-model train on prompts: pass --data with them (prompt-only JSONL, .txt, ...)")
    for name, given in (("--reward-weights", cfg.reward_weights), ("--reference-column", cfg.reference_column),
                        ("--sft-min-reward", cfg.sft_min_reward is not None)):  # fmt: skip
        if given and not online:
            raise InputError(f"{name} is for online RRHF: pass --reward or --reward-model too")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward or []) + len(cfg.reward_model or []):
        raise InputError(f"--reward-weights: {len(cfg.reward_weights)} weights for {len(cfg.reward or []) + len(cfg.reward_model or [])} "
                         f"rewards (--reward and --reward-model); give one a reward")  # fmt: skip
    if cfg.cpu_offload and not cfg.fsdp:
        raise InputError("--cpu-offload offloads FSDP2's shards to host memory: pass --fsdp too")
    if cfg.model is None and cfg.tiny_hidden_size % 8:
        raise InputError(f"--tiny-hidden-size must be a multiple of 8 (4 heads of even size), got {cfg.tiny_hidden_size}")
    return cfg


def lora_options(cfg: TrainConfig):
    """The checked rrhf_fast.lora.LoraOptions of the --lora-* flags."""
    from rrhf_fast.lora import LoraOptions

    try:
        return LoraOptions(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    except ValueError as err:  # lora.py raises ValueError (InputError before it did)
        raise InputError(str(err)) from None


def changed_settings(cfg: TrainConfig, saved: dict) -> list[str]:
    """The settings in which cfg differs from a checkpoint's train_config.json (missing keys: the defaults)."""
    defaults = asdict(TrainConfig())
    return [k for k, v in asdict(cfg).items() if k not in NOT_RESUMED and saved.get(k, defaults[k]) != v]
