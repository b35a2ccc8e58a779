"""Generated tokens/s of rrhf_fast's batched sampler against transformers' generate() and the one-query loop.

The same queries (random ordinary tokens, prompt lengths spread over each --prompt-lens range), k candidates each, up to
--max-new-tokens, temperature / top-p sampling; three contenders, one run:

    ours       rrhf_fast.generation.sample_candidates(batch_size=B): B prompts prefilled once (left-padded), the
               cache repeated to k rows, rows dropped from the batch at their stop token
    generate   transformers model.generate(do_sample=True, num_return_sequences=k) on the same B left-padded
               prompts: it prefills the k copies of each and decodes finished rows until the whole batch ends
    loop       ours at batch_size 1: one query at a time, its k rows a step (the sampler before batching)
    command    the `sample` command after loading (rrhf_fast.sample.sample_queries): ours, plus decoding the text,
               a batched reward (a constant) and the JSON lines written to a file; its tokens are ours' (checked on
               the text), so its tokens/s is ours' tokens over its time

Tokens are counted up to each row's stop token; tokens/s is generated tokens over wall time. `ours` and `loop` must
write the same tokens (a query's draws depend only on the seed and its position); the table counts the queries where
they differ (float32 rounding can move a draw that lands on a boundary). The contenders take turns within each round (CPU load from other processes falls on all
alike); times are medians over --repeats rounds after one warm-up round. The ratios `x generate` and `x loop` are
ours' (and the command's) tokens/s over theirs, from the same run.

    python benchmarks/bench_sample.py                        # the embedded tiny model, batch 16, 1 thread
    python benchmarks/bench_sample.py --models tiny,smollm2-135m,~/.cache/rrhf_fast/smollm2-135m-instruct
    python benchmarks/bench_sample.py --batch-sizes 4,16 --threads 2
    python benchmarks/bench_sample.py --device cuda --dtype bfloat16 --models smollm2-135m --prompt-lens 64-192
    python benchmarks/bench_sample.py --dry-run --out /tmp/x    # the same on the CPU at a tiny size: 3 queries, 3 tokens

Results: benchmarks/results/<date>-sample-cpu.md and .csv (sample-<gpu> on CUDA), with the machine.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see bench_step.py); only when run as a script.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import report  # noqa: E402
from report import machine, write_table  # noqa: E402
from rrhf_fast import data, generation, sample  # noqa: E402


# Random Llamas (the byte tokenizer of rrhf_fast.default_model for the prompts and the stop token).
SHAPES = {
    "tiny": None,  # rrhf_fast.default_model.build_model's defaults
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny", help="comma-separated, each a Hugging Face causal LM directory or a "
                   "random Llama: tiny (the embedded model, rrhf_fast.default_model) or smollm2-135m (that model's shape)")
    p.add_argument("--queries", type=int, default=16, help="queries a contender decodes per round")
    p.add_argument("--batch-sizes", default="16", help="comma-separated queries a batch for ours and generate")
    p.add_argument("-k", type=int, default=4, help="candidates a query")
    p.add_argument("--prompt-lens", default="16-40", help="comma-separated MIN-MAX ranges of prompt tokens (spread evenly over the queries); a range the model has no positions for is skipped")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 on a shared machine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the table (default benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="this command on the CPU at a tiny size (the embedded model, "
                   "3 queries of 1-9 tokens, batches of 2, k = 2, 3 new tokens, one round); table to --out (default: a "
                   "new temporary folder)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.models, args.queries, args.batch_sizes, args.k = "cpu", "tiny", 3, "2", 2
        args.prompt_lens, args.max_new_tokens, args.repeats = "1-9", 3, 1
        args.out = str(report.out_dir(args.out, True, "bench_sample"))
    args.models = args.models.split(",")
    for spec in args.models:
        if spec not in SHAPES and not os.path.isfile(os.path.join(os.path.expanduser(spec), "config.json")):
            p.error(f"--models: {spec!r} is neither {' nor '.join(SHAPES)} nor a model directory (no config.json)")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    try:
        args.prompt_lens = [tuple(int(n) for n in r.split("-")) for r in args.prompt_lens.split(",")]
    except ValueError:
        p.error("--prompt-lens: expected MIN-MAX ranges, e.g. 16-40,64-192")
    if not all(len(r) == 2 and 1 <= r[0] <= r[1] for r in args.prompt_lens):
        p.error("--prompt-lens: expected MIN-MAX ranges with 1 <= MIN <= MAX")
    return args


def load(spec: str, args):
    """(model, tokenizer, name) for one --models entry, in eval mode on args.device."""
    if spec in SHAPES:
        from rrhf_fast.default_model import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        model, name = build_model(tokenizer, seed=args.seed), "embedded tiny Llama (hidden 96, 2 layers, vocab 258)"
        if SHAPES[spec] is not None:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(args.seed)
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[spec], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            name = f"random Llama of {spec}'s shape"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.path.expanduser(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, name = AutoModelForCausalLM.from_pretrained(path), os.path.basename(os.path.normpath(path))
    return model.to(args.device, getattr(torch, args.dtype)).eval(), tokenizer, name


def make_prompts(tokenizer, num_queries: int, low: int, high: int, seed: int) -> list[list[int]]:
    """num_queries prompts of random ordinary (non-special) tokens, lengths spread evenly over low..high."""
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(low, high, num_queries).round().long().tolist()
    lengths = [lengths[i] for i in torch.randperm(num_queries, generator=g).tolist()]  # lengths mixed in a batch
    return [ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist() for n in lengths]


def contenders(model, tokenizer, prompts, batch_size, args) -> dict:
    """name -> () -> [query][candidate] token ids (stop token cut off)."""
    stops = generation.stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    options = dict(
        max_new_tokens=args.max_new_tokens, stop_token_ids=stops, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, pad_token_id=pad,
    )  # fmt: skip

    def ours():
        return generation.sample_candidates(model, prompts, args.k, batch_size=batch_size, **options)

    def loop():
        return generation.sample_candidates(model, prompts, args.k, batch_size=1, **options)

    @torch.no_grad()
    def generate():
        out = []
        for start in range(0, len(prompts), batch_size):
            wave = prompts[start : start + batch_size]
            width = max(len(p) for p in wave)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in wave], device=args.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in wave], device=args.device)
            rows = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=args.temperature > 0, temperature=args.temperature or None,
                top_p=args.top_p, top_k=0, num_return_sequences=args.k, max_new_tokens=args.max_new_tokens,
                pad_token_id=pad, eos_token_id=stops,
            )[:, width:].tolist()  # fmt: skip
            rows = [r[: next((i for i, t in enumerate(r) if t in stops), len(r))] for r in rows]
            out += [rows[q * args.k : (q + 1) * args.k] for q in range(len(wave))]
        return out

    out = os.path.join(tempfile.mkdtemp(prefix="bench_sample-"), "samples.jsonl")
    flags = ["--model", "-", "--queries", "-", "--out", out, "--reward", "-", "-k", str(args.k), "--batch-size", str(batch_size),
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature), "--top-p", str(args.top_p),
             "--seed", str(args.seed)]  # fmt: skip
    command_args = sample.build_parser().parse_args(flags)
    examples = [data.Example(tokenizer.decode(p), [], [], None, i) for i, p in enumerate(prompts)]

    def command():
        if os.path.exists(out):
            os.remove(out)  # else the command resumes: nothing left to do
        sample.sample_queries(command_args, examples, prompts, 0, model, tokenizer, constant_reward, "the constant reward")
        with open(out, encoding="utf-8") as f:
            return [json.loads(line)["responses"] for line in f]

    return {"ours": ours, "generate": generate, "loop": loop, "command": command}


def constant_reward(prompts: list, responses: list) -> list:
    """The command's reward in the benchmark: batched, and as cheap as a reward can be."""
    return [0.0] * len(prompts)


def decoded(tokenizer, out) -> list[list[str]]:
    """[query][candidate] token ids as the text the command writes."""
    return [tokenizer.batch_decode(cands, skip_special_tokens=True) for cands in out]


def time_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """(median seconds, the last output) of each fn, the fns taking turns in every round; round 0 is warm-up."""
    times, outputs = {name: [] for name in fns}, {}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():  # every fn ends in .tolist(), which waits for the device
            start = time.perf_counter()
            outputs[name] = fn()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def measure(model, tokenizer, prompts, batch_size, args, where: dict) -> list[dict]:
    """The table's four rows (ours, command, generate, loop) for one workload."""
    seconds, outputs = time_interleaved(contenders(model, tokenizer, prompts, batch_size, args), args.repeats)
    differ = sum(a != b for a, b in zip(outputs["ours"], outputs["loop"]))
    if decoded(tokenizer, outputs["ours"]) != outputs["command"]:
        raise RuntimeError("the sample command wrote other candidates than generation.sample_candidates")
    outputs["command"] = outputs["ours"]  # the same tokens, as the check above says
    tokens = {c: sum(len(r) for q in out for r in q) for c, out in outputs.items()}
    speed = {c: tokens[c] / seconds[c] for c in outputs}
    rows = []
    for contender in ("ours", "command", "generate", "loop"):
        rows.append({
            **where, "queries": args.queries, "batch": 1 if contender == "loop" else batch_size, "k": args.k,
            "max new": args.max_new_tokens, "contender": contender, "seconds": seconds[contender],
            "tokens": tokens[contender], "tokens/s": speed[contender],
            "x generate": speed[contender] / speed["generate"] if contender in ("ours", "command") else "",
            "x loop": speed[contender] / speed["loop"] if contender in ("ours", "command") else "",
            "queries unlike loop": differ if contender == "ours" else "",
        })  # fmt: skip
        print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows, args.skipped = [], []
    for spec in args.models:
        model, tokenizer, name = load(spec, args)
        limit = generation.max_positions(model)
        for low, high in args.prompt_lens:
            if limit is not None and high + args.max_new_tokens > limit:
                args.skipped.append(f"{name}: prompts of {low}-{high} tokens skipped, the model has {limit} positions")
                print(args.skipped[-1], flush=True)
                continue
            prompts = make_prompts(tokenizer, args.queries, low, high, args.seed)
            for batch_size in args.batch_sizes:
                rows += measure(model, tokenizer, prompts, batch_size, args, {"model": name, "prompt tokens": f"{low}-{high}"})
        del model
    return rows


def main(argv=None) -> Path:
    args = parse_args(argv)
    load_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = run(args)
    info = machine("cuda" if args.device.startswith("cuda") else "cpu")
    command = " ".join(["python benchmarks/bench_sample.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"Command: `{command}`. " + ("A dry run (tiny sizes on the CPU): the figures measure nothing. " if args.dry_run else "")
        + f"{args.dtype}, temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}; "
        f"median of {args.repeats} rounds after 1 warm-up, contenders interleaved; OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average (1, 5, 15 min) {load_start} at the start, "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end. `tokens`: generated tokens up to each "
        "row's stop token; `x generate`, `x loop`: ours' (or the command's) tokens/s over the contender's, same run; `queries unlike loop`: "
        "queries whose tokens from ours differ from the one-query loop's (0 when batching changes no draw). "
        + "".join(f"{line}. " for line in args.skipped)
    )  # fmt: skip
    suffix = "cpu" if not args.device.startswith("cuda") else info["device"].lower().replace(" ", "-")
    kwargs = {} if args.out is None else {"out_dir": Path(args.out)}
    path = write_table(rows, f"sample-{suffix}", "Sampling: batched decoding against generate() and the one-query loop", info, notes, **kwargs)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
