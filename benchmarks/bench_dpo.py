"""rrhf_fast against TRL's DPOTrainer on the same preference pairs and model: the policy's training step.

    pip install trl      # not a dependency of rrhf_fast; this benchmark alone needs it
    python benchmarks/bench_dpo.py --model ~/.cache/rrhf_fast/smollm2-135m-instruct --threads 1

The same pairs for both (a TRL pairwise file: a text prompt of --prompt-tokens tokens, chosen and rejected of
--response-tokens each), --pairs pairs a step, float32, AdamW, one after the other in fresh processes:

- TRL: DPOTrainer with precompute_ref_log_probs=True, so the reference model's log-probabilities are computed
  before training and a step is the policy's forward and backward over prompt + chosen and prompt + rejected, and
  the optimizer (timed per step by a callback, from the end of one step to the end of the next);
- rrhf_fast: the same pairs as groups of k = 2 (rrhf_fast.data reads the file), each step model_loss through the
  plan the exactness check chose (the check itself timed apart), backward, gradient clipping and AdamW, as
  rrhf_fast.train steps.

Tokens a second count the pairs' own tokens (prompt + chosen + rejected) for both, so the ratio is that of the
step times. The median over the timed steps after --warmup steps. Writes benchmarks/results/<date>-dpo-<label>-cpu.md.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model reads every answer and scores it against the others before it learns which one people "
         "preferred and why a short clear reply often wins over a long one that wanders").split()  # fmt: skip


def text_of(tokenizer, n: int, offset: int) -> str:
    """A text of exactly n tokens (by this tokenizer, encoded alone), words from WORDS from `offset` on."""
    words, text = [], ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n:
        words.append(WORDS[(offset + len(words)) % len(WORDS)])
        text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids)


def write_pairs(model: str, path: Path, pairs: int, prompt_tokens: int, response_tokens: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(pairs):
            prompt = text_of(tokenizer, prompt_tokens, 7 * i)
            chosen, rejected = text_of(tokenizer, response_tokens, 3 * i + 1), text_of(tokenizer, response_tokens, 5 * i + 2)
            f.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")


def run_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train")
    ends = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = DPOConfig(
        output_dir=args.work, per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
        learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, precompute_ref_log_probs=True, max_length=args.prompt_tokens + args.response_tokens + 8,
        dataloader_num_workers=0, seed=0, bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])][args.warmup - 1 :], "trl": __import__("trl").__version__}


def run_rrhf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_fast import model_loss, probe
    from rrhf_fast.batch import pack_batch
    from rrhf_fast.data import read_examples, tokenize

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    examples, _ = tokenize(read_examples(args.data), tokenizer, args.prompt_tokens + args.response_tokens + 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = [examples[i : i + args.pairs] for i in range(0, len(examples), args.pairs)]
    pack = lambda part: pack_batch([e.prompt for e in part], [e.candidates for e in part], [e.rewards for e in part])  # noqa: E731
    start = time.perf_counter()
    plan = probe.plan(model, pack(batches[0]))
    check_s = time.perf_counter() - start
    times = []
    for part in batches[: args.warmup + args.steps]:
        start = time.perf_counter()
        model_loss(model, pack(part)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens = [len(e.prompt) + sum(map(len, e.candidates)) for e in examples]
    return {"step_s": times[args.warmup :], "plan": f"{plan.mode} + {plan.head}", "check_s": check_s,
            "tokens_a_pair": statistics.mean(tokens)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/rrhf_fast/smollm2-135m-instruct"))
    parser.add_argument("--label", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=4, help="pairs a step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", choices=["trl", "rrhf"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.side:
        result = (run_trl if args.side == "trl" else run_rrhf)(args)
        print("RESULT " + json.dumps(result))
        return
    work = Path(tempfile.mkdtemp())
    data = work / "pairs.jsonl"
    write_pairs(args.model, data, args.pairs * (args.warmup + args.steps + 1), args.prompt_tokens, args.response_tokens)
    results, loads = {}, {}
    for side in ("trl", "rrhf"):
        loads[side] = open("/proc/loadavg").read().split()[0]
        command = [sys.executable, __file__, "--side", side, "--data", str(data), "--work", str(work / side)]
        command += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                    ("model", "prompt_tokens", "response_tokens", "pairs", "steps", "warmup", "threads")]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(work))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])
        print(side, results[side], flush=True)
    write_table(args, results, loads)


def write_table(args, results, loads) -> None:
    tokens = results["rrhf"]["tokens_a_pair"] * args.pairs
    trl_s, ours_s = statistics.median(results["trl"]["step_s"]), statistics.median(results["rrhf"]["step_s"])
    ideal = 2 * (args.prompt_tokens + args.response_tokens) / (args.prompt_tokens + 2 * args.response_tokens)
    lines = [
        f"# rrhf_fast against TRL's DPOTrainer on {args.label}: {datetime.date.today():%Y-%m-%d}",
        "",
        f"`python benchmarks/bench_dpo.py --model {args.model} --threads {args.threads}`: {args.pairs} pairs a step, "
        f"prompts of {args.prompt_tokens} tokens, chosen and rejected of {args.response_tokens}, float32, AdamW, "
        f"CPU ({os.cpu_count()} cores, {args.threads} thread); TRL {results['trl']['trl']} with the reference "
        f"log-probabilities precomputed. Median of {args.steps} steps after {args.warmup} warm-up steps; load "
        f"average before each side: TRL {loads['trl']}, rrhf_fast {loads['rrhf']}.",
        "",
        "| trainer | path | s / step | pair tokens / s | x DPOTrainer |",
        "|---|---|---|---|---|",
        f"| TRL DPOTrainer | prompt + chosen and prompt + rejected, full logits | {trl_s:.2f} | {tokens / trl_s:.0f} | 1 |",
        f"| rrhf_fast (k = 2) | {results['rrhf']['plan']} | {ours_s:.2f} | {tokens / ours_s:.0f} | {trl_s / ours_s:.2f} |",
        "",
        f"Sharing the prompt alone computes {ideal:.2f}x fewer body tokens (2(P + R) against P + 2R); the fused head "
        "also runs the LM head on the response tokens alone. rrhf_fast's exactness check took "
        f"{results['rrhf']['check_s']:.1f} s once, before the first step ({results['rrhf']['check_s'] / ours_s:.2f} steps).",
    ]
    out = args.out or RESULTS / f"{datetime.date.today():%Y-%m-%d}-dpo-{args.label}-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
