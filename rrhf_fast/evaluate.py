"""The model as a reward model: `python -m rrhf_fast.evaluate --model PATH --data FILE.jsonl`.

Scores every candidate of an RRHF JSONL file by its length-normalised log-probability under the model (the
quantity RRHF ranks) and reports the pairwise ranking accuracy against the file's scores (the paper's
Table 5: the fraction of pairs with r_i < r_j where p_i < p_j). With `--reward`, it also generates a greedy
answer to every query and reports their mean reward.

    python -m rrhf_fast.evaluate --model out/rrhf/final --data out/rrhf/data/eval.jsonl --reward task
    python -m rrhf_fast.evaluate --model PATH --data test.jsonl --out scores.jsonl --json eval.json

Outputs: a table on stdout; `--json` (one object: rank_acc, pairs, queries, candidates, and reward where
asked); `--out` (the input lines with a "model_scores" list beside "scores"). Exit status 2 on bad input,
with one line naming the file, line and problem.
"""

import argparse
import importlib
import json
import os
import sys
from types import SimpleNamespace

import torch
from tqdm import tqdm

from rrhf_fast.cli import InputError, Parser, run

PROG = "rrhf_fast.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model_name_or_path", required=True, help="local Hugging Face causal LM directory")
    p.add_argument("--data", "--data_path", required=True, help="RRHF JSONL: {query, responses, scores} a line")
    p.add_argument("--out", help="write the input lines with the model's per-candidate scores added (JSONL)")
    p.add_argument("--json", help="write the summary as one JSON object")
    p.add_argument(
        "--reward",
        help="score greedy generations too: 'task' (the built-in addition task) or 'module:function' "
        "(called with query and response, returns a float)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward pass (default 16)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="score = sum logp / L ** this (default 1)")
    p.add_argument("--model-max-length", type=int, default=512, help="tokens per candidate, prompt + response")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer length with --reward (default 128)")
    p.add_argument("--prefix-mode", default="auto", choices=["auto", "packed", "kv-cache", "none"], help="prefix sharing")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code shipped in --model")
    return p


def load_reward(spec: str):
    """'task' or 'module:function' -> a callable (query, response) -> float."""
    if spec == "task":
        from rrhf_fast.task import reward

        return reward
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InputError(f"--reward {spec!r}: expected 'task' or 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module in the working directory, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # whatever the user's module raises while importing is bad input, not a crash
        raise InputError(f"--reward {spec!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise InputError(f"--reward {spec!r}: {module_name} has no attribute {function_name!r}")
    if not callable(function):
        raise InputError(f"--reward {spec!r}: {function_name} is not callable")
    return function


@torch.no_grad()
def candidate_scores(model, examples, *, batch_size, mode, length_penalty, pad_token_id):
    """[[score of each candidate] for each example]: length-normalised log-probabilities under `model`."""
    from rrhf_fast.batch import pack_batch
    from rrhf_fast.prefix import model_loss

    model.eval()
    scores = []
    for start in tqdm(range(0, len(examples), batch_size), desc="scoring", unit="batch", file=sys.stderr):
        chunk = examples[start : start + batch_size]
        batch = pack_batch(
            [ex.prompt for ex in chunk],
            [ex.candidates for ex in chunk],
            [ex.rewards for ex in chunk],
            pad_token_id=pad_token_id,
        )
        flat = model_loss(model, batch, mode=mode, length_penalty=length_penalty).scores.float().cpu().tolist()
        bounds = batch.cu_groups.tolist()
        scores += [flat[first:last] for first, last in zip(bounds[:-1], bounds[1:])]
    return scores


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rrhf_fast.data import DataError, read_jsonl, tokenize
    from rrhf_fast.evaluate_model import greedy_answers, mean_reward, pair_accuracy
    from rrhf_fast.train import load_model_and_tokenizer

    if args.batch_size < 1 or args.model_max_length < 2 or args.max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be >= 1, --model-max-length >= 2")
    if not os.path.isfile(args.data):
        raise InputError(f"{args.data}: no such file")
    reward_fn = load_reward(args.reward) if args.reward else None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_model_and_tokenizer(SimpleNamespace(trust_remote_code=args.trust_remote_code), args.model)
        examples = read_jsonl(args.data)
        tokenized, cut = tokenize(examples, tokenizer, args.model_max_length)
    except DataError as err:
        raise InputError(str(err)) from None
    if cut.prompts or cut.responses:
        print(f"{PROG}: warning: {args.data}: {cut} to fit --model-max-length {args.model_max_length}", file=sys.stderr)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model.to(device)

    scores = candidate_scores(
        model,
        tokenized,
        batch_size=args.batch_size,
        mode=args.prefix_mode,
        length_penalty=args.length_penalty,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    flat_scores = [s for group in scores for s in group]
    flat_rewards = [r for ex in tokenized for r in ex.rewards]
    bounds = [0]
    for group in scores:
        bounds.append(bounds[-1] + len(group))
    correct, pairs = pair_accuracy(flat_scores, flat_rewards, bounds)
    summary = {
        "model": args.model,
        "data": args.data,
        "queries": len(examples),
        "candidates": len(flat_scores),
        "pairs": pairs,
        "rank_acc": correct / pairs if pairs else None,
    }
    if reward_fn is not None:
        queries = [ex.query for ex in examples]
        answers = greedy_answers(model, tokenizer, queries, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        summary["reward"] = mean_reward(reward_fn, queries, answers)

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for ex, group in zip(examples, scores):
                line = {"query": ex.query, "responses": ex.responses, "scores": ex.scores, "model_scores": group}
                f.write(json.dumps(line) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    rank_acc = "n/a (no pair of different rewards)" if pairs == 0 else f"{summary['rank_acc']:.4f}"
    rows = [("queries", summary["queries"]), ("candidates", summary["candidates"]), ("pairs", pairs)]
    rows += [("ranking accuracy", rank_acc)]
    if "reward" in summary:
        rows.append(("mean reward of greedy answers", f"{summary['reward']:.4f}"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0


def cli(argv=None) -> int:
    return run(main, PROG, argv)


if __name__ == "__main__":
    sys.exit(cli())
