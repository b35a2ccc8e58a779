"""Online RRHF from Python, in the shape of TRL's GRPOTrainer: prompts and reward functions in, a better policy out.

    from rrhf_fast.trainer import RRHFConfig, RRHFTrainer

    def reward(prompts, completions, answer, **columns):           # TRL's reward signature
        return [float(str(a) in c[-1]["content"]) for c, a in zip(completions, answer)]

    args = RRHFConfig(output_dir="out/rrhf", num_generations=4, max_completion_length=32, learning_rate=2e-5,
                      per_device_train_batch_size=8)               # 8 completions: 2 prompts x 4 a step
    trainer = RRHFTrainer(model="path/to/model", reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.train()                                               # the trained model in out/rrhf/final

It is the command, not a second loop: RRHFTrainer turns its arguments into rrhf_fast.train's flags (the datasets
written as JSON Lines under output_dir/data/, a model given as an object and the reward functions handed over as
objects) and runs rrhf_fast.train.main on them, so checkpoints, resume, LoRA, torchrun, metrics.jsonl and every
check are the command's. Bad arguments raise ValueError naming the argument (the command's one-line message).

RRHFConfig keeps TRL's names where TRL has the setting. per_device_train_batch_size counts completions, as in
GRPOConfig, so a step takes per_device_train_batch_size / num_generations prompts on each process; max_steps -1
means num_train_epochs passes over the prompts.
"""

import json
import os
from dataclasses import dataclass, fields

from rrhf_fast.cli import InputError


@dataclass
class RRHFConfig:
    """The training arguments (TRL's GRPOConfig names; the RRHF loss's own below them). Every field is a flag of
    `python -m rrhf_fast.train`; see its --help for what each does."""

    output_dir: str = "out/rrhf"
    num_generations: int = 4
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    reward_weights: list | None = None
    logging_steps: int = 10
    eval_steps: int | None = None
    per_device_eval_batch_size: int = 64
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    report_to: str = "none"
    overwrite_output_dir: bool = False
    use_cpu: bool = False
    max_length: int = 512  # prompt + completion tokens (the command's --model-max-length)
    # RRHF's own
    length_penalty: float = 1.0
    rrhf_weight: float = 1.0
    sft_weight: float = 1.0
    margin: float = 0.0
    reference_column: str | None = None
    sft_min_reward: float | None = None
    max_train_seconds: float | None = None
    eval_max_examples: int = 256
    threads: int | None = None

    def prompts_per_step(self) -> int:
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                             f"num_generations ({self.num_generations}): it counts completions, as in TRL's GRPOConfig")  # fmt: skip
        return self.per_device_train_batch_size // self.num_generations


# RRHFConfig field -> rrhf_fast.train flag, where the names differ
_FLAGS = {
    "max_completion_length": "--max-completion-length", "gradient_accumulation_steps": "--grad-accum",
    "lr_scheduler_type": "--lr-scheduler", "logging_steps": "--log-every", "eval_steps": "--eval-every",
    "per_device_eval_batch_size": "--eval-batch-size", "save_steps": "--save-every", "max_length": "--model-max-length",
    "rrhf_weight": "--rank-weight",
}  # fmt: skip
_NOT_FLAGS = ("per_device_train_batch_size", "max_steps", "use_cpu", "reward_weights", "output_dir")


def _write_jsonl(dataset, path: str) -> str:
    """A dataset (datasets.Dataset, a list of dicts, or a file path, returned as it is) as JSON Lines at `path`."""
    if isinstance(dataset, (str, os.PathLike)):
        return os.fspath(dataset)
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("train_dataset / eval_dataset: expected rows as dicts with a 'prompt' (a datasets.Dataset, a list of dicts or a file path)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _is_path(f) -> bool:
    return isinstance(f, (str, os.PathLike))


def _lora_flags(peft_config) -> list[str]:
    """peft.LoraConfig -> the command's --lora-* flags."""
    if peft_config is None:
        return []
    targets = peft_config.target_modules
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets)) if targets else "all-linear"
    return ["--lora-r", str(peft_config.r), "--lora-alpha", str(peft_config.lora_alpha),
            "--lora-dropout", str(peft_config.lora_dropout), "--lora-target-modules", targets]  # fmt: skip


class RRHFTrainer:
    """RRHFTrainer(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, peft_config).train()

    model            a local Hugging Face model directory, or a loaded causal LM (trained in place; give its
                     tokenizer as processing_class)
    reward_funcs     a function or a list: TRL's f(prompts, completions, **columns) -> list[float] (or
                     rrhf_fast's f(prompt, response) -> float), or a path to a sequence-classification reward model
    train_dataset    prompts: a datasets.Dataset, a list of dicts ({"prompt": text or chat messages, other columns
                     go to the rewards}) or a file path; eval_dataset the same, for the held-out greedy reward
    peft_config      a peft.LoraConfig: train LoRA adapters instead of every weight
    """

    def __init__(self, model, reward_funcs, args: RRHFConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):  # fmt: skip
        self.args = args or RRHFConfig()
        if train_dataset is None:
            raise ValueError("train_dataset: give the prompts to train on")
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for f in self.reward_funcs:
            if not (callable(f) or isinstance(f, (str, os.PathLike))):
                raise ValueError(f"reward_funcs: {f!r} is neither a function nor a reward model path")
        if not isinstance(model, (str, os.PathLike)) and processing_class is None:
            raise ValueError("processing_class: give the tokenizer of a model passed as an object")
        self.model, self.processing_class, self.peft_config = model, processing_class, peft_config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

    def command_line(self) -> list[str]:
        """The rrhf_fast.train flags this trainer runs (the datasets written under output_dir/data/)."""
        a = self.args
        data = os.path.join(a.output_dir, "data")
        argv = ["--output-dir", a.output_dir, "--data", _write_jsonl(self.train_dataset, os.path.join(data, "train.jsonl")),
                "--batch-size", str(a.prompts_per_step())]  # fmt: skip
        if self.eval_dataset is not None:
            argv += ["--eval-data", _write_jsonl(self.eval_dataset, os.path.join(data, "eval.jsonl"))]
        if isinstance(self.model, (str, os.PathLike)):
            argv += ["--model", os.fspath(self.model)]
        if a.max_steps is not None and a.max_steps > 0:
            argv += ["--max-steps", str(a.max_steps)]
        if a.use_cpu:
            argv += ["--device", "cpu"]
        for i in self._order():  # recorded in train_config.json; the objects themselves are handed over
            f = self.reward_funcs[i]
            name = os.fspath(f) if _is_path(f) else f"{getattr(f, '__module__', '?')}:{getattr(f, '__qualname__', type(f).__name__)}"
            argv += ["--reward-model" if _is_path(f) else "--reward", name]
        if a.reward_weights is not None:
            if len(a.reward_weights) != len(self.reward_funcs):
                raise ValueError(f"reward_weights: {len(a.reward_weights)} weights for {len(self.reward_funcs)} reward_funcs; give one a function")
            argv += ["--reward-weights", *(str(a.reward_weights[i]) for i in self._order())]
        for f in fields(a):
            value = getattr(a, f.name)
            if f.name in _NOT_FLAGS or value is None:
                continue
            flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
            if isinstance(value, bool):
                argv += [flag] if value else []
            else:
                argv += [flag, str(value)]
        return argv + _lora_flags(self.peft_config)

    def _order(self) -> list[int]:
        """The reward functions in the command's order: --reward ones (functions) before --reward-model ones (paths)."""
        funcs = self.reward_funcs
        return [i for i, f in enumerate(funcs) if not _is_path(f)] + [i for i, f in enumerate(funcs) if _is_path(f)]

    def train(self, resume_from_checkpoint: bool = False) -> dict:
        """Run rrhf_fast.train.main on command_line(); returns its summary.json (held-out reward before and after,
        steps, seconds). resume_from_checkpoint=True continues from the newest checkpoint in output_dir."""
        from rrhf_fast import train

        argv = self.command_line() + (["--resume"] if resume_from_checkpoint else [])
        model = None if isinstance(self.model, (str, os.PathLike)) else self.model
        ordered = [os.fspath(f) if _is_path(f) else f for f in (self.reward_funcs[i] for i in self._order())]
        given = train.Given(model=model, tokenizer=self.processing_class, reward_funcs=ordered)
        try:
            status = train.main(argv, given)
        except InputError as err:
            raise ValueError(str(err)) from None
        if status != 0:
            raise RuntimeError(f"rrhf_fast.train stopped with status {status}")
        with open(os.path.join(self.args.output_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)
