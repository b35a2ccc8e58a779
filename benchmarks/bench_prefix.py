"""Prefix sharing: forward + backward of the model body, re-encoding ("none") against "packed" and "kv-cache".

Re-encoding runs k(P + R) tokens through the body per group; sharing the prompt runs P + kR, so the ideal speedup
is k(P + R) / (P + kR) (2.5x at P=384, R=48, k=4). Each mode's measured speedup over "none" is reported as a
fraction of that ideal. What is timed: prefix_forward, then a backward from a fixed random upstream gradient of
the [N, D] hidden states (the LM head and loss cost the same in every mode and are left out).

    python benchmarks/bench_prefix.py                       # small Llama on CPU, P=384, R=48, k=4, two groups
    python benchmarks/bench_prefix.py --threads 1 --clock cpu            # on a shared machine: CPU time, one thread
    python benchmarks/bench_prefix.py --max-tokens 576                   # one group per row (see pack_batch)
    python benchmarks/bench_prefix.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8
    python benchmarks/bench_prefix.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \
        --intermediate 8192 --prompt-len 512 --response-len 128 --groups 8 --max-tokens 1024 --attn flex_attention \
        --modes none,packed --label llama-1b-flex --out benchmarks/results     # also a dated table
    python benchmarks/bench_prefix.py --dry-run --out /tmp/x   # the same on the CPU at a tiny size

The "of ideal" column of the baseline row is 1 / ideal: where re-encoding stands. A mode that cannot run (the model's
attention refuses its mask, out of memory) gets a row saying why. With --out the table is also written there,
<date>-prefix-<label>-<device>.md and .csv; --dry-run (a hidden-64, 2-layer Llama, P = 24, R = 6, one repetition on
the CPU, the rest of the command as given) writes it to --out or a new temporary folder.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import report
from rrhf_fast.batch import pack_batch
from rrhf_fast.prefix import prefix_forward

# --dry-run's model and lengths: bench_step's tiny preset
DRY_RUN = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=512, prompt_len=24, response_len=6)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=384, help="P, tokens per prompt")
    parser.add_argument("--response-len", type=int, default=48, help="R, tokens per candidate")
    parser.add_argument("--k", type=int, default=4, help="candidates per group")
    parser.add_argument("--groups", type=int, default=2, help="groups in the batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="pack_batch's row budget (default packs both groups in one row)")
    parser.add_argument("--hidden", type=int, default=256, help="Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--intermediate", type=int, help="MLP intermediate size (default: 8/3 of --hidden, a multiple of 8)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flex_attention)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: this process's CPU time, which with --threads 1 leaves out the time other "
        "processes take the core (use it on a shared machine; CPU only)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per mode")
    parser.add_argument("--modes", default="none,packed,kv-cache", help="comma-separated modes; the first is the baseline")
    parser.add_argument("--label", default="", help="name in the table's file name, prefix-<label>-<device>")
    parser.add_argument("--out", default=None, help="also write the dated table into this folder")
    parser.add_argument("--dry-run", action="store_true", help="this command on the CPU at a tiny size; table to --out")
    args = parser.parse_args(argv)
    if args.dry_run:
        # as many groups a packed row as the command's lengths give
        per_row = max(1, args.max_tokens // (args.prompt_len + args.k * args.response_len))
        args.device, args.repeats, args.warmup, args.clock = "cpu", 1, 1, "wall"
        vars(args).update(DRY_RUN)
        args.max_tokens = per_row * (args.prompt_len + args.k * args.response_len)
        args.out = str(report.out_dir(args.out, True, "bench_prefix"))
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(model, batch, mode, upstream, clock) -> float:
    """Seconds of one forward + backward in `mode`."""
    model.zero_grad(set_to_none=True)
    _sync(upstream.device)
    start = clock()
    hidden = prefix_forward(model, batch, mode)
    hidden.backward(upstream.to(hidden.dtype))
    _sync(upstream.device)
    return clock() - start


def time_modes(model, batch, modes, upstream, repeats, warmup, clock, failed: dict) -> dict[str, list[float]]:
    """Seconds of every timed repetition of each mode that runs (the others' reasons go to `failed`). The modes take
    turns within each round, so that load from other processes on a shared machine falls on all of them alike."""
    modes = list(modes)
    for _ in range(max(warmup, 1)):  # at least once: a mode that cannot run is found before the timed rounds
        modes = [m for m in modes if report.attempt(failed, m, lambda m=m: run_once(model, batch, m, upstream, clock)) is not None]
    times = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(run_once(model, batch, mode, upstream, clock))
    return times


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.prompt_len + args.response_len + 8,
        attn_implementation=args.attn,
    )
    with device:  # initialised where it runs: a 1B model builds in seconds on a GPU, in tens of seconds on its host
        model = LlamaForCausalLM(config).to(dtype=dtype).train()
    prompts = [torch.randint(args.vocab, (args.prompt_len,)).tolist() for _ in range(args.groups)]
    candidates = [[torch.randint(args.vocab, (args.response_len,)).tolist() for _ in range(args.k)] for _ in range(args.groups)]
    rewards = [[float(i) for i in range(args.k)] for _ in range(args.groups)]
    batch = pack_batch(prompts, candidates, rewards, max_tokens=args.max_tokens).to(device)
    upstream = torch.randn(batch.num_tokens, args.hidden, device=device)

    P, R, k = args.prompt_len, args.response_len, args.k
    ideal = k * (P + R) / (P + k * R)
    modes = args.modes.split(",")
    print(
        f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads} vocab={args.vocab} attn={args.attn} "
        f"{args.device} {args.dtype} threads={torch.get_num_threads()} clock={args.clock}; P={P} R={R} k={k} groups={args.groups} "
        f"rows={batch.input_ids.shape[0]}x{batch.input_ids.shape[1]}; ideal speedup {ideal:.3f}x"
    )
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    failed = {}
    times = time_modes(model, batch, modes, upstream, args.repeats, args.warmup, clock, failed)
    # The median is the typical figure; the minimum is the least disturbed by other load on a shared machine.
    rows = []
    for mode in modes:
        row = {"P": P, "R": R, "k": k, "groups": args.groups, "attn": args.attn, "mode": mode, "median ms": "",
               "min ms": "", "speedup": "", "of ideal": "", "speedup (min)": "", "of ideal (min)": "",
               "note": failed.get(mode, "")}  # fmt: skip
        rows.append(row)
        if mode not in times:
            print(f"{mode:>10} did not run: {failed[mode]}")
            continue
        row.update({"median ms": statistics.median(times[mode]) * 1e3, "min ms": min(times[mode]) * 1e3})
        if modes[0] in times:
            median = statistics.median(times[modes[0]]) / statistics.median(times[mode])
            best = min(times[modes[0]]) / min(times[mode])
            row.update({"speedup": median, "of ideal": median / ideal, "speedup (min)": best, "of ideal (min)": best / ideal})
        print(" ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in row.items()))
    if args.out is not None:
        write(args, rows, batch, ideal)


def write(args, rows, batch, ideal):
    """The dated table under --out: prefix-<label>-<device>.md and .csv, with the machine and the command."""
    device = torch.device(args.device).type
    info = report.machine(device)
    where = report.file_device(device)
    command = " ".join(["python benchmarks/bench_prefix.py", *sys.argv[1:]])
    notes = (
        f"Command: `{command}`. " + ("A dry run (tiny sizes on the CPU): the figures measure nothing. " if args.dry_run else "")
        + f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads or args.heads} kv), "
        f"intermediate {args.intermediate or int(args.hidden * 8 / 3) // 8 * 8}, vocab {args.vocab}, {args.dtype}; rows "
        f"{batch.input_ids.shape[0]} x {batch.input_ids.shape[1]}; forward + backward of the body from a random upstream "
        f"gradient, {args.clock} clock, median of {args.repeats} after {args.warmup} warm-up; ideal speedup "
        f"k(P+R)/(P+kR) = {ideal:.3f}; load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}. `speedup`: "
        f"the first mode's time over the mode's; `of ideal`: speedup / ideal; `note`: why a mode did not run."
    )
    name = "prefix-" + (f"{args.label}-" if args.label else "") + where
    path = report.write_table(rows, name, "Prefix sharing: the model body, forward + backward", info, notes, Path(args.out))
    print(f"wrote {path} and {path.with_suffix('.csv')}")

if __name__ == "__main__":
    main()
