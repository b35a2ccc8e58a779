"""The exactness check on a real model: both sides of its bound, and what it costs against a training step.

    python benchmarks/bench_probe.py --model ~/.cache/rrhf_fast/smollm2-135m-instruct --batches 12 --threads 1

On `--batches` micro-batches of an arithmetic chat file (examples/arithmetic_chat.py: 5 graded answers a
question, `--batch-size` questions a micro-batch), for the model in float32, under bfloat16 autocast and in
float16:

- rounding: every path's error as the check measures it (rrhf_fast.probe.path_errors: the fused head and the
  packed, kv-cache and none modes on the float64 twin), the largest over the batches;
- cost: the check's seconds (rrhf_fast.probe.run_probe) against one training step on the same batch (the plan's
  path, forward, backward and AdamW; float16 without the optimizer step), both timed in this run;
- the plan chosen on each batch;
- structure: the error of each structure the check must catch, grafted onto the same model (a softcap of 30 and a
  learnable logit scale on its head; packed rows whose candidates see each other or whose positions do not
  restart; a kv-cache that lets candidates see their prompt's padding; a final norm that sees the whole row; a
  sliding window of 8 that the packed mask leaves out), on the first batch;
- with --full-twin N: the same rounding errors on a float64 copy of every layer, on the first N batches (the twin
  the check uses keeps the fewest layers that hold one of each kind);
- with --trainer-runs F,B: F runs of `python -m rrhf_fast.train` in float32 and B under --bf16, each with its own
  --seed (its own data order, so its own first batch for the check), --trainer-steps steps on a 160-question file:
  the plan in summary.json and the check's seconds against the run's seconds a step.

Writes benchmarks/results/<date>-probe-<label>-cpu.md.
"""

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import arithmetic_chat  # noqa: E402
from rrhf_fast import prefix, probe  # noqa: E402
from rrhf_fast.batch import pack_batch  # noqa: E402
from rrhf_fast.data import read_examples, tokenize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("packed", "kv-cache", "none")


def batches(tokenizer, n: int, batch_size: int, tmp: Path):
    path = arithmetic_chat.write(str(tmp / "arithmetic.jsonl"), n * batch_size)
    examples, _ = tokenize(read_examples(path), tokenizer, 512)
    for i in range(n):
        part = examples[i * batch_size : (i + 1) * batch_size]
        yield pack_batch([e.prompt for e in part], [e.candidates for e in part], [e.rewards for e in part])


def in_dtype(model, dtype):
    """(model, autocast context) for a dtype: float32 as loaded, bfloat16 as autocast over float32, float16 cast."""
    if dtype == "bfloat16":
        return model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype == "float16":
        return model.half(), contextlib.nullcontext
    return model, contextlib.nullcontext


def step_seconds(model, batch, plan, autocast, optimizer) -> float:
    start = time.perf_counter()
    with autocast():
        out = prefix.batch_loss(model, batch, plan.mode, plan.head)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# Structures grafted onto the model: each a context manager; the path whose error shows it.


@contextlib.contextmanager
def softcap(model, cap=30.0):
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: cap * torch.tanh(out / cap))
    yield "fused head"
    handle.remove()


@contextlib.contextmanager
def logit_scale(model):
    head = model.get_output_embeddings()
    head.register_parameter("scale", torch.nn.Parameter(torch.ones((), dtype=head.weight.dtype)))
    handle = head.register_forward_hook(lambda m, a, out: out * m.scale)
    yield "fused head"
    handle.remove()
    del head.scale


@contextlib.contextmanager
def patched(obj, name, value):
    old = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    obj.__setitem__(name, value) if isinstance(obj, dict) else setattr(obj, name, value)
    try:
        yield
    finally:
        obj.__setitem__(name, old) if isinstance(obj, dict) else setattr(obj, name, old)


@contextlib.contextmanager
def candidates_see_each_other(model):
    mask = prefix.packed_attention_mask

    def leaky(batch, *args, **kwargs):
        return mask(dataclasses.replace(batch, segment_ids=torch.full_like(batch.segment_ids, -1)), *args, **kwargs)

    with patched(prefix, "packed_attention_mask", leaky):
        yield "packed"


@contextlib.contextmanager
def positions_continue(model):
    packed = prefix.FORWARDS["packed"]

    def continuing(m, batch, head):
        width = batch.input_ids.shape[1]
        positions = torch.arange(width, device=batch.input_ids.device).expand_as(batch.input_ids)
        return packed(m, dataclasses.replace(batch, position_ids=positions.contiguous()), head)

    with patched(prefix.FORWARDS, "packed", continuing):
        yield "packed"


@contextlib.contextmanager
def padding_visible(model):
    run = prefix._run

    def unmasked(m, head, needed, **inputs):
        if inputs.get("cache") is not None and inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        return run(m, head, needed, **inputs)

    with patched(prefix, "_run", unmasked):
        yield "kv-cache"


@contextlib.contextmanager
def norm_sees_the_row(model):
    norm = prefix.body(model).norm
    handle = norm.register_forward_hook(lambda m, a, out: out + 0.1 * out.mean(dim=1, keepdim=True))
    yield "none"
    handle.remove()


def windowed_copy(model, window=8):
    """The same weights as a Mistral with a sliding window (Llama and Mistral name their weights alike)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "model_type")})
    config.sliding_window = window
    windowed = MistralForCausalLM(config).to(next(model.parameters()).dtype)
    windowed.load_state_dict(model.state_dict(), strict=False)
    windowed.set_attn_implementation("sdpa")
    return windowed


@contextlib.contextmanager
def window_left_out(model):
    with patched(prefix, "_sliding_windows", lambda config: (None, False)):
        yield "packed"


GRAFTS = {
    "softcap 30 on the head": softcap,
    "learnable logit scale (at 1)": logit_scale,
    "packed: candidates see each other": candidates_see_each_other,
    "packed: positions do not restart": positions_continue,
    "kv-cache: the prompts' padding visible": padding_visible,
    "final norm sees the whole row (0.1 x its mean)": norm_sees_the_row,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/rrhf_fast/smollm2-135m-instruct"))
    parser.add_argument("--label", default="smollm2")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1, help="questions a micro-batch (the trainer's default: 1)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--full-twin", type=int, default=2, help="batches measured on a float64 copy of every layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainer-runs", default="0,0", help="F,B: trainer runs in float32 and under --bf16")
    parser.add_argument("--trainer-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import tempfile

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tmp = Path(tempfile.mkdtemp())
    data = list(batches(tokenizer, args.batches, args.batch_size, tmp))
    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()  # noqa: E731
    started, load_before = time.time(), open("/proc/loadavg").read().split()[:3]
    rows = {}
    for dtype in args.dtypes.split(","):
        model, autocast = in_dtype(load(), dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7) if dtype != "float16" else None
        stats = dict(plans={}, check=[], step=[], errors={}, twin=[])
        for batch in data:
            with autocast():
                plan = probe.run_probe(model, batch)
            stats["plans"][f"{plan.mode} + {plan.head}"] = stats["plans"].get(f"{plan.mode} + {plan.head}", 0) + 1
            stats["check"].append(plan.seconds)
            stats["step"].append(step_seconds(model, batch, plan, autocast, optimizer))
            with autocast():
                for path, (err, _) in probe.path_errors(model, batch, MODES).items():
                    if path.startswith("twin"):
                        stats["twin"].append((err, path))
                    else:
                        stats["errors"][path] = max(stats["errors"].get(path, 0.0), err)
            print(dtype, plan, f"check {stats['check'][-1]:.2f} s, step {stats['step'][-1]:.2f} s", flush=True)
        rows[dtype] = stats
        del model, optimizer

    model = load()
    full = {}
    keep = probe.layers_to_keep
    with patched(probe, "layers_to_keep", lambda m: None):
        for batch in data[: args.full_twin]:
            for path, (err, _) in probe.path_errors(model, batch, MODES).items():
                if not path.startswith("twin"):
                    full[path] = max(full.get(path, 0.0), err)
    print("every layer:", full, flush=True)
    probe.layers_to_keep = keep
    grafted = {}
    for name, graft in GRAFTS.items():
        with graft(model) as path:
            grafted[name] = (path, probe.path_errors(model, data[0], MODES)[path][0])
        print(name, grafted[name], flush=True)
    windowed = windowed_copy(model)
    with window_left_out(windowed) as path:
        grafted["sliding window 8 left out of the packed mask"] = (path, probe.path_errors(windowed, data[0], MODES)[path][0])
    runs = trainer_runs(args, tmp)
    write_table(args, rows, full, grafted, runs, time.time() - started, load_before)


def trainer_runs(args, tmp: Path) -> list[dict]:
    """The trainer's summary.json of every run asked for, with its seed and dtype."""
    import json
    import subprocess

    fp32, bf16 = (int(n) for n in args.trainer_runs.split(","))
    data = arithmetic_chat.write(str(tmp / "train160.jsonl"), 160)
    runs = []
    for i, flags in enumerate([[]] * fp32 + [["--bf16"]] * bf16):
        seed = i if i < fp32 else i - fp32
        out = tmp / f"run{i}"
        command = [sys.executable, "-m", "rrhf_fast.train", "--model", args.model, "--data", data, "--output-dir",
                   str(out), "--max-steps", str(args.trainer_steps), "--seed", str(seed), "--threads", str(args.threads),
                   "--eval-max-examples", "4", "--save-every", "0", *flags]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, cwd=str(tmp))
        summary = json.loads((out / "summary.json").read_text())
        runs.append(dict(summary, seed=seed, dtype="bfloat16" if flags else "float32"))
        print(runs[-1]["dtype"], seed, {k: summary[k] for k in ("prefix_mode", "head", "probe_s", "train_wall_s", "steps")}, flush=True)
    return runs


def write_table(args, rows, full, grafted, runs, seconds, load_before) -> None:
    load_after = open("/proc/loadavg").read().split()[:3]
    rounding = max(max(s["errors"].values()) for s in rows.values())
    structural = min(err for _, err in grafted.values())
    lines = [
        f"# The exactness check on {args.label}: {datetime.date.today():%Y-%m-%d}",
        "",
        f"`python benchmarks/bench_probe.py --model {args.model} --batches {args.batches} --batch-size {args.batch_size} "
        f"--threads {args.threads}`; torch {torch.__version__}, CPU ({os.cpu_count()} cores, {args.threads} thread), "
        f"{seconds:.0f} s, load average {' '.join(load_before)} before and {' '.join(load_after)} after. Batches: "
        f"examples/arithmetic_chat.py, {args.batch_size} question(s) of 5 graded answers each. TOLERANCE = "
        f"{probe.TOLERANCE:g} (float64, on the twin).",
        "",
        f"Largest error of an exact path over every batch and dtype: {rounding:.2g}; smallest error of a grafted "
        f"structure: {structural:.2g}; margin {structural / max(rounding, 1e-300):.3g}x "
        f"(TOLERANCE is {probe.TOLERANCE / max(rounding, 1e-300):.3g}x the first and {structural / probe.TOLERANCE:.3g}x "
        "below the second).",
        "",
        "| dtype | plans over the batches | check s (mean, max) | training step s (mean) | check / step (mean, max) "
        "| largest error: fused head | packed | kv-cache | none | twin vs model (largest) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, s in rows.items():
        ratios = [c / t for c, t in zip(s["check"], s["step"])]
        plans = ", ".join(f"{p}: {n}" for p, n in s["plans"].items())
        errs = " | ".join(f"{s['errors'].get(p, math.nan):.2g}" for p in ("fused head",) + MODES)
        twin = max(s["twin"])
        lines.append(
            f"| {dtype} | {plans} | {sum(s['check']) / len(s['check']):.2f}, {max(s['check']):.2f} | "
            f"{sum(s['step']) / len(s['step']):.2f} | {sum(ratios) / len(ratios):.2f}, {max(ratios):.2f} | {errs} | "
            f"{twin[0]:.2g} ({twin[1][6:-1]}) |"
        )
    lines += [
        "",
        f"On a float64 copy of every layer (first {args.full_twin} batches): "
        + ", ".join(f"{p} {e:.2g}" for p, e in full.items()) + ".",
        "",
        "| structure grafted onto the model | path that shows it | error |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {path} | {err:.2g} |" for name, (path, err) in grafted.items()]
    if runs:
        lines += [
            "",
            f"`python -m rrhf_fast.train --model {args.model} --data <160 questions> --max-steps {args.trainer_steps} "
            f"--seed S --threads {args.threads} [--bf16]`:",
            "",
            "| dtype | seed | prefix_mode | head | check s | s a step | check / step |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in runs:
            step = run["train_wall_s"] / run["steps"]
            lines.append(f"| {run['dtype']} | {run['seed']} | {run['prefix_mode']} | {run['head']} | {run['probe_s']:.2f} | "
                         f"{step:.2f} | {run['probe_s'] / step:.2f} |")  # fmt: skip
    out = args.out or RESULTS / f"{datetime.date.today():%Y-%m-%d}-probe-{args.label}-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
