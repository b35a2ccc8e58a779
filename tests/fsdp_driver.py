"""A small training run through rrhf_fast.distributed, for tests/test_distributed.py to launch under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_driver.py OUT [options]
    fsdp_driver.main([OUT, options...])                  # one process, in the caller's: the reference run

A tiny Llama (2 decoder layers) takes --steps AdamW steps on random groups; every step deals a global batch of
GLOBAL_GROUPS groups, each rank its own consecutive share, so any world size sees the same data. Rank 0 writes
OUT/result.json (the loss of every step, and what the run observed about dtypes and shards) and OUT/final (the
Hugging Face weights, or a LoRA adapter). With --save-every, OUT/checkpoint-<step> are save_checkpoint's
sharded checkpoints; --resume continues from the latest one. --crash-at, --hang-at and --kill-in-save are the
faults of tests/faults.py.
"""

import argparse
import json
import os
import re
import resource

import torch

from rrhf_fast import distributed
from rrhf_fast.batch import pack_batch
from rrhf_fast.default_model import build_model, build_tokenizer
from faults import add_fault_flags, install_faults

GLOBAL_GROUPS = 4
LOSS_OPTIONS = dict(length_penalty=1.0, rank_weight=1.0, sft_weight=1.0, margin=0.0, sft_reduction="mean", backend="torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="FSDP2: bf16 param_dtype; DDP: autocast")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--lora", action="store_true", help="LoRA r=2 on every linear layer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--from-dir", help="rank 0 loads these weights (from_pretrained); with --fsdp the others build on meta")
    parser.add_argument("--every-rank-loads", action="store_true", help="with --from-dir: every rank reads the weights")
    add_fault_flags(parser)
    parser.add_argument("--timeout", type=float, default=60)
    return parser.parse_args(argv)


def make_groups(step: int):
    """The GLOBAL_GROUPS groups of a step: prompts of 1-4 tokens, 1-3 candidates of 1-3 tokens, random rewards."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = lambda n: torch.randint(3, 200, (n,), generator=gen).tolist()  # noqa: E731
    groups = []
    for _ in range(GLOBAL_GROUPS):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        cands = [ids(int(torch.randint(1, 4, (1,), generator=gen))) for _ in range(k)]
        groups.append((ids(int(torch.randint(1, 5, (1,), generator=gen))), cands, torch.rand(k, generator=gen).tolist()))
    return groups


def build(args, world):
    """The model every rank passes to wrap(): rank 0's holds the weights; with --fsdp the others' may be empty."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.from_dir:
        if world.is_main or args.every_rank_loads or not args.fsdp:
            return AutoModelForCausalLM.from_pretrained(args.from_dir, dtype=torch.float32)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.from_dir), dtype=torch.float32)
    model = build_model(build_tokenizer(), seed=0, hidden_size=args.hidden, num_layers=args.layers)
    if args.lora:
        from rrhf_fast.lora import LoraOptions, add_lora

        model = add_lora(model, LoraOptions(r=2, dropout=0.0))
        with torch.no_grad():  # seeded adapters (B starts at zero: random ones make every adapter gradient non-zero)
            gen = torch.Generator().manual_seed(7)
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def latest(out):
    steps = [int(m.group(1)) for n in os.listdir(out) if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def main(argv=None):
    """Without torchrun (a test calling main) it is one process that takes every group of a step."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    world = distributed.init("cpu", fsdp=args.fsdp, timeout_s=args.timeout)
    install_faults(args, world.rank)
    model = build(args, world)
    module = distributed.wrap(model, world, mode="packed", loss_options=LOSS_OPTIONS, bf16=args.bf16 and args.fsdp,
                              cpu_offload=args.cpu_offload)  # fmt: skip
    rss_after_wrap = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    observed = {}
    if args.bf16 and args.fsdp:  # what a decoder layer's linear sees in its forward
        linear = next(m for n, m in model.named_modules() if n.endswith("q_proj") or n.endswith("q_proj.base_layer"))
        linear.register_forward_pre_hook(lambda m, a: observed.update(compute_weight=str(m.weight.dtype), compute_input=str(a[0].dtype)))

    probe = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(5))

    def mean_logit():  # evaluation through the Hugging Face model, before the first training forward and after
        with torch.no_grad():
            return float(model(input_ids=probe).logits.double().mean())

    observed["mean_logit_before"] = distributed.run_on_full_model(module, world, mean_logit)
    step, losses = 0, []
    if args.resume and latest(args.out):
        checkpoint = latest(args.out)
        distributed.load_checkpoint(checkpoint, module, optimizer, world)
        state = json.load(open(os.path.join(checkpoint, "state.json")))
        step, losses = state["step"], state["losses"]
    share = GLOBAL_GROUPS // world.size
    while step < args.steps:
        prompts, cands, rewards = zip(*make_groups(step)[world.rank * share : (world.rank + 1) * share])
        batch = pack_batch(list(prompts), list(cands), list(rewards))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16 and not args.fsdp, cache_enabled=False):
            output = module(batch)
        output.loss.backward()
        grad_norm = distributed.clip_grad_norm(model.parameters(), 1.0, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append([*distributed.sum_over_ranks([output.loss.item() / world.size], world), grad_norm])
        if args.save_every and step % args.save_every == 0:
            state = {"step": step, "losses": losses}

            def write_rest(tmp):
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(state, f)

            distributed.save_checkpoint(os.path.join(args.out, f"checkpoint-{step}"), module, optimizer, world, write_rest)

    from torch.distributed.tensor import DTensor

    param = next(p for p in model.parameters() if p.requires_grad)
    observed.update(
        param_dtype=str(param.dtype), param_is_shard=isinstance(param, DTensor),
        local_numel=(param.to_local() if isinstance(param, DTensor) else param).numel(), numel=param.numel(),
        optimizer_dtype=str(next(iter(optimizer.state.values()))["exp_avg"].dtype),
    )  # fmt: skip
    observed["mean_logit_after"] = distributed.run_on_full_model(module, world, mean_logit)
    weights = distributed.full_model_state(model, world, trained_only=args.lora)
    if world.is_main:
        final = os.path.join(args.out, "final")
        if args.lora:
            from rrhf_fast.lora import save_adapter

            save_adapter(model, final, state_dict=weights)
        else:
            model.save_pretrained(final, state_dict=weights)
    peak = distributed.gather_objects([rss_after_wrap, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], world)
    if world.is_main:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"losses": losses, "observed": observed, "peak_rss_kib": peak, "world_size": world.size}, f)


if __name__ == "__main__":
    distributed.exit_status(lambda: main() or 0)
