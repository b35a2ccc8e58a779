"""Online RRHF against TRL's GRPOTrainer at equal wall time, on the multiplication task (examples/multiplication_task.py).

    python benchmarks/bench_online.py                         # SmolLM2-135M-Instruct, 300 s of training a side
    python benchmarks/bench_online.py --budget 600 --sides grpo,rrhf-reference
    python benchmarks/bench_online.py --dry-run               # the embedded tiny model, a few seconds a side

Every side trains from the same model on the same prompts (2 a step, k = 4 completions each, at most
--max-new-tokens tokens, temperature 1, the same learning rate, constant schedule, --threads threads), one after the
other in a fresh interpreter, until --budget seconds of training have passed (held-out evaluations not counted);
every --eval-every steps and at the end the held-out greedy reward is measured by the same code
(rrhf_fast.online.greedy_reward) for both trainers. Sides:

    grpo                 trl.GRPOTrainer (reward_funcs=[reward, correct], reward_weights=[1, 0])
    rrhf-sft             python -m rrhf_fast.train --reward ... -k 4: the SFT term on every group's best sample
    rrhf-bar             the same with --sft-min-reward 1 (SFT only on a group holding a right answer)
    rrhf-rank            the same with --sft-weight 0 (the ranking term alone)
    rrhf-reference       the same with --reference-column solution (the right answer as a fifth candidate)
    loop                 examples/iterated_rrhf_smollm2.py, two rounds of sample / train / evaluate on 2 prompts a
                         round: the three-command loop's seconds a round (rounds an hour)

Writes <date>-online-cpu.md / .csv (one row a side: held-out greedy reward and exact-match rate before and after,
steps, prompts, seconds sampling / scoring / updating) and <date>-online-cpu.png (held-out reward against training
seconds) under --out (default benchmarks/results; a temporary folder for --dry-run), with the load average at the
start and end of every side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import report  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct")
REWARD = "examples.multiplication_task:reward"
CORRECT = "examples.multiplication_task:correct"
RRHF_SIDES = {
    "rrhf-sft": [],
    "rrhf-bar": ["--sft-min-reward", "1"],
    "rrhf-rank": ["--sft-weight", "0"],
    "rrhf-reference": ["--reference-column", "solution"],
}
SIDES = ["grpo", *RRHF_SIDES, "loop"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model directory (default: %(default)s)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)} (default: all)")
    p.add_argument("--budget", type=float, default=300, help="seconds of training a side (default %(default)s)")
    p.add_argument("--train", type=int, default=256, help="training questions (default %(default)s)")
    p.add_argument("--eval", type=int, default=48, help="held-out questions (default %(default)s)")
    p.add_argument("-k", type=int, default=4, help="completions a prompt (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="prompts a step (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens a completion at most (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="both trainers, constant (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of every side (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split, sampling and init seed (default %(default)s)")
    p.add_argument("--out", help="where the tables and the plot go (default benchmarks/results)")
    p.add_argument("--work", help="where the runs go (default: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="the embedded tiny model, text prompts, a few seconds a side")
    p.add_argument("--worker", choices=["grpo"], help=argparse.SUPPRESS)  # one side, in this interpreter
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sides.split(",")) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    if args.dry_run:
        args.budget, args.train, args.eval, args.eval_every, args.max_new_tokens = 3, 16, 4, 2, 4
    return args


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------------------
# Data and the tiny model of a dry run


def prepare(args, work: Path) -> Path:
    """train.jsonl and eval.jsonl of the task under work/data (text prompts for a dry run's byte tokenizer), and for
    a dry run the tiny model as args.model."""
    from examples import multiplication_task

    data = work / "data"
    multiplication_task.write(str(data), args.train, args.eval, args.seed)
    if args.dry_run:
        for name in ("train", "eval"):
            path = data / f"{name}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**r, "prompt": r["prompt"][0]["content"]}) + "\n" for r in rows))
        from rrhf_fast.default_model import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        args.model = str(work / "tiny")
        build_model(tokenizer, seed=args.seed, hidden_size=32, num_layers=1).save_pretrained(args.model)
        tokenizer.save_pretrained(args.model)
    return data


def eval_source(model, tokenizer, eval_path: str, max_new_tokens: int):
    """The held-out prompts and rewards as rrhf_fast.train evaluates them: greedy answers, reward and exact match."""
    from examples.multiplication_task import correct, reward
    from rrhf_fast import generation, online

    rewards = online.Rewards([reward, correct], ["reward", "correct"], [1.0, 0.0])
    options = online.Options(1, max_new_tokens, 0.0, 1.0, 0)
    stops = generation.stop_token_ids(model, tokenizer)
    return online.Source(online.read(eval_path), tokenizer, rewards, options, max_length=512, stop_token_ids=stops)


# ----------------------------------------------------------------------------------------------------------
# The sides


def run_grpo_worker(args) -> None:
    """GRPOTrainer until --budget seconds of training; writes its curve and split to args.result (JSON)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from examples.multiplication_task import correct, reward
    from rrhf_fast import online

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in open(os.path.join(args.data, "train.jsonl"), encoding="utf-8")]
    held = eval_source(model, tokenizer, os.path.join(args.data, "eval.jsonl"), args.max_new_tokens)
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(args.result), "grpo"), num_generations=args.k,
        per_device_train_batch_size=args.batch_size * args.k, max_completion_length=args.max_new_tokens,
        temperature=1.0, learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=100_000, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        reward_weights=[1.0, 0.0], dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
    )  # fmt: skip
    timing = {"generation_s": 0.0, "scoring_s": 0.0}
    curve, evals = [], {"s": 0.0}

    class Budget(TrainerCallback):
        """Held-out greedy reward every --eval-every steps (its time left out), stop after --budget seconds."""

        def __init__(self):
            self.start = None

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.time()

        def trained(self):
            return time.time() - self.start - evals["s"]

        def on_step_end(self, a, state, control, **kw):
            out = self.trained() >= args.budget
            if state.global_step % args.eval_every == 0 or out:
                measure(state.global_step, self.trained())
            if out:
                control.should_training_stop = True

    def measure(step, seconds):
        t0 = time.time()
        curve.append({"step": step, "train_s": seconds, **online.greedy_reward(model, held, batch_size=64)})
        evals["s"] += time.time() - t0

    measure(0, 0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward, correct], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Budget()])  # fmt: skip
    generate, score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t0 = time.time()
        try:
            return generate(*a, **kw)
        finally:
            timing["generation_s"] += time.time() - t0

    def timed_score(*a, **kw):
        t0, before = time.time(), timing["generation_s"]
        try:
            return score(*a, **kw)
        finally:
            timing["scoring_s"] += time.time() - t0 - (timing["generation_s"] - before)

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0 - evals["s"]
    result = {"curve": curve, "steps": trainer.state.global_step, "train_s": wall, **timing,
              "update_s": wall - timing["generation_s"] - timing["scoring_s"]}  # fmt: skip
    result["prompts"] = result["steps"] * args.batch_size
    Path(args.result).write_text(json.dumps(result))


def side_grpo(args, data: Path, work: Path) -> dict:
    result = work / "grpo.json"
    command = [sys.executable, __file__, "--worker", "grpo", "--data", str(data), "--result", str(result),
               *forwarded(args)]  # fmt: skip
    subprocess.run(command, check=True, env=environment(args), cwd=REPO)
    return json.loads(result.read_text())


def side_rrhf(args, data: Path, work: Path, extra: list[str]) -> dict:
    out = work / "rrhf"
    command = [
        sys.executable, "-m", "rrhf_fast.train", "--model", args.model, "--data", str(data / "train.jsonl"),
        "--eval-data", str(data / "eval.jsonl"), "--reward", REWARD, "--reward", CORRECT, "--reward-weights", "1", "0",
        "-k", str(args.k), "--max-completion-length", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate), "--lr-scheduler", "constant", "--warmup-ratio", "0",
        "--max-steps", "100000", "--max-train-seconds", str(args.budget), "--eval-every", str(args.eval_every),
        "--eval-batch-size", "64", "--log-every", "1", "--save-every", "0", "--threads", str(args.threads),
        "--seed", str(args.seed), "--output-dir", str(out), "--overwrite-output-dir", "--device", "cpu", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=environment(args), cwd=REPO)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    trained, at = 0.0, {0: 0.0}
    for r in rows:
        if r["type"] == "train":
            trained += r["generation_s"] + r["reward_s"] + r["train_s"]
            at[r["step"]] = trained
    curve = [{"step": r["step"], "train_s": at[r["step"]], **{k: v for k, v in r.items() if k.startswith("reward")}}
             for r in rows if r["type"] == "eval"]  # fmt: skip
    gen = sum(r["generation_s"] for r in rows if r["type"] == "train")
    scoring = sum(r["reward_s"] for r in rows if r["type"] == "train")
    return {"curve": curve, "steps": summary["steps"], "prompts": summary["prompts"], "train_s": trained,
            "generation_s": gen, "scoring_s": scoring, "update_s": trained - gen - scoring}  # fmt: skip


def side_loop(args, work: Path) -> dict:
    """Two rounds of the three-command loop on 2 prompts a round: its seconds a round."""
    loop_dir = work / "loop"
    command = [sys.executable, str(REPO / "examples" / "iterated_rrhf_smollm2.py"), "--model", args.model,
               "--work-dir", str(loop_dir), "--train-prompts", str(args.batch_size), "--eval-prompts", "8",
               "--iterations", "2", "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
               "--threads", str(args.threads)]  # fmt: skip
    subprocess.run(command, check=True, env=environment(args), cwd=REPO)
    stages = json.loads((loop_dir / "summary.json").read_text())["stages"]
    rounds = [[s["seconds"] for s in stages if s["stage"].startswith(f"iteration {i}:") or s["stage"] == f"after iteration {i}"]
              for i in (1, 2)]  # fmt: skip
    without_eval = [sum(s["seconds"] for s in stages if s["stage"].startswith(f"iteration {i}:")) for i in (1, 2)]
    return {"round_s": sum(map(sum, rounds)) / 2, "round_s_without_eval": sum(without_eval) / 2}


def forwarded(args) -> list[str]:
    return ["--model", args.model, "--budget", str(args.budget), "-k", str(args.k), "--batch-size", str(args.batch_size),
            "--max-new-tokens", str(args.max_new_tokens), "--learning-rate", str(args.learning_rate),
            "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--seed", str(args.seed)]  # fmt: skip


def environment(args) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The table and the plot


def row_of(side: str, result: dict, loads: tuple[str, str]) -> dict:
    first, last = result["curve"][0], result["curve"][-1]
    hours = result["train_s"] / 3600
    return {
        "side": side, "reward before": first["reward"], "reward after": last["reward"],
        "exact before": first.get("rewards/correct"), "exact after": last.get("rewards/correct"),
        "steps": result["steps"], "prompts": result["prompts"], "train s": result["train_s"],
        "sampling s": result["generation_s"], "scoring s": result["scoring_s"], "update s": result["update_s"],
        "rounds/hour": result["steps"] / hours if hours else None, "load start": loads[0], "load end": loads[1],
    }  # fmt: skip


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for side, result in results.items():
        if "curve" in result:
            ax.plot([p["train_s"] for p in result["curve"]], [p["reward"] for p in result["curve"]], "o-", label=side)
    ax.set_xlabel("training seconds (held-out evaluations not counted)")
    ax.set_ylabel("held-out greedy reward")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.worker == "grpo":
        run_grpo_worker(args)
        return Path(args.result)
    out = report.out_dir(args.out, args.dry_run, "online")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-online-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(args, work)
    results, rows = {}, []
    for side in args.sides.split(","):
        if side == "loop" and args.dry_run:
            continue  # the loop's example needs a chat model
        start = load()
        print(f"== {side} (load {start})", file=sys.stderr, flush=True)
        side_work = work / side
        side_work.mkdir(exist_ok=True)
        if side == "grpo":
            results[side] = side_grpo(args, data, side_work)
        elif side == "loop":
            results[side] = side_loop(args, side_work)
        else:
            results[side] = side_rrhf(args, data, side_work, RRHF_SIDES[side])
        (work / f"{side}.json").write_text(json.dumps(results[side]))
        if side != "loop":
            rows.append(row_of(side, results[side], (start, load())))
        else:
            loop = results[side]
            rows.append({"side": "loop (3 commands)", **{k: None for k in rows[0] if k != "side"}} if rows else {"side": "loop"})
            rows[-1].update({"rounds/hour": 3600 / loop["round_s"], "train s": loop["round_s"], "load start": start, "load end": load()})
    info = report.machine("cpu")
    info["device"] = f"{report.cpu_model()}, {args.threads} thread(s) a side of {os.cpu_count()} cores (shared)"
    notes = (f"Task: examples/multiplication_task.py ({args.train} training, {args.eval} held-out questions), model "
             f"{os.path.basename(os.path.normpath(args.model))}; {args.batch_size} prompts a step, k = {args.k}, at most "
             f"{args.max_new_tokens} new tokens, temperature 1, learning rate {args.learning_rate:g} constant, "
             f"{args.budget:g} s of training a side, one side after the other. `reward`: held-out greedy reward; "
             f"`exact`: the fraction of right products; `rounds/hour`: optimizer steps (one sample-score-update round "
             f"each) per hour of training; the loop row: seconds of one round of examples/iterated_rrhf_smollm2.py "
             f"(sample, train, evaluate commands) in `train s`. Load average (1 / 5 / 15 min) of the shared machine.")  # fmt: skip
    path = report.write_table(rows, "online-cpu", "Online RRHF against TRL's GRPO at equal wall time", info, notes, out)
    plot(results, path.with_suffix(".png"), f"{os.path.basename(os.path.normpath(args.model))}, k={args.k}, "
         f"{args.budget:g} s a side, {info['date']}")  # fmt: skip
    print(path)
    return path


if __name__ == "__main__":
    main()
