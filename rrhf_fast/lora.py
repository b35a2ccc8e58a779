"""LoRA adapters through peft: wrap a causal LM, save and reload its adapter, merge it for a plain checkpoint.

How the trainer uses it (`--lora-r R`, `--lora-alpha`, `--lora-dropout`, `--lora-target-modules`, `--merge-lora`):

    options = LoraOptions(r, alpha, dropout, target_modules)    # checked here: bad values raise ValueError
    model = load the base model (from --model or the embedded default; when resuming, still the base model:
            a LoRA checkpoint holds only the adapter)
    enable gradient checkpointing, if asked, before add_lora (peft then makes the embeddings' output require
            grad, which reentrant checkpointing needs to reach the adapters)
    model = add_lora(model, options)                            # only the adapter parameters require grad
    print(parameter_summary(model))
    resuming: load_adapter_weights(model, checkpoint_dir)       # then the optimizer, scheduler and RNG states
    optimizer over [p for p in model.parameters() if p.requires_grad]
    rrhf_fast.model_loss(model, batch) as for any model: prefix_forward runs the adapters in every mode
    checkpoint-<step>/: save_adapter(model, dir)                # adapter_config.json + adapter_model.safetensors
    final/: save_adapter(model, dir), or with --merge-lora merged_model(model).save_pretrained(dir), which
            plain AutoModelForCausalLM.from_pretrained loads

The defaults follow common LoRA practice for Llama-style models:
    target_modules  "all-linear": every linear (and GPT-2 Conv1D) layer except the LM head; on Llama that is
                    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, on GPT-2 c_attn, c_proj, c_fc.
                    Adapting every linear layer rather than attention alone is what let QLoRA (Dettmers et al.
                    2023) match full fine-tuning. The LM head is never adapted: the fused loss applies the head's
                    weight itself, so an adapter there would be skipped (add_lora refuses it).
    alpha           2 * r: the adapter's output is scaled by alpha / r, so a scale of 2 whatever the rank, as in
                    the usual r=8/alpha=16 and r=16/alpha=32 recipes; a fixed alpha would make the scale, and with
                    it the effective learning rate of the adapter, shrink as r grows.
    dropout         0.05 on the adapter's input, the value of alpaca-lora and QLoRA's larger models: light
                    regularisation for the small preference data sets RRHF trains on.
LoRA usually wants a larger learning rate than full fine-tuning (1e-4 to 2e-4 against the paper's 2e-5).
"""

import json
import math
import os
from dataclasses import dataclass

import torch

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraOptions:
    """r: the adapter rank (>= 1). alpha: the scale numerator (output scaled by alpha / r); None: 2 * r.
    dropout: on the adapter's input, in [0, 1). target_modules: "all-linear", or module names, as a sequence or
    one comma-separated string ("q_proj,v_proj"); a name matches a module whose dotted path ends in it."""

    r: int
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ALL_LINEAR

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r (--lora-r) must be a whole number >= 1, got {self.r!r}")
        alpha = 2 * self.r if self.alpha is None else self.alpha
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha (--lora-alpha) must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {self.dropout!r}")
        names = self.target_modules.split(",") if isinstance(self.target_modules, str) else list(self.target_modules)
        names = tuple(name.strip() for name in names if name.strip())
        if not names:
            raise ValueError(
                f'LoRA target modules (--lora-target-modules) name no module: give "{ALL_LINEAR}" or names such as '
                "q_proj,v_proj"
            )
        # Frozen: set the resolved values the way dataclasses' own __init__ does.
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "target_modules", ALL_LINEAR if names == (ALL_LINEAR,) else names)


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs the peft package, which is not installed: pip install peft") from None
    return peft


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _linear_names(model) -> list[str]:
    """The distinct last names of the model's linear layers, LM head aside: what target_modules can name."""
    head = model.get_output_embeddings()
    names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if _is_linear(m) and m is not head}
    return sorted(names)


def _check_targets(model, names: tuple[str, ...]) -> None:
    """Every name matches a module (peft's rule: the dotted path is the name or ends in "." + name), and none of
    them is the LM head or an input embedding tied to it."""
    modules = dict(model.named_modules())
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    unmatched = []
    for name in names:
        matched = [m for path, m in modules.items() if path == name or path.endswith("." + name)]
        if not matched:
            unmatched.append(name)
        elif any(m is head for m in matched):
            raise ValueError(
                f"LoRA target module {name!r} is the LM head: the fused loss applies the head's weight itself and "
                "would skip its adapter; leave it out of the target modules"
            )
        elif tied and any(m is embeddings for m in matched):
            raise ValueError(
                f"LoRA target module {name!r} is the input embedding, which this model ties to its LM head: merging "
                "its adapter would change the head too; leave it out of the target modules"
            )
    if unmatched:
        raise ValueError(
            f"LoRA target modules {', '.join(unmatched)} match no module of {type(model).__name__}; its linear layers "
            f'are named {", ".join(_linear_names(model)) or "(none)"} (or use "{ALL_LINEAR}")'
        )


def add_lora(model, options: LoraOptions):
    """`model` (a transformers causal LM) wrapped in a peft PeftModel with LoRA adapters on options.target_modules.

    The adapters are injected into `model` in place and its own parameters frozen: only the adapters' A and B
    matrices require grad. B starts at zero, so the wrapped model first computes what `model` did."""
    peft = _import_peft()
    if callable(getattr(model, "get_base_model", None)):
        raise ValueError(f"{type(model).__name__} already carries peft adapters; add LoRA to the plain model")
    if options.target_modules == ALL_LINEAR:
        targets, shown = ALL_LINEAR, ALL_LINEAR
    else:
        _check_targets(model, options.target_modules)
        targets, shown = list(options.target_modules), ",".join(options.target_modules)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module of a type LoRA cannot adapt (a norm, a whole block)
        raise ValueError(f"LoRA target modules {shown}: {' '.join(str(err).split())}") from None
    # "all-linear" leaves the head out by name; check it on the model, whatever the peft version resolved.
    if not isinstance(wrapped.get_output_embeddings(), torch.nn.Linear):
        raise ValueError('LoRA "all-linear" adapted the LM head of this model; name the target modules instead')
    return wrapped


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tensor tied to several modules counts once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model) -> str:
    """One log line: the adapter settings and how many parameters train."""
    trainable, total = parameter_counts(model)
    config = model.peft_config["default"]
    return (
        f"LoRA r={config.r} alpha={config.lora_alpha:g} dropout={config.lora_dropout:g}: {trainable:,} of {total:,} "
        f"parameters trainable ({100 * trainable / total:.2f}%)"
    )


def save_adapter(model, directory: str, state_dict: dict | None = None) -> None:
    """Write the adapter of a PeftModel into `directory`: adapter_config.json and adapter_model.safetensors,
    which peft.PeftModel.from_pretrained(base_model, directory) loads onto the base model. state_dict: the
    model's state (at least its adapter) when the model's own tensors are shards, e.g. under FSDP2
    rrhf_fast.distributed.full_model_state(model, world, trained_only=True) on rank 0."""
    # The full embedding matrices are saved only if asked: the adapters never resize them.
    model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)


def load_adapter_weights(model, directory: str) -> None:
    """Load the adapter saved in `directory` (save_adapter) into a PeftModel made by add_lora with the same
    options: the adapter weights are replaced, the base model is untouched. For resuming a LoRA run."""
    peft = _import_peft()
    from peft.utils import load_peft_weights

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{directory}: no {name}; not a LoRA adapter directory (written by save_adapter)")
    with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
        saved = json.load(f)
    current = model.peft_config["default"]
    for field, flag in (("r", "--lora-r"), ("lora_alpha", "--lora-alpha")):
        if saved.get(field) != getattr(current, field):
            raise ValueError(
                f"{directory}: the adapter was trained with {field}={saved.get(field)}, this model has "
                f"{field}={getattr(current, field)}; resume with the same {flag}"
            )
    device = next(model.parameters()).device
    weights = load_peft_weights(directory, device=str(device))
    try:
        result = peft.set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # shapes that differ: other target modules of the same names, another base model
        raise ValueError(f"{directory}: the adapter does not fit this model: {' '.join(str(err).split())}") from None
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if result.unexpected_keys or missing:
        extra = (result.unexpected_keys or missing)[0]
        raise ValueError(
            f"{directory}: the adapter adapts other modules than this model ({len(result.unexpected_keys)} unknown, "
            f"{len(missing)} missing, e.g. {extra}); resume with the same --lora-target-modules and base model"
        )


def merged_model(model):
    """The plain transformers model with every adapter merged into its weights (W + (alpha / r) B A), ready
    for save_pretrained as a normal Hugging Face checkpoint.

    This merges in place: `model` keeps computing the same function but has no adapter left to save or train.
    The merged parameters require grad again, as in a freshly loaded model."""
    merged = model.merge_and_unload()
    merged.requires_grad_(True)
    return merged
