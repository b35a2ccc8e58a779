"""The exactness probe under bf16 autocast: which plan it chooses on a model, and what it costs in training steps.

For each --models entry (a Llama of one of bench_step's presets with random weights, or a Hugging Face model
directory such as the prepared SmolLM2), with fp32 master weights on --device and every forward under
torch.autocast(bfloat16) without the weight cache, as `rrhf_fast.train --bf16` runs it:

    warm-up     one plain forward and backward of the model (CUDA context, cuBLAS), so the probe pays for itself only
    probe       rrhf_fast.probe.plan(model, batch, mode): the first call on the model probes; the plan's mode, head and
                reason are all that is read of it
    first step  the training step it precedes: zero_grad, rrhf_fast.model_loss (which finds the plan cached), backward,
                AdamW.step
    step        the median of --steps further steps
    cost        probe seconds / step seconds: what the probe costs, once per model, in training steps

The batch is --groups groups of a prompt of P tokens and k candidates of R tokens (random ids; bench_step's workload).

    python benchmarks/bench_probe_cost.py --device cuda --models llama-1b,~/.cache/rrhf_fast/smollm2-135m-instruct
    python benchmarks/bench_probe_cost.py --dry-run --out /tmp/x    # the tiny preset on the CPU (bf16 autocast there too)

Results: benchmarks/results/<date>-probe-<device>.md and .csv.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import bench_step
import report
from rrhf_fast import model_loss, probe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-1b", help=f"comma-separated: presets ({', '.join(bench_step.PRESETS)}) "
                   "or Hugging Face model directories; a directory that is not there is skipped, and said")
    p.add_argument("--mode", default="auto", help="the prefix mode asked of the probe (default auto)")
    p.add_argument("--prompt-len", type=int, default=512, help="P")
    p.add_argument("--response-len", type=int, default=128, help="R")
    p.add_argument("-k", type=int, default=4, help="candidates a group")
    p.add_argument("--groups", type=int, default=2, help="groups in the batch")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after the first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the dated table (default benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="the tiny preset (and the directories given) on the CPU at "
                   "P = 24, R = 6, one timed step; table to --out (default: a new temporary folder)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.dry_run:
        args.device, args.prompt_len, args.response_len, args.steps = "cpu", 24, 6, 1
        args.models = ["tiny"] + [m for m in args.models if m not in bench_step.PRESETS]
    args.out = report.out_dir(args.out, args.dry_run, "bench_probe")
    return args


def bf16_autocast(device: torch.device):
    """rrhf_fast.train --bf16's region: bfloat16 autocast over fp32 weights, without the weight cache."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def load(spec: str, args, device):
    """(model in fp32 on device, training mode; its name; its vocabulary), or None for a directory that is not there."""
    if spec in bench_step.PRESETS:
        shape = argparse.Namespace(preset=spec, model=None, attn="sdpa", seed=args.seed, gradient_checkpointing=False,
                                   **bench_step.PRESETS[spec])  # fmt: skip
        return bench_step.build_model(shape, device, torch.float32), f"Llama, {spec} preset (random weights)", shape.vocab
    path = os.path.expanduser(spec)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    return model, os.path.basename(os.path.normpath(path)), model.get_output_embeddings().weight.shape[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def measure(model, batch, args, device) -> dict:
    """The probe's plan and seconds, the first step's seconds and the median of the next --steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with bf16_autocast(device):  # warm-up: the model's own forward, which the probe does not cache anything from
        logits = model(input_ids=batch.input_ids[:1], use_cache=False).logits
    logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    with bf16_autocast(device):
        plan, probe_s = timed(lambda: probe.plan(model, batch, args.mode), device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with bf16_autocast(device):
            loss = model_loss(model, batch, mode=args.mode).loss
        loss.backward()
        optimizer.step()

    first_s = timed(step, device)[1]
    step_s = statistics.median(timed(step, device)[1] for _ in range(args.steps))
    return {"plan mode": plan.mode, "plan head": plan.head, "plan reason": plan.reason or "(first choice)",
            "probe s": probe_s, "first step s": first_s, "step s": step_s, "probe / step": probe_s / step_s}  # fmt: skip


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    point = bench_step.Point(args.prompt_len, args.response_len, args.k, args.groups)
    rows, skipped = [], []
    for spec in args.models:
        loaded = load(spec, args, device)
        if loaded is None:
            skipped.append(spec)
            print(f"{spec}: no model directory there; skipped", flush=True)
            continue
        model, name, vocab = loaded
        batch = bench_step.build_workload(point, vocab, device, args.seed).batch
        row = {"model": name, "P": point.P, "R": point.R, "k": point.k, "groups": point.groups, "mode asked": args.mode,
               **measure(model, batch, args, device)}  # fmt: skip
        rows.append(row)
        print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not rows:
        raise SystemExit(f"bench_probe: none of --models {','.join(args.models)} is there")
    info = report.machine(device.type)
    where = report.file_device(device.type)
    command = " ".join(["python benchmarks/bench_probe_cost.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"Command: `{command}`. " + ("A dry run (tiny sizes on the CPU): the figures measure nothing. " if args.dry_run else "")
        + "fp32 master weights, bf16 autocast without the weight cache (as rrhf_fast.train --bf16), AdamW; random token "
        f"ids; after one warm-up forward and backward of the model. `probe s`: the first rrhf_fast.probe.plan call; "
        f"`first step s`: the training step after it; `step s`: median of {args.steps} more; `probe / step`: the "
        "probe's cost in training steps, paid once per model, mode, dtype and checkpointing setting."
        + (f" Not there, skipped: {', '.join(skipped)}." if skipped else "")
    )
    path = report.write_table(rows, f"probe-{where}", "The exactness probe under bf16 autocast", info, notes, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
