"""One optimizer step of RRHF training, the original RRHF code's way against rrhf_fast's, over a sweep of P, R and k.

A step is zero_grad, forward, loss, backward and AdamW.step on a Llama built from a config (random weights). Each
batch holds `groups` groups of one prompt of P tokens and k candidates of R tokens. The variants:

    original        every candidate re-encoded after its prompt (k rows of P + R tokens per group), the model's full
                    forward with logits at every position ([k * groups, P + R, V]), the response rows gathered and
                    the naive loss (rrhf_fast.reference.rrhf_loss_from_logits). This is the original RRHF code's
                    step, slightly favoured: its log-softmax ran over all positions, this one over response rows.
    reencode-fused  re-encoded body (prefix_forward mode "none"), fused head loss (rrhf_loss, backend "auto")
    prefix-naive    prefix-shared body (mode "auto"), LM head on the response tokens, naive loss
    ours-packed     prefix-shared body (mode "packed") and fused head: rrhf_fast.model_loss(model, batch, mode=...)
    ours-kv-cache   the same with mode "kv-cache"

`ours` is the one of the last two that mode "auto" picks (marked "(auto)" in the body column): what
rrhf_fast.model_loss(model, batch) runs by default.

Re-encoding runs k(P + R) tokens through the model body per group and sharing the prompt P + kR, so the ideal
speedup of the body is k(P + R) / (P + kR). The table gives every variant's speedup over `original` measured in the
same run and that speedup as a fraction of the ideal (`of ideal`). The head is not the body: `original` runs the LM
head on all k(P + R) positions, the fused variants on the kR response tokens only, and the optimizer step costs the
same in all variants, so the whole-step fraction can pass 1 where the head dominates (large V, small model) and
stays below 1 where the optimizer does. `prefix of ideal` isolates prefix sharing: the speedup of a fused-head
prefix variant over `reencode-fused` (same head, same optimizer), as a fraction of the ideal; the head and the
optimizer do not shrink with sharing, so it stays below 1 by their share of the step.

Times are medians over repeated steps after warm-up (CPU: the variants take turns within each round, so load from
other processes falls on all alike; run as a script, OpenMP waits passively, see below). Peak memory is what one
step adds above the weights and the AdamW state (report.peak_extra_bytes, after a warm-up step); on CPU each variant
is measured in a fresh forked process. Every variant's loss is checked against `original` before anything is timed.
Results go to benchmarks/results/<date>-step-cpu.md and .csv (or step-<gpu>) with the machine, the library
versions, the command and the load average.

    python benchmarks/bench_step.py --threads 2                         # small Llama on CPU, default sweep
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --preset llama-1b
    python benchmarks/bench_step.py --prompt-lens 512 --response-lens 128 --ks 4 --variants original,ours-kv-cache
    python benchmarks/bench_step.py --model ~/.cache/rrhf_fast/smollm2-135m-instruct --label smollm2 --threads 1 \
        --prompt-lens 96 --response-lens 24 --ks 4 --groups 1 --variants original,reencode-fused,ours-kv-cache

--model DIR times a pretrained Hugging Face model (its real vocabulary, depth and weights) instead of a Llama built
from a preset; the token ids are still random, and the table is named step-<label>-<device> (--label names a preset's
table too). --groups takes a list (a sweep dimension, like --ks), --gradient-checkpointing recomputes the layers in
the backward. A variant that cannot run at a point (the probe refuses its mode, it runs out of memory) gets a row
saying why instead of its times, and the others go on. --dry-run runs the same command on the CPU at a tiny size
(preset tiny, P = 24, R = 6, one step each) and writes its table to --out (default: a new temporary folder):

    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --preset llama-1b --prompt-lens 512 \
        --response-lens 128 --ks 4 --groups 8,32 --gradient-checkpointing --label llama-1b-ckpt --no-memory
"""

import argparse
import ctypes
import itertools
import multiprocessing
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads that lose their core to another
# process made single steps 10 to 100 times slower at random. Set before torch loads OpenMP, and only when run as a
# script (importers keep their environment); an explicit value wins.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import report  # noqa: E402
from report import attempt, machine, median_seconds, peak_extra_bytes, write_table  # noqa: E402
from rrhf_fast import model_loss, pack_batch, prefix_forward, reference  # noqa: E402
from rrhf_fast.prefix import resolve_mode  # noqa: E402

# Llama shapes. llama-1b is Llama 3.2 1B (tied embeddings); tiny is for the pytest-benchmark suite.
PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=512),
    "llama-small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, vocab=4096),
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}

# The sweep when --prompt-lens / --response-lens / --ks are not given: a few minutes on a 2-core CPU; on a GPU
# it includes the target point P=512, R=128, k=4.
DEFAULT_SWEEP = {
    "cpu": dict(prompt_lens="128,384", response_lens="32,96", ks="2,4"),
    "cuda": dict(prompt_lens="256,512,1024", response_lens="128", ks="2,4"),
}

# Loss agreement with `original` required before timing, relative to its loss.
LOSS_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model shape (default: llama-small on CPU, llama-1b on CUDA); the flags below override it")
    parser.add_argument("--model", default=None,
                        help="a pretrained Hugging Face model directory to time instead of a preset Llama")
    parser.add_argument("--label", default=None,
                        help="name in the results file, step-<label>-<device> (default: --model's directory name; none for a preset)")
    parser.add_argument("--hidden", type=int, help="Llama hidden size (overrides the preset)")
    parser.add_argument("--layers", type=int, help="Llama layers (overrides the preset)")
    parser.add_argument("--heads", type=int, help="attention heads (overrides the preset)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (overrides the preset)")
    parser.add_argument("--intermediate", type=int, help="MLP intermediate size (overrides the preset)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (overrides the preset)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager or flex_attention")
    parser.add_argument("--prompt-lens", help="comma-separated prompt lengths P to sweep (default: per device)")
    parser.add_argument("--response-lens", help="comma-separated response lengths R to sweep (default: per device)")
    parser.add_argument("--ks", help="comma-separated candidate counts k to sweep (default: per device)")
    parser.add_argument("--groups", default="2", help="comma-separated query groups per batch to sweep")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants to run, from {', '.join(VARIANTS)} (the speedup columns need original)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per variant (CPU) or 100 ms units of do_bench time (CUDA); the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the token ids")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", help="print the table only; write no files")
    parser.add_argument("--dry-run", action="store_true",
                        help="this command on the CPU at a tiny size (preset tiny, P=24, R=6, one step a variant), table to --out")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.model, args.preset, args.repeats, args.warmup = "cpu", None, "tiny", 1, 1
        args.prompt_lens, args.response_lens = "24", "6"
        for name in PRESETS["tiny"]:  # the tiny shape, whatever the command asked for
            setattr(args, name, None)
        args.out = str(report.out_dir(args.out, True, "bench_step"))
    device = torch.device(args.device).type
    if args.model is not None:
        _read_model_shape(args, parser)
    else:
        args.preset = args.preset or ("llama-1b" if device == "cuda" else "llama-small")
        for name, value in PRESETS[args.preset].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in DEFAULT_SWEEP[device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = list(dict.fromkeys(args.variants.split(",")))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def _read_model_shape(args, parser):
    """Fill the shape fields from --model's config.json (for the table and the token range), or exit 2."""
    from transformers import AutoConfig

    directory = os.path.expanduser(args.model)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        parser.error(f"--model {args.model}: no config.json there; give a Hugging Face model directory")
    config = AutoConfig.from_pretrained(directory)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    args.model = directory
    args.label = args.label or os.path.basename(os.path.normpath(directory))
    args.hidden, args.layers, args.vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    args.heads = config.num_attention_heads
    args.kv_heads = getattr(config, "num_key_value_heads", None) or args.heads
    args.intermediate = getattr(config, "intermediate_size", None)


# ----------------------------------------------------------------------------------------------------------------
# The workload.


@dataclass
class Point:
    """One sweep point: P prompt tokens, k candidates of R tokens, in `groups` groups."""

    P: int
    R: int
    k: int
    groups: int

    @property
    def ideal(self) -> float:
        return self.k * (self.P + self.R) / (self.P + self.k * self.R)


@dataclass
class Workload:
    """A point's tokens in both layouts: the packed batch, and the re-encoded rows the original code runs."""

    batch: object  # rrhf_fast.PackedBatch
    reencoded_ids: torch.Tensor  # [C, P + R] prompt then candidate, one row per candidate
    response_rows: torch.Tensor  # [N] row of reencoded_ids whose logits predict targets[n]
    response_cols: torch.Tensor  # [N] position in that row


def sweep_points(args) -> list[Point]:
    lists = [[int(x) for x in str(s).split(",")] for s in (args.prompt_lens, args.response_lens, args.ks, args.groups)]
    return [Point(P, R, k, groups) for P, R, k, groups in itertools.product(*lists)]


def build_model(args, device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        return _checkpointing(model.to(device).train(), args)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=args.preset == "llama-1b",
        attn_implementation=args.attn,
    )
    with torch.device(device):  # initialised where it runs: a 1B model builds in seconds on a GPU
        return _checkpointing(LlamaForCausalLM(config).to(dtype).train(), args)


def _checkpointing(model, args):
    if args.gradient_checkpointing:  # renamed in transformers 5.2x; the old name still works before that
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def build_workload(point: Point, vocab: int, device, seed: int) -> Workload:
    """Random token ids; rewards 0..k-1 in a random order within each group."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab, (point.P,), generator=gen).tolist() for _ in range(point.groups)]
    candidates = [
        [torch.randint(vocab, (point.R,), generator=gen).tolist() for _ in range(point.k)] for _ in range(point.groups)
    ]
    rewards = [torch.randperm(point.k, generator=gen).float().tolist() for _ in range(point.groups)]
    batch = pack_batch(prompts, candidates, rewards, max_tokens=point.P + point.k * point.R).to(device)
    # Row c = prompt of c's group, then c's tokens. Position P - 1 + t predicts response token t.
    rows = [prompt + cand for prompt, cands in zip(prompts, candidates) for cand in cands]
    reencoded_ids = torch.tensor(rows, device=device)
    response_rows = torch.arange(len(rows), device=device).repeat_interleave(point.R)
    response_cols = (point.P - 1 + torch.arange(point.R, device=device)).repeat(len(rows))
    return Workload(batch, reencoded_ids, response_rows, response_cols)


# ----------------------------------------------------------------------------------------------------------------
# The variants: model, workload -> RRHFOutput.


def _naive_loss(logits, batch):
    return reference.rrhf_loss_from_logits(logits, batch.targets, batch.cu_seqlens, batch.rewards, batch.cu_groups)


def original_loss(model, work: Workload):
    logits = model(input_ids=work.reencoded_ids, use_cache=False).logits  # [C, P + R, V]: every position
    return _naive_loss(logits[work.response_rows, work.response_cols], work.batch)


def prefix_naive_loss(model, work: Workload):
    hidden = prefix_forward(model, work.batch, "auto")  # [N, D]
    return _naive_loss(model.get_output_embeddings()(hidden), work.batch)


VARIANTS = {
    "original": ("re-encode", "full logits, naive", original_loss),
    "reencode-fused": ("re-encode", "fused", lambda model, work: model_loss(model, work.batch, mode="none")),
    "prefix-naive": ("auto", "response logits, naive", prefix_naive_loss),
    "ours-packed": ("packed", "fused", lambda model, work: model_loss(model, work.batch, mode="packed")),
    "ours-kv-cache": ("kv-cache", "fused", lambda model, work: model_loss(model, work.batch, mode="kv-cache")),
}


def make_step(model, optimizer, work: Workload, variant: str):
    """One optimizer step of `variant` as a no-argument function returning the loss (a 0-d tensor)."""
    loss_fn = VARIANTS[variant][2]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, work).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def check_losses(model, work: Workload, variants, dtype, failed: dict | None = None) -> dict[str, float]:
    """Every variant's loss on the current weights (no step), after checking it matches `original`'s (or, where
    original cannot run, the first variant's that can). With `failed` a variant that cannot run is left out and
    its reason recorded there; without, its error propagates."""
    with torch.no_grad():
        if failed is None:
            losses = {v: float(VARIANTS[v][2](model, work).loss) for v in variants}
        else:
            losses = {v: attempt(failed, v, lambda v=v: float(VARIANTS[v][2](model, work).loss)) for v in variants}
            losses = {v: loss for v, loss in losses.items() if loss is not None}
    if not losses:
        return losses
    base = "original" if "original" in losses else next(iter(losses))
    tol = LOSS_RTOL[dtype] * max(1.0, abs(losses[base]))
    for v, loss in losses.items():
        if abs(loss - losses[base]) > tol:
            raise AssertionError(f"{v} gives loss {loss:.6g} but {base} gives {losses[base]:.6g}: not comparable")
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Measurement.


def time_steps(steps: dict, device: str, repeats: int, warmup: int, failed: dict | None = None) -> dict[str, float]:
    """Median seconds per step of every variant. CPU: the variants take turns within each round; CUDA: do_bench.
    With `failed`, a variant whose step cannot run is left out, its reason recorded there."""
    run = (lambda v, fn: fn()) if failed is None else (lambda v, fn: attempt(failed, v, fn))
    if device == "cuda":
        seconds = {v: run(v, lambda step=step: median_seconds(step, device, repeats, warmup)) for v, step in steps.items()}
        return {v: t for v, t in seconds.items() if t is not None}
    steps = dict(steps)
    for _ in range(warmup):
        for v, step in list(steps.items()):
            if run(v, lambda step=step: step() is not None) is None:
                del steps[v]
    rounds = {v: [] for v in steps}
    for _ in range(repeats):
        for v, step in list(steps.items()):
            t = run(v, lambda step=step: median_seconds(step, device, repeats=1, warmup=0))
            if t is None:
                del steps[v], rounds[v]
            else:
                rounds[v].append(t)
    return {v: statistics.median(t) for v, t in rounds.items()}


def _memory_of_variant(args, variant: str) -> list[int | None]:
    """Peak bytes one step of `variant` adds at each sweep point, after a warm-up step (runs in its own process);
    None at a point where the step cannot run."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    peaks = []
    for i, point in enumerate(sweep_points(args)):
        step = make_step(model, optimizer, build_workload(point, args.vocab, device, args.seed + i), variant)
        if attempt({}, variant, step) is None:  # allocates the AdamW state, which is not part of a step's peak
            peaks.append(None)
            continue
        if device.type == "cpu":
            # Hand the warm-up's freed pages back to the OS, so that the measured step cannot reuse them unseen.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        peaks.append(attempt({}, variant, lambda: peak_extra_bytes(step, device.type)))
    return peaks


def measure_memory(args, variants) -> dict[str, list[int]]:
    """{variant: [peak bytes per sweep point]}. On CPU each variant runs in a fresh process forked before this one
    has computed anything (call it first), so no variant sees another's freed pages."""
    if args.device == "cuda":
        return {v: _memory_of_variant(args, v) for v in variants}
    peaks = {}
    for v in variants:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            peaks[v] = pool.apply(_memory_of_variant, (args, v))
    return peaks


# ----------------------------------------------------------------------------------------------------------------
# The sweep.


def run_sweep(args) -> tuple[list[dict], dict]:
    """Time every variant at every sweep point; returns the table rows and the machine description."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # First, while this process has computed nothing: forking after torch has started its thread pool is unsafe.
    peaks = None if args.no_memory else measure_memory(args, args.variants)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device.type)
    model = build_model(args, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    auto = resolve_mode(model, "auto")
    bodies = {"re-encode": "re-encode", "packed": "packed", "kv-cache": "kv-cache"}
    bodies[auto] = bodies["auto"] = f"{auto} (auto)"
    rows = []
    for i, point in enumerate(sweep_points(args)):
        work = build_workload(point, args.vocab, device, args.seed + i)
        failed = {}  # variant -> why it cannot run at this point
        check_losses(model, work, args.variants, dtype, failed)
        steps = {v: make_step(model, optimizer, work, v) for v in args.variants if v not in failed}
        seconds = time_steps(steps, device.type, args.repeats, args.warmup, failed)
        tokens = point.groups * point.k * point.R
        for v in args.variants:
            body, head, _ = VARIANTS[v]
            t, peak = seconds.get(v), None if peaks is None else peaks[v][i]
            speedup = seconds["original"] / t if "original" in seconds and t else None
            same_head = seconds.get("reencode-fused") if head == "fused" and body != "re-encode" else None
            row = {
                "P": point.P, "R": point.R, "k": point.k, "groups": point.groups, "variant": v, "body": bodies[body],
                "head": head, "ms/step": "" if t is None else t * 1e3, "resp tok/s": "" if t is None else tokens / t,
                "peak MiB": "" if peak is None else peak / 2**20,
                "speedup": "" if speedup is None else speedup, "ideal": point.ideal,
                "of ideal": "" if v == "original" or speedup is None else speedup / point.ideal,
                "prefix of ideal": "" if same_head is None or t is None else same_head / t / point.ideal,
                "note": failed.get(v, ""),
            }
            rows.append(row)
            print(" ".join(f"{k}={_show(x)}" for k, x in row.items()), flush=True)
    return rows, info


def _show(x):
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def describe(args) -> str:
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    dry = "; a dry run (tiny sizes on the CPU): the figures measure nothing" if args.dry_run else ""
    return _shape(args) + checkpointing + dry


def _shape(args) -> str:
    if args.model is not None:
        return (
            f"{args.label} ({args.model}): hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} "
            f"kv), intermediate {args.intermediate}, vocab {args.vocab}, attn {args.attn}, {args.dtype}, pretrained "
            f"weights, random token ids; {args.groups} groups per batch; AdamW; median of {args.repeats} steps after "
            f"{args.warmup} warm-up"
        )
    return (
        f"Llama ({args.preset} preset) hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), intermediate "
        f"{args.intermediate}, vocab {args.vocab}, attn {args.attn}, {args.dtype}; {args.groups} groups per batch; "
        f"AdamW; median of {args.repeats} steps after {args.warmup} warm-up"
    )


def main(argv=None):
    args = parse_args(argv)
    load_start = _load()
    print(describe(args) + f"; load average {load_start}", flush=True)
    rows, info = run_sweep(args)
    if args.no_write:
        return
    device = torch.device(args.device).type
    where = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    name = "step-" + (f"{args.label}-" if args.label else "") + where
    command = " ".join(["python benchmarks/bench_step.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"Command: `{command}`. " + describe(args) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average (1, 5, 15 min) {load_start} at the start, {_load()} at the end" + ". `speedup`: step time of `original` over the variant's, same run. `ideal` = k(P+R)/(P+kR), "
        "the prefix-sharing bound for the model body; `of ideal` = speedup / ideal (whole step, so the head's saving "
        "also counts); `prefix of ideal`: speedup over `reencode-fused` (same fused head) / ideal. `peak MiB`: what one "
        "step adds above the weights and AdamW state. `note`: why a variant did not run at that point."
    )
    kwargs = {} if args.out is None else {"out_dir": Path(args.out)}
    path = write_table(rows, name, "One RRHF optimizer step: original RRHF against rrhf_fast", info, notes, **kwargs)
    print(f"wrote {path} and {path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
