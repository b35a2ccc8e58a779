"""Candidate sampling: k responses a prompt from a causal LM, scored by a reward, written as lines `train` reads.

    python -m rrhf_fast.sample --model PATH --queries FILE --out FILE.jsonl -k 4 --reward task
    python -m rrhf_fast.sample --model PATH --queries hh.jsonl --out hh_k4.jsonl -k 4 \
        --reward-model RM_PATH --keep-existing --temperature 1.0 --top-p 0.9

--batch-size queries are decoded together by rrhf_fast.generation: their prompts prefilled once (left-padded),
each prompt's key/value cache repeated to its k rows, rows dropped from the batch at their stop token (the
model's generation_config EOS ids, the tokenizer's EOS, the chat template's end of turn), temperature / top-p
sampling (temperature 0: greedy). A query's samples do not depend on --batch-size, on its place in the batch or
on a resume: every query draws from its own generator, seeded with (--seed, its position in the file).

Queries: any file `train --data` reads (RRHF, TRL, UltraFeedback, Nectar, on-policy; .jsonl / .json / .parquet /
a save_to_disk directory; --queries-split picks the split), a prompt-only file ({"prompt": ...} or {"query": ...}
a record) or a .txt file (one prompt a line). The prompt is kept as the file holds it: chat messages are rendered
by the tokenizer's chat template (or --chat-template FILE) with the generation prompt, the tokens training sees,
and written back as messages. With --keep-existing the responses already in the file (e.g. a dataset's chosen
and rejected) come first and are scored with the same reward as the samples, so a line's scores share a scale.

Rewards: a Hugging Face sequence-classification model (`--reward-model PATH`, logit 0 of prompt + response,
--reward-batch-size texts a forward), a Python function (`--reward module:function`, called as f(prompt,
response) -> float, or on lists, f(prompts: list, responses: list) -> list[float], when it has that signature or
a `batched = True` attribute; see rrhf_fast.generation.score_responses) or the built-in addition task's
(`--reward task`). The prompt a reward gets is the file's: a string, or the list of chat messages.

The output, one line a query, is what `rrhf_fast.train --data` reads (rrhf_fast.data.record): RRHF for a text
prompt, TRL's conversational listwise format for chat messages:

    {"query": "23+48=", "responses": ["71", "72", "17", "134"], "scores": [1.0, 0.8, 0.07, 0.06]}
    {"prompt": [{"role": "user", "content": "Hi"}], "completions": [[{"role": "assistant", "content": "Hello"}], ...],
     "scores": [0.7, ...]}

It is resumable: when --out exists, the queries it already holds are skipped and new lines are appended, each
flushed as written, so a crash loses at most the lines of the window in flight (the queries are decoded 8 waves at
a time, sorted by prompt length, so that a wave pads little); the resumed run writes what an uninterrupted one
would. Bad input exits with status 2 and one line on stderr naming the file and line.
"""

import argparse
import json
import os
import sys
import time

import torch

from rrhf_fast import data, generation, loading
from rrhf_fast.cli import InputError, Parser, bad_input, number, run

PROG = "rrhf_fast.sample"
# Queries decoded together. On 2 shared CPU cores (k = 4, 10 new tokens, 32 queries of 16-40 tokens), SmolLM2-135M
# generated 44, 60, 115 and 89 tokens/s at 4, 8, 16 and 32 queries a wave; the embedded model 1770, 3150, 4640 and
# 5290. On a GPU more rows keep the chip busier and 16 x k rows of a 135M-7B model fit easily, so 16 is the default
# on both; raise it on a large GPU.
DEFAULT_BATCH_SIZE = 16


# ----------------------------------------------------------------------------------------------------------
# Resuming


def _held_prompt(line: dict):
    """The prompt of an output line (rrhf_fast.data.record writes "query" for text, "prompt" for messages)."""
    return line.get("query", line.get("prompt")) if isinstance(line, dict) else None


def read_done(path: str, prompts: list) -> int:
    """How many prompts --out already holds (its lines must be the first prompts, in order).

    A last line cut short by a crash (not valid JSON, or no newline) is removed so that it is written again.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        raw_data = f.read()
    lines = raw_data.split(b"\n")
    keep_bytes, done = 0, 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            keep_bytes += len(raw) + 1
            continue
        complete = i < len(lines) - 1  # followed by a newline
        try:
            obj = json.loads(raw) if complete else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if obj is None:
            if i < len(lines) - 2 or (i == len(lines) - 2 and lines[-1].strip()):
                raise data.DataError(path, i + 1, "invalid line in the middle of the output; not an output of this command?")
            break  # the line in flight when a run stopped
        if done >= len(prompts) or _held_prompt(obj) != prompts[done]:
            raise data.DataError(path, i + 1, f"does not match query {done + 1} of the queries file; another --out?")
        done += 1
        keep_bytes += len(raw) + 1
    if keep_bytes < len(raw_data):
        with open(path, "r+b") as f:
            f.truncate(min(keep_bytes, len(raw_data)))
    return done


def check_prompt_lengths(examples, prompt_ids, limit: int | None, path: str) -> None:
    """Every prompt leaves at least one of the model's `limit` positions for the answer; else name the query."""
    if limit is None:
        return
    for ex, ids in zip(examples, prompt_ids):
        if len(ids) >= limit:
            where = f"{path}:{ex.line}" if ex.line is not None else f"{path}: row {ex.index}"
            raise ValueError(
                f"{where}: the prompt has {len(ids)} tokens, the model has {limit} positions; shorten it "
                "(at least one position must be left for the answer)"
            )


# ----------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("input and output")
    g.add_argument("--model", "--model_name_or_path", required=True, help="local Hugging Face causal LM directory (AutoModelForCausalLM + AutoTokenizer)")
    g.add_argument("--queries", "--data", "--data_path", required=True, help="prompts: any format train reads, a prompt-only JSONL / parquet / save_to_disk dataset, or .txt with one prompt a line")
    g.add_argument("--queries-split", "--data-split", "--data_split", default="train", help="split of a dataset directory or cached dataset")
    g.add_argument("--chat-template", "--chat_template", help="file holding a Jinja chat template for chat-message prompts; unset: the tokenizer's")
    g.add_argument("--out", "--output", required=True, help="JSONL to write; if it exists, its queries are skipped and new lines appended")
    g.add_argument("--keep-existing", "--keep_existing", action="store_true", help="also keep (and re-score) the responses the queries file already has, before the samples")
    g.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", help="allow custom model code shipped in --model or --reward-model")
    g = p.add_argument_group("sampling")
    g.add_argument("-k", "--num-candidates", "--num_return_sequences", type=number(int, 1), default=4, help="candidates sampled a query")
    g.add_argument("--temperature", type=number(float, 0), default=1.0, help="softmax temperature; 0: greedy (all k the same)")
    g.add_argument("--top-p", "--top_p", type=number(float, 0, low_inclusive=False), default=1.0, help="nucleus sampling: draw from the most likely tokens whose probabilities reach this")
    g.add_argument("--max-new-tokens", "--max_new_tokens", type=number(int, 1), default=128, help="tokens a candidate at most (the paper's 128)")
    g.add_argument("--diversity-penalty", "--diversity_penalty", type=number(float, 0), default=0.0, help="> 0: decode each candidate greedily, penalised this much for every earlier candidate that chose the same token at the same step (the paper's diverse beam search used 1.0 over 4 groups; one beam a group here); ignores --temperature / --top-p")
    g.add_argument("--seed", type=number(int, 0), default=0, help="every query samples from a generator seeded with (seed, its position)")
    g.add_argument("--batch-size", "--batch_size", type=number(int, 1), default=DEFAULT_BATCH_SIZE, help="queries decoded together (k rows each; 16 was the fastest of 4-32 for SmolLM2-135M on 2 CPU cores); the samples do not depend on it")
    g.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    g.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "auto"], default="float32", help="policy weights; auto: bfloat16 on CUDA, float32 elsewhere")
    g.add_argument("--threads", type=number(int, 1), help="CPU threads for torch; unset: torch's own")
    g = p.add_argument_group("reward (exactly one)")
    g.add_argument("--reward", help="task: the built-in addition task's reward; module:function: f(prompt, response) -> float (or on lists), imported from the current directory or sys.path")
    g.add_argument("--reward-model", "--reward_model", help="local Hugging Face sequence-classification model; the score is logit 0 of prompt + response (bf16 on GPU)")
    g.add_argument("--reward-batch-size", "--reward_batch_size", type=number(int, 1), default=16, help="texts a reward-model forward pass")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.reward is None) == (args.reward_model is None):
        raise InputError("give exactly one of --reward (task or module:function) and --reward-model PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the one bar is sample's own
    with bad_input():
        device = loading.device(args.device)
        loading.check_output_file(args.out, "--out")
        examples = data.read_prompts(args.queries, args.queries_split)
        done = read_done(args.out, [ex.prompt for ex in examples])
        template = data.read_chat_template(args.chat_template) if args.chat_template else None
        if args.reward:  # one --reward syntax for sample and evaluate
            reward, reward_name = loading.reward_function(args.reward), f"--reward {args.reward}"
        model, tokenizer = loading.load_model_and_tokenizer(
            args.model, dtype=loading.compute_dtype(args.dtype, device), trust_remote_code=args.trust_remote_code
        )
        if template is not None:
            tokenizer.chat_template = template  # its end of turn is a stop token too
        model.to(device).eval()
        if args.reward_model:
            reward = loading.reward_model(args.reward_model, on=device, batch_size=args.reward_batch_size,
                                          trust_remote_code=args.trust_remote_code)  # fmt: skip
            reward_name = f"--reward-model {args.reward_model}"
    todo = examples[done:]
    sample_queries(args, todo, encode_queries(args, todo, model, tokenizer), done, model, tokenizer, reward, reward_name)
    return 0


def encode_queries(args, todo, model, tokenizer) -> list[list[int]]:
    """The prompt ids of `todo` as training sees them (rrhf_fast.data.encode_prompts), each leaving the model room."""
    with bad_input(f"{args.queries}: "):
        prompt_ids = data.encode_prompts([ex.prompt for ex in todo], tokenizer)
    with bad_input():
        check_prompt_lengths(todo, prompt_ids, generation.max_positions(model), args.queries)
    return prompt_ids


def sample_queries(args, todo, prompt_ids, done: int, model, tokenizer, reward, reward_name: str) -> None:
    """The command after loading and encoding: decode the candidates of `todo` (the queries after the `done` already
    in --out; prompt_ids their tokens), score them and append their lines (benchmarks/bench_sample.py times this)."""
    with bad_input():
        stops = generation.stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    candidates = generation.generate_candidates(
        model, prompt_ids, args.num_candidates, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
        temperature=args.temperature, top_p=args.top_p, diversity_penalty=args.diversity_penalty, seed=args.seed,
        positions=range(done, done + len(todo)), batch_size=args.batch_size, pad_token_id=pad,
    )  # fmt: skip
    write_samples(args, todo, candidates, tokenizer, reward, reward_name, done, done + len(todo))


def write_samples(args, todo, candidates, tokenizer, reward, reward_name: str, done: int, total: int) -> None:
    """Score each wave of --batch-size queries as it is decoded (one reward call a wave) and append its lines."""
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bar = tqdm(initial=done, total=total, desc="sample", unit="query", dynamic_ncols=True, disable=None, file=sys.stderr)
    start, generated, wave = time.perf_counter(), 0, []
    with open(args.out, "a", encoding="utf-8") as out, bar:
        for i, (ex, tokens) in enumerate(zip(todo, candidates)):
            generated += sum(len(t) for t in tokens)
            existing = ex.responses if args.keep_existing else []
            wave.append((ex, existing + tokenizer.batch_decode(tokens, skip_special_tokens=True)))
            if len(wave) == args.batch_size or i == len(todo) - 1:
                with bad_input():  # a reward that raises or returns no finite number: the query named
                    scores = generation.score_responses(reward, [e.prompt for e, _ in wave], [r for _, r in wave], name=reward_name)
                for (e, responses), s in zip(wave, scores):
                    out.write(json.dumps(data.record(e.prompt, responses, s)) + "\n")
                out.flush()
                bar.update(len(wave))
                bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tokens/s")
                wave = []


def cli(argv=None) -> int:
    return run(main, PROG, argv)


if __name__ == "__main__":
    sys.exit(cli())
