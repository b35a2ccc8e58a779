"""The RRHF loss head, forward + backward, for every provider against the naive reference.

Each provider turns hidden states [N, D] and an LM head [V, D] into the same RRHF loss over a packed batch
(groups of k = 4 candidates of 64 tokens) and back into gradients of both. Reported per size and provider:
median time after warm-up, time as a multiple of the reference's and of the 6NVD matmul floor measured in
the same run (the three head matmuls, z = h W^T, dz W and dz^T h, at this machine's rate), and the peak
extra memory of one call (CUDA: max_memory_allocated; CPU: resident-set growth in a fresh process per
provider), with and without the gradients of hidden and weight that every provider returns ("scratch").

Providers (each checked against the reference before it is timed; absent libraries are skipped):
    reference           rrhf_fast.reference: full logits, log_softmax, gather, Python loops
    reference-compile   the same under torch.compile
    torch               backend="torch": chunked one-sweep PyTorch path
    triton              backend="triton": the one-sweep path with the Triton elementwise and rank kernels
    triton-two-pass     the two-pass head of sequence_scores: chunked cuBLAS matmuls and Triton elementwise kernels
    triton-logits       full logits by one matmul, then the Triton logits-level kernels
    torch-linear-ce     torch's F.linear_cross_entropy(reduction="none", chunked) + our ranking
    liger, cce          Liger-Kernel / Cut Cross-Entropy per-token losses + our ranking

--autocast measures the head as a training step under `rrhf_fast.train --bf16` runs it: hidden states and the LM
head's master weight in float32, the loss under torch.autocast(--dtype), so the gradients every provider returns
are fp32 and "scratch" is what the head holds beyond them (today the fp32 [V, D] accumulator of dW, its bf16
result and the bf16 copy of the weight; where the master weight's .grad became the accumulator, it would be none).

    python benchmarks/bench_loss.py                          # CPU sweep, 2 threads, a few minutes
    python benchmarks/bench_loss.py --device cuda            # GPU sizes: N 2048..16384, D 4096, V 32000/128256, bf16
    python benchmarks/bench_loss.py --device cuda --sizes 8192,4096,128256 --autocast --providers reference,triton
    python benchmarks/bench_loss.py --dry-run --out /tmp/x   # the CUDA path on CPU at a tiny size (interpreted Triton)
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads sleep rather than spin (set before torch loads OpenMP; an explicit value wins): on a
# shared CPU a spinning thread that loses its core makes single calls many times slower at random.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import report  # noqa: E402
import rrhf_fast  # noqa: E402
from rrhf_fast import reference  # noqa: E402
from rrhf_fast.loss import LinearLogprobFunction, rrhf_loss_from_logprobs  # noqa: E402

CANDIDATES_PER_GROUP, TOKENS_PER_CANDIDATE = 4, 64
CPU_PROVIDERS = ["reference", "reference-compile", "torch", "torch-linear-ce"]
CUDA_PROVIDERS = [
    "reference",
    "reference-compile",
    "torch",
    "triton",
    "triton-two-pass",
    "triton-logits",
    "torch-linear-ce",
    "liger",
    "cce",
]


def make_inputs(num_tokens, dim, vocab, dtype, device, seed=0, tokens_per_candidate=TOKENS_PER_CANDIDATE):
    gen = torch.Generator().manual_seed(seed)
    num_candidates = num_tokens // tokens_per_candidate
    x = dict(
        hidden=torch.randn(num_tokens, dim, generator=gen).to(device, dtype).requires_grad_(),
        weight=(torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype).requires_grad_(),
        targets=torch.randint(0, vocab, (num_tokens,), generator=gen).to(device),
        cu_seqlens=torch.arange(0, num_tokens + 1, tokens_per_candidate, device=device),
        rewards=torch.randn(num_candidates, generator=gen).to(device),
        cu_groups=torch.arange(0, num_candidates + 1, CANDIDATES_PER_GROUP, device=device),
    )
    _tie_near_kinks_(x)
    return x


def _tie_near_kinks_(x, gap=1e-3):
    """Give equal rewards to candidates whose scores lie within `gap` of each other, so that no ranked pair sits
    at the hinge's kink.

    The hinge max(0, p_i - p_j) has no gradient at p_i = p_j: there, bf16 rounding of the logits decides which
    side a pair falls on and flips a whole candidate's token gradients (seen on an H100 at N = 8192, V = 32000:
    one pair 7e-5 apart, every provider that rounds logits to bf16 on the other side of the exact answer). A tie
    makes no pair, so the agreement check compares gradients where they are defined; the timing is unchanged.
    """
    with torch.no_grad():
        scores = rrhf_fast.sequence_scores(x["hidden"], x["weight"], x["targets"], x["cu_seqlens"], backend="torch")
    scores, rewards = scores.double().cpu().view(-1, CANDIDATES_PER_GROUP), x["rewards"].cpu().view(-1, CANDIDATES_PER_GROUP)
    for p, r in zip(scores, rewards):
        for i in range(CANDIDATES_PER_GROUP):
            for j in range(i + 1, CANDIDATES_PER_GROUP):
                if abs(p[i] - p[j]) < gap:
                    r[j] = r[i]
    x["rewards"] = rewards.view(-1).to(x["rewards"].device)


def _rank_after(per_token_loss, x):
    """Peers give per-token cross-entropy; our ranking kernel turns -CE (= logp) into the same RRHF loss."""
    return rrhf_loss_from_logprobs(-per_token_loss.float(), x["cu_seqlens"], x["rewards"], x["cu_groups"])


def provider_fn(name):
    """name -> function(inputs) -> RRHFOutput, or raise ImportError where the provider is not installed."""
    if name == "reference":
        return lambda x: reference.rrhf_loss(**x)
    if name == "reference-compile":
        compiled = torch.compile(reference.rrhf_loss)
        return lambda x: compiled(**x)
    if name in ("torch", "triton"):
        return lambda x: rrhf_fast.rrhf_loss(**x, backend=name)
    if name == "triton-two-pass":
        from rrhf_fast import kernels

        def two_pass(x):
            logp = LinearLogprobFunction.apply(x["hidden"], x["weight"], None, x["targets"], kernels)
            return rrhf_loss_from_logprobs(logp, x["cu_seqlens"], x["rewards"], x["cu_groups"], backend="triton")

        return two_pass
    if name == "triton-logits":
        return lambda x: rrhf_fast.rrhf_loss_from_logits(
            x["hidden"] @ x["weight"].T, *(x[k] for k in ("targets", "cu_seqlens", "rewards", "cu_groups")), backend="triton"
        )
    if name == "torch-linear-ce":
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise ImportError("this torch has no chunked F.linear_cross_entropy")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x: _rank_after(
            torch.nn.functional.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none", options=options), x
        )
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda x: _rank_after(
            liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none"), x
        )
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x: _rank_after(linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none"), x)
    raise ValueError(f"unknown provider {name!r}")


def fwd_bwd(fn, x, autocast=None):
    """One forward and backward; with `autocast` (a dtype) the forward runs under torch.autocast as the trainer's
    --bf16 step runs it (no weight cache), the backward outside it."""
    x["hidden"].grad = x["weight"].grad = None
    device = x["hidden"].device.type
    region = torch.autocast(device, dtype=autocast, cache_enabled=False) if autocast else contextlib.nullcontext()
    with region:
        out = fn(x)
    out.loss.backward()
    return out


def agrees_with_reference(fn, x, ref, autocast=None):
    """Loss within 1e-3 relative and gradients within 2% of their scale (bf16 inputs keep ~3 digits)."""
    out = fwd_bwd(fn, x, autocast)
    grads = x["hidden"].grad.float(), x["weight"].grad.float()
    if abs(out.loss.item() - ref["loss"]) > 1e-3 * max(1.0, abs(ref["loss"])):
        return f"loss {out.loss.item():.6g} != reference {ref['loss']:.6g}"
    for name, got, want in zip(("hidden", "weight"), grads, ref["grads"]):
        err = (got - want).abs().max().item() / want.abs().max().item()
        if err > 2e-2:
            return f"d{name} off by {err:.2%} of its scale"
    return ""


_reference_results = {}  # the reference's loss and gradients at the size being measured


def reference_result(x, key, autocast=None):
    """{"loss", "grads"} of the reference on inputs x, computed once a size (make_inputs is deterministic)."""
    if key not in _reference_results:
        _reference_results.clear()  # one size at a time: a large size's gradients take GBs
        out = fwd_bwd(provider_fn("reference"), x, autocast)
        grads = (x["hidden"].grad.float().clone(), x["weight"].grad.float().clone())
        _reference_results[key] = {"loss": out.loss.item(), "grads": grads}
    return _reference_results[key]


def measure(provider, num_tokens, dim, vocab, dtype, device, repeats, check, *, autocast=None,
            tokens_per_candidate=TOKENS_PER_CANDIDATE):
    """Time and memory of one provider at one size: {"seconds", "extra_bytes"} or {"skipped": why}. `dtype` is the
    inputs'; `autocast` (a dtype or None) the forward's autocast region (see fwd_bwd)."""
    try:
        fn = provider_fn(provider)
    except ImportError as err:
        return {"skipped": str(err)}
    x = make_inputs(num_tokens, dim, vocab, dtype, device, tokens_per_candidate=tokens_per_candidate)
    if check and provider != "reference":
        key = (num_tokens, dim, vocab, dtype, device, autocast, tokens_per_candidate)
        problem = agrees_with_reference(fn, x, reference_result(x, key, autocast), autocast)
        if problem:
            raise SystemExit(f"{provider} disagrees with the reference at N={num_tokens}: {problem}")
    fwd_bwd(fn, x, autocast)  # warm-up (and compilation) before the memory measurement
    x["hidden"].grad = x["weight"].grad = None  # so that the peak counts the gradients the call allocates
    extra = report.peak_extra_bytes(lambda: fwd_bwd(fn, x, autocast), device)
    seconds = report.median_seconds(lambda: fwd_bwd(fn, x, autocast), device, repeats=repeats, warmup=0)
    return {"seconds": seconds, "extra_bytes": extra}


def matmul_floor(num_tokens, dim, vocab, dtype, device, repeats):
    """6NVD at this machine's matmul rate: the three head matmuls of a backward pass, each timed on its own.

    z = h W^T ([N, D] x [D, V]), dh = dz W ([N, V] x [V, D]) and dW = dz^T h ([V, N] x [N, D]) do the same
    FLOPs but not at the same speed (the two backward shapes reduce over a long dimension), so the floor is
    their sum, not three times the first.
    """
    # the matmuls see hidden and weight only: the tokens may as well make one group, whatever their number
    x = make_inputs(num_tokens, dim, vocab, dtype, device, tokens_per_candidate=num_tokens // CANDIDATES_PER_GROUP)
    hidden, weight = x["hidden"].detach(), x["weight"].detach()
    dz = torch.randn(num_tokens, vocab, device=device, dtype=dtype)
    shapes = ((hidden, weight.T), (dz, weight), (dz.T, hidden))
    return sum(report.median_seconds(lambda a=a, b=b: a @ b, device, repeats=repeats) for a, b in shapes)


def in_fresh_process(args, provider, size):
    """CPU memory figures need a process of their own: run this script's --child mode and read its JSON line."""
    command = [sys.executable, __file__, "--child", provider, "--sizes", ",".join(map(str, size))]
    command += ["--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    command += [] if args.check else ["--no-check"]
    command += ["--autocast"] if args.autocast else []
    # glibc keeps freed large blocks in the heap once its mmap threshold adapts, which would hide the peak of
    # the timed call behind the warm-up's; a fixed threshold returns every large block to the system.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{provider} failed at {size}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--sizes", nargs="*", help="N,D,V triples (default: the sweep for --device)")
    parser.add_argument("--providers", help="comma-separated providers (default: all for --device)")
    parser.add_argument("--dtype", help="input dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions on CPU; CUDA uses do_bench")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement check")
    parser.add_argument("--autocast", action="store_true",
                        help="a training step's head: fp32 hidden states and master weight, the forward under "
                             "torch.autocast(--dtype) (see above)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CUDA code path (every CUDA provider in this process, a failure recorded, not fatal) on "
                             "the CPU at a tiny size, Triton interpreted; writes its table to --out (default: a new "
                             "temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the dated tables and plot (default benchmarks/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one provider in this process
    args = parser.parse_args(argv)
    if args.dry_run:
        # the kernels choose the interpreter when they are decorated: before anything imports rrhf_fast.kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device, args.sizes, args.repeats, args.threads = "cpu", ["32,24,257"], 1, 1
        args.dtype = args.dtype or "bfloat16"
        args.providers = args.providers or ",".join(CUDA_PROVIDERS)
    args.out = report.out_dir(args.out, args.dry_run, "bench_loss")
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    default_sizes = (
        ["512,512,32000", "1024,512,32000", "2048,512,32000"]
        if cpu
        else [f"{n},4096,{v}" for v in (32000, 128256) for n in (2048, 4096, 8192, 16384)]
    )
    args.sizes = [tuple(int(v) for v in s.split(",")) for s in (args.sizes or default_sizes)]
    args.providers = args.providers.split(",") if args.providers else (CPU_PROVIDERS if cpu else CUDA_PROVIDERS)
    # dry run: four-token candidates, so that a tiny size still holds whole groups of four
    args.tokens_per_candidate = 4 if args.dry_run else TOKENS_PER_CANDIDATE
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    compute = getattr(torch, args.dtype)
    # --autocast: fp32 inputs (the master weight and the residual stream), the matmuls in the autocast dtype
    dtype, autocast = (torch.float32, compute) if args.autocast else (compute, None)
    options = dict(autocast=autocast, tokens_per_candidate=args.tokens_per_candidate)
    if args.child:
        print(json.dumps(measure(args.child, *args.sizes[0], dtype, "cpu", args.repeats, args.check, **options)))
        return

    rows = []
    for size in args.sizes:
        num_tokens, dim, vocab = size
        floor = matmul_floor(*size, compute, args.device, args.repeats)
        results = {}
        for provider in args.providers:
            if args.device == "cpu" and not args.dry_run:
                results[provider] = in_fresh_process(args, provider, size)
            else:
                try:
                    results[provider] = measure(provider, *size, dtype, args.device, args.repeats, args.check, **options)
                except (Exception, SystemExit) as err:  # a peer library that breaks here must not end the sweep
                    results[provider] = {"skipped": f"failed: {str(err)[:300]}"}
                torch.cuda.empty_cache()
            print(size, provider, results[provider], flush=True)
        ref = results.get("reference", {})
        # the gradients of hidden and weight are outputs every provider must allocate (1 GB of dW in bf16 at
        # V = 128256, D = 4096; 2 GB in fp32 under --autocast); what a provider adds beyond them is its scratch
        grad_bytes = (num_tokens + vocab) * dim * dtype.itemsize
        for provider, r in results.items():
            if "skipped" in r:
                continue
            rows.append(
                {
                    "N": num_tokens,
                    "D": dim,
                    "V": vocab,
                    "provider": provider,
                    "ms": r["seconds"] * 1e3,
                    "x reference time": r["seconds"] / ref["seconds"] if "seconds" in ref else float("nan"),
                    "x 6NVD floor": r["seconds"] / floor,
                    "extra MiB": r["extra_bytes"] / 2**20,
                    "x reference memory": r["extra_bytes"] / ref["extra_bytes"] if ref.get("extra_bytes") else float("nan"),
                    "scratch MiB": (r["extra_bytes"] - grad_bytes) / 2**20,
                    "x reference scratch": (r["extra_bytes"] - grad_bytes) / (ref["extra_bytes"] - grad_bytes)
                    if ref.get("extra_bytes", 0) > grad_bytes
                    else float("nan"),
                }
            )
    info = report.machine(args.device)
    name = "loss-" + ("autocast-" if autocast else "") + ("cpu" if args.device == "cpu" else info["device"].replace(" ", "-").lower())
    inputs = f"fp32 inputs under {args.dtype} autocast (a training step's head)" if autocast else f"{args.dtype} inputs"
    command = " ".join(["python benchmarks/bench_loss.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"{inputs}; groups of {CANDIDATES_PER_GROUP} candidates x {args.tokens_per_candidate} tokens; "
        f"fwd+bwd of the loss w.r.t. hidden and weight. Reproduce: `{command}`."
        + (" A dry run: tiny sizes on the CPU, Triton interpreted; the figures measure nothing." if args.dry_run else "")
    )
    skipped = {p: r["skipped"] for p, r in results.items() if "skipped" in r}
    if skipped:
        notes += " Not run here (last size): " + "; ".join(f"{p}: {why}" for p, why in skipped.items()) + "."
    path = report.write_table(rows, name, "RRHF loss head: forward + backward", info, notes, args.out)
    plot(rows, path.with_suffix(".png"))
    print(path.read_text())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocab = rows[0]["V"]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == provider and r["V"] == vocab]
        ns = [r["N"] for r in mine]
        ax_time.plot(ns, [r["ms"] for r in mine], marker="o", label=provider)
        ax_mem.plot(ns, [r["extra MiB"] for r in mine], marker="o", label=provider)
    for ax, label in ((ax_time, "fwd+bwd time (ms)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xlabel("response tokens N")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        if all(line_y > 0 for line in ax.get_lines() for line_y in line.get_ydata()):  # a dry run measures 0 MiB
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"RRHF loss head, D = {rows[0]['D']}, V = {vocab}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
