"""Prefix sharing: forward + backward of the model body, re-encoding ("none") against "packed" and "kv-cache".

Re-encoding runs k(P + R) tokens through the body per group; sharing the prompt runs P + kR, so the ideal speedup
is k(P + R) / (P + kR) (2.5x at P=384, R=48, k=4). Each mode's measured speedup over "none" is reported as a
fraction of that ideal. What is timed: prefix_forward, then a backward from a fixed random upstream gradient of
the [N, D] hidden states (the LM head and loss cost the same in every mode and are left out).

    python benchmarks/bench_prefix.py                       # small Llama on CPU, P=384, R=48, k=4, two groups
    python benchmarks/bench_prefix.py --threads 1 --clock cpu            # on a shared machine: CPU time, one thread
    python benchmarks/bench_prefix.py --max-tokens 576                   # one group per row (see pack_batch)
    python benchmarks/bench_prefix.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8

The "of ideal" column of the baseline row is 1 / ideal: where re-encoding stands.
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rrhf_fast.batch import pack_batch
from rrhf_fast.prefix import prefix_forward


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=384, help="P, tokens per prompt")
    parser.add_argument("--response-len", type=int, default=48, help="R, tokens per candidate")
    parser.add_argument("--k", type=int, default=4, help="candidates per group")
    parser.add_argument("--groups", type=int, default=2, help="groups in the batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="pack_batch's row budget (default packs both groups in one row)")
    parser.add_argument("--hidden", type=int, default=256, help="Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
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
    return parser.parse_args()


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


def time_modes(model, batch, modes, upstream, repeats, warmup, clock) -> dict[str, list[float]]:
    """Seconds of every timed repetition of each mode. The modes take turns within each round, so that load from
    other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for mode in modes:
            run_once(model, batch, mode, upstream, clock)
    times = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(run_once(model, batch, mode, upstream, clock))
    return times


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_len + args.response_len + 8,
        attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
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
    times = time_modes(model, batch, modes, upstream, args.repeats, args.warmup, clock)
    # The median is the typical figure; the minimum is the least disturbed by other load on a shared machine.
    print(f"{'mode':>10} {'median ms':>10} {'min ms':>8} {'speedup':>8} {'of ideal':>9} {'speedup(min)':>13} {'of ideal':>9}")
    for mode in modes:
        median = statistics.median(times[modes[0]]) / statistics.median(times[mode])
        best = min(times[modes[0]]) / min(times[mode])
        print(
            f"{mode:>10} {statistics.median(times[mode]) * 1e3:10.1f} {min(times[mode]) * 1e3:8.1f} "
            f"{median:7.3f}x {median / ideal:9.3f} {best:12.3f}x {best / ideal:9.3f}"
        )

if __name__ == "__main__":
    main()
