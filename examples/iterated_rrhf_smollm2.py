"""The paper's iterated RRHF on SmolLM2-135M-Instruct, on CPU, driving the three commands as a user would.

The task: chat prompts that end with "Answer in at most N words." (N = 4 to 10), rewarded by
examples/brevity_reward.py (1 within the limit, N / words above it). The model is a chatty 135M instruct model
(its samples earn 0.2 to 1); RRHF on its own samples (64 steps of 2 queries an iteration at the defaults) is to
make its greedy answers shorter. Each iteration:

    sample     k candidates for every training prompt from the current policy, scored by the reward
               (python -m rrhf_fast.sample ... -k 4 --reward examples.brevity_reward:reward)
    train      RRHF on them, from the current policy (python -m rrhf_fast.train --data ... --eval-data ...)
    evaluate   held-out greedy reward and ranking accuracy of the policy before and after
               (python -m rrhf_fast.evaluate --data HELD_OUT --reward ...)

and the next iteration samples from the model the last one trained. The held-out candidates are sampled once
from the starting model, so that every evaluation ranks the same pairs. Prompts are written as TRL
conversational prompt-only JSONL ({"prompt": [{"role": "user", "content": ...}]} a line); the candidates files
keep the messages, and train and evaluate render them with the model's chat template.

    python examples/prepare_smollm2.py                      # once: ~/.cache/rrhf_fast/smollm2-135m-instruct
    python examples/iterated_rrhf_smollm2.py                # both iterations, the wall time of each stage
    python examples/iterated_rrhf_smollm2.py --train-prompts 64 --iterations 1     # a quicker look

The commands run in --work-dir with this repository on PYTHONPATH (after any PYTHONPATH given), so the reward
imports as examples.brevity_reward from anywhere. Everything goes under --work-dir; summary.json there holds
every figure printed.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.environ.get("RRHF_FAST_SMOLLM2_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct"
)
REWARD = "examples.brevity_reward:reward"

# Questions a 135M model can answer, and likes to answer at length: every template with every subject.
TEMPLATES = [
    "What is {}?",
    "Why is {} important?",
    "How would you describe {} to a child?",
    "What do people usually think about {}?",
    "Tell me something interesting about {}.",
]
SUBJECTS = [
    "the sun", "the moon", "rain", "a volcano", "the ocean", "a forest", "a desert", "snow", "a river", "a mountain",
    "bread", "coffee", "chocolate", "an apple", "rice", "cheese", "honey", "tea", "soup", "pizza",
    "a dog", "a cat", "a horse", "a bee", "an owl", "a whale", "a spider", "a penguin", "a frog", "an elephant",
    "a bicycle", "a train", "a bridge", "a clock", "a computer", "a library", "a hospital", "a school", "music",
    "football", "chess", "a garden", "friendship", "sleep", "exercise", "history", "mathematics", "a map", "a museum",
    "electricity", "gravity", "a rainbow", "the wind", "an island", "a castle", "a camera", "a telephone", "paper",
]
LIMITS = [4, 6, 8, 10]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the starting model directory (default: %(default)s)")
    p.add_argument("--work-dir", default="out/iterated_smollm2", help="prompts, candidates, runs and summary.json")
    p.add_argument("--train-prompts", type=int, default=128, help="training prompts (default %(default)s)")
    p.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts (default %(default)s)")
    p.add_argument("-k", type=int, default=4, help="candidates a prompt (default %(default)s)")
    p.add_argument("--iterations", type=int, default=2, help="sample-train rounds (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens a candidate and a greedy answer at most")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over each round's candidates (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="training queries a step (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-5, help="peak learning rate (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every command (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt split and sampling seed")
    return p.parse_args(argv)


def write_prompts(path: str, questions: list[str]) -> None:
    """TRL conversational prompt-only JSONL: one user message a line."""
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n")


def make_questions(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out questions, each with a word limit."""
    rng = random.Random(seed)
    pool = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    if n_train + n_eval > len(pool):
        sys.exit(f"iterated_rrhf_smollm2.py: error: at most {len(pool)} prompts in all (--train-prompts + --eval-prompts)")
    rng.shuffle(pool)
    questions = [f"{q} Answer in at most {rng.choice(LIMITS)} words." for q in pool[: n_train + n_eval]]
    return questions[:n_train], questions[n_train:]


class Stages:
    """Runs the commands, times each one, and keeps the figures."""

    def __init__(self, args):
        self.args = args
        self.summary = {"model": args.model, "stages": [], "evaluations": []}

    def run(self, name: str, module: str, *flags: str) -> float:
        command = [sys.executable, "-m", f"rrhf_fast.{module}", *flags]
        print(f"\n== {name}\n$ python -m rrhf_fast.{module} {' '.join(flags)}", flush=True)
        # The commands run in --work-dir, so that the rrhf_fast they import is the one PYTHONPATH or the installed
        # package names, not a copy in the caller's directory; this repository comes last, for examples.*.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO])))
        start = time.time()
        result = subprocess.run(command, cwd=self.args.work_dir, env=env)
        seconds = time.time() - start
        if result.returncode != 0:
            sys.exit(f"iterated_rrhf_smollm2.py: error: {name} exited {result.returncode}")
        print(f"-- {name}: {seconds:.0f} s", flush=True)
        self.summary["stages"].append({"stage": name, "seconds": round(seconds, 1)})
        return seconds

    def sample(self, name, model, prompts, out, seed):
        a = self.args
        self.run(name, "sample", "--model", model, "--queries", prompts, "--out", out, "-k", str(a.k),
                 "--reward", REWARD, "--batch-size", "16", "--max-new-tokens", str(a.max_new_tokens),
                 "--seed", str(seed), "--threads", str(a.threads))  # fmt: skip

    def evaluate(self, name, model, held_out, out_json):
        a = self.args
        self.run(name, "evaluate", "--model", model, "--data", held_out, "--reward", REWARD,
                 "--max-new-tokens", str(a.max_new_tokens), "--json", out_json)  # fmt: skip
        with open(out_json, encoding="utf-8") as f:
            figures = json.load(f)
        self.summary["evaluations"].append({"model": name, "greedy_reward": figures.get("reward"),
                                            "rank_acc": figures.get("rank_acc")})  # fmt: skip
        print(f"   greedy reward {figures.get('reward'):.3f}, ranking accuracy {figures.get('rank_acc'):.3f}")

    def train(self, name, model, data, held_out, out_dir):
        a = self.args
        self.run(name, "train", "--model", model, "--data", data, "--eval-data", held_out, "--output-dir", out_dir,
                 "--overwrite-output-dir", "--num-train-epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                 "--learning-rate", str(a.learning_rate), "--warmup-ratio", "0.1", "--save-every", "0",
                 "--eval-every", "0", "--model-max-length", "128", "--threads", str(a.threads),
                 "--seed", str(a.seed))  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"iterated_rrhf_smollm2.py: error: --model {args.model}: no model there; run examples/prepare_smollm2.py")
    args.work_dir, args.model = os.path.abspath(args.work_dir), os.path.abspath(args.model)
    os.makedirs(args.work_dir, exist_ok=True)
    work = lambda name: os.path.join(args.work_dir, name)  # noqa: E731
    train_q, eval_q = make_questions(args.train_prompts, args.eval_prompts, args.seed)
    write_prompts(work("train_prompts.jsonl"), train_q)
    write_prompts(work("heldout_prompts.jsonl"), eval_q)
    stages = Stages(args)
    start = time.time()

    held_out = work("heldout_candidates.jsonl")
    for stale in [held_out] + [work(f"candidates_{i}.jsonl") for i in range(1, args.iterations + 1)]:
        if os.path.exists(stale):  # sample appends to an existing --out: start each run afresh
            os.remove(stale)
    stages.sample("sample held-out candidates (starting model)", args.model, work("heldout_prompts.jsonl"), held_out,
                  args.seed + 1000)  # fmt: skip
    policy = args.model
    stages.evaluate("starting model", policy, held_out, work("eval_0.json"))
    for i in range(1, args.iterations + 1):
        candidates = work(f"candidates_{i}.jsonl")
        stages.sample(f"iteration {i}: sample", policy, work("train_prompts.jsonl"), candidates, args.seed + i)
        stages.train(f"iteration {i}: train", policy, candidates, held_out, work(f"run_{i}"))
        policy = work(f"run_{i}/final")
        stages.evaluate(f"after iteration {i}", policy, held_out, work(f"eval_{i}.json"))

    stages.summary["total_seconds"] = round(time.time() - start, 1)
    with open(work("summary.json"), "w", encoding="utf-8") as f:
        json.dump(stages.summary, f, indent=1)
    print("\n| model | greedy reward | ranking accuracy |\n|---|---|---|")
    for e in stages.summary["evaluations"]:
        print(f"| {e['model']} | {e['greedy_reward']:.3f} | {e['rank_acc']:.3f} |")
    print("\n| stage | seconds |\n|---|---|")
    for s in stages.summary["stages"]:
        print(f"| {s['stage']} | {s['seconds']:.0f} |")
    print(f"total {stages.summary['total_seconds']:.0f} s; summary in {work('summary.json')}")


if __name__ == "__main__":
    main()
