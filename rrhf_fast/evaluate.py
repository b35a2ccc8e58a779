"""The model as a reward model: `python -m rrhf_fast.evaluate --model PATH --data FILE.jsonl`.

Scores every candidate of a preference file (any format `train` reads: RRHF, TRL standard or conversational,
pairwise, UltraFeedback, Nectar, on-policy; .jsonl / .json / .parquet / a save_to_disk directory) by its length-normalised log-probability under the model (the
quantity RRHF ranks) and reports the pairwise ranking accuracy against the file's scores (the paper's
Table 5: the fraction of pairs with r_i < r_j where p_i < p_j). With `--reward`, it also generates a greedy
answer to every query (batched, rrhf_fast.generation) and reports their mean reward; a reward function gets the
prompt as the file holds it (a string or the chat messages) and the answer text.

The scores go through the path rrhf_fast.probe checks on the model at the first batch (the fused head, or the
model's own logits where they differ, e.g. under a logit softcap), so they are the model's own on any model.

    python -m rrhf_fast.evaluate --model out/rrhf/final --data out/rrhf/data/eval.jsonl --reward task
    python -m rrhf_fast.evaluate --model PATH --data test.jsonl --out scores.jsonl --json eval.json

Outputs: a table on stdout; `--json` (one object: rank_acc, pairs, queries, candidates, and reward where
asked); `--out` (the input lines with a "model_scores" list beside "scores"). Exit status 2 on bad input,
with one line naming the file, line and problem.
"""

import argparse
import json
import sys

from rrhf_fast import loading
from rrhf_fast.cli import Parser, bad_input, number, run

PROG = "rrhf_fast.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model_name_or_path", required=True, help="local Hugging Face causal LM directory")
    p.add_argument("--data", "--data_path", required=True, help="preference data in any format train reads (RRHF JSONL, TRL, UltraFeedback, Nectar, ...)")
    p.add_argument("--data-split", "--data_split", default="train", help="split of a dataset directory or cached dataset (default train)")
    p.add_argument("--chat-template", "--chat_template", help="file holding a Jinja chat template for chat-message prompts; unset: the tokenizer's")
    p.add_argument("--out", help="write the input lines with the model's per-candidate scores added (JSONL)")
    p.add_argument("--json", help="write the summary as one JSON object")
    p.add_argument(
        "--reward",
        help="score greedy generations too: 'task' (the built-in addition task) or 'module:function' "
        "(called with prompt and response, returns a finite float; or on lists)",
    )
    p.add_argument("--batch-size", type=number(int, 1), default=16, help="queries per forward pass (default 16)")
    p.add_argument("--length-penalty", type=number(float, 0), default=1.0, help="score = sum logp / L ** this (default 1)")
    p.add_argument("--model-max-length", type=number(int, 2), default=512, help="tokens per candidate, prompt + response (default 512); at most the model's positions")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128, help="greedy answer length with --reward (default 128)")
    p.add_argument("--prefix-mode", default="auto", choices=["auto", "packed", "kv-cache", "none", "per-candidate"], help="prefix sharing; checked on the model (default auto: the first exact one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code shipped in --model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from rrhf_fast.data import read_chat_template, read_examples, tokenize
    from rrhf_fast.metrics import candidate_scores, greedy_answers, mean_reward, pair_accuracy

    with bad_input():
        device = loading.device(args.device)
        examples = read_examples(args.data, args.data_split)
        template = read_chat_template(args.chat_template) if args.chat_template else None
        loading.check_output_file(args.out, "--out")
        loading.check_output_file(args.json, "--json")
        reward_fn = loading.reward_function(args.reward) if args.reward else None
        loading.check_max_length(loading.model_config(args.model, trust_remote_code=args.trust_remote_code),
                                 args.model_max_length, args.model)  # fmt: skip
    hf_logging.disable_progress_bar()
    with bad_input():
        model, tokenizer = loading.load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    with bad_input(f"{args.model}: "):
        tokenized, cut = tokenize(examples, tokenizer, args.model_max_length, chat_template=template)
    with bad_input():
        loading.check_encodes(examples, tokenized, tokenizer, args.model)
    if cut.prompts or cut.responses:
        print(f"{PROG}: warning: {args.data}: {cut} to fit --model-max-length {args.model_max_length}", file=sys.stderr)
    model.to(device)

    progress = lambda starts: tqdm(starts, desc="scoring", unit="batch", file=sys.stderr)  # noqa: E731
    with bad_input():  # an explicit --prefix-mode the probe finds inexact on this model: the mode that passes named
        scores = candidate_scores(
            model, tokenized, batch_size=args.batch_size, mode=args.prefix_mode, length_penalty=args.length_penalty,
            pad_token_id=tokenizer.pad_token_id or 0, progress=progress,
        )  # fmt: skip
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
        with bad_input(f"{args.data}: "):  # a prompt that leaves no position for the answer: its row named
            answers = greedy_answers(model, tokenizer, queries, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, chat_template=template)  # fmt: skip
        with bad_input():  # a reward that raises or returns a string, a bool or NaN: the query named
            summary["reward"] = mean_reward(reward_fn, queries, answers, name=f"--reward {args.reward}")

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for ex, group in zip(examples, scores):
                line = {"prompt" if ex.conversational else "query": ex.prompt, "responses": ex.responses,
                        "scores": ex.scores, "model_scores": group}  # fmt: skip
                f.write(json.dumps(line) + "\n")
    if args.json:
        from rrhf_fast.checkpoint import save_json

        save_json(summary, args.json)
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
