"""Candidate sampling: k responses a query from a causal LM, scored by a reward, written as RRHF JSONL.

    python -m rrhf_fast.sample --model PATH --queries FILE --out FILE.jsonl -k 4 --reward task
    python -m rrhf_fast.sample --model PATH --queries hh.jsonl --out hh_k4.jsonl -k 4 \
        --reward-model RM_PATH --keep-existing --temperature 1.0 --top-p 0.9

Each query is run through the model once (the prefill); its key/value cache is then repeated to k rows and
the k candidates are decoded together from it with temperature / top-p sampling (temperature 0: greedy), so
a long prompt costs one forward pass, not k. With --keep-existing the responses already in the queries
file (e.g. a dataset's chosen and rejected) come first and are scored with the same reward as the samples,
so every score of a line is on one scale. Rewards: a Hugging Face sequence-classification model
(`--reward-model PATH`, logit 0 of "query + response"), a Python function (`--reward module:function`,
called as f(query, response) -> float) or the built-in addition task's (`--reward task`).

The output, one line a query, is what `rrhf_fast.train --data` reads:

    {"query": "23+48=", "responses": ["71", "72", "17", "134"], "scores": [1.0, 0.8, 0.07, 0.06]}

It is resumable: when --out exists, the queries it already holds are skipped and new lines are appended,
each flushed as written, so a crash loses at most the line in flight. Every query draws from its own
generator seeded with (--seed, its position), so a resumed run writes what an uninterrupted one would.

Queries file: JSONL with a "query" string a line (optionally "responses", a list of strings, which
--keep-existing keeps; an RRHF JSONL file is fine), or, for a .txt file, one query a line.
Bad input exits with status 2 and one line on stderr naming the file and line.
"""

import argparse
import json
import os
import sys

import torch

from rrhf_fast import loading
from rrhf_fast.cli import InputError, Parser, bad_input, number, run
from rrhf_fast.data import DataError

PROG = "rrhf_fast.sample"


# ----------------------------------------------------------------------------------------------------------
# Queries in, RRHF lines out


def read_queries(path: str) -> list[tuple[str, list[str], int]]:
    """(query, existing responses, line) for every non-blank line; DataError "<file>:<line>: ..." on bad input."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a JSONL or .txt file") from None
    except OSError as err:
        raise DataError(path, None, f"cannot open: {err.strerror}") from None
    plain = path.endswith(".txt")
    out, line_no = [], 0
    with f:
        try:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                if plain:
                    out.append((text.rstrip("\r\n"), [], line_no))
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(path, line_no, f"invalid JSON: {err.msg} (column {err.colno}); a .txt file is read as one query a line") from None
                if not isinstance(obj, dict) or "query" not in obj:
                    raise DataError(path, line_no, 'expected a JSON object with a "query" key')
                if not isinstance(obj["query"], str):
                    raise DataError(path, line_no, f"query must be a string, got {type(obj['query']).__name__}")
                responses = obj.get("responses", [])
                if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                    raise DataError(path, line_no, "responses, when given, must be a list of strings")
                out.append((obj["query"], list(responses), line_no))
        except UnicodeDecodeError:
            raise DataError(path, line_no or 1, "not UTF-8 text") from None
    if not out:
        raise DataError(path, None, "no queries (the file is empty)")
    return out


def read_done(path: str, queries: list[str]) -> int:
    """How many queries --out already holds (its lines must be the first queries, in order).

    A last line cut short by a crash (not valid JSON, or no newline) is removed so that it is written again.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
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
                raise DataError(path, i + 1, "invalid line in the middle of the output; not an output of this command?")
            break  # the line in flight when a run stopped
        if done >= len(queries) or not isinstance(obj, dict) or obj.get("query") != queries[done]:
            raise DataError(path, i + 1, f"does not match query {done + 1} of the queries file; another --out?")
        done += 1
        keep_bytes += len(raw) + 1
    if keep_bytes < len(data):
        with open(path, "r+b") as f:
            f.truncate(min(keep_bytes, len(data)))
    return done


# ----------------------------------------------------------------------------------------------------------
# Sampling


def pick_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, generator) -> torch.Tensor:
    """[k] next tokens from [k, V] logits: argmax at temperature 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p; the most likely one always stays
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def pick_diverse_tokens(logits: torch.Tensor, done: torch.Tensor, penalty: float) -> torch.Tensor:
    """[k] next tokens, row by row: the most likely token after subtracting `penalty` for every earlier
    unfinished row that already chose it at this step (Hamming diversity, as in diverse beam search)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = torch.zeros(logits.shape[-1], device=logits.device)  # [V] earlier rows' picks at this step
    picks = []
    for row in range(logits.shape[0]):
        token = (logp[row] - penalty * chosen).argmax()
        if not done[row]:
            chosen[token] += 1
        picks.append(token)
    return torch.stack(picks)


def sample_candidates(
    model, prompt: list[int], k: int, *, max_new_tokens: int, eos_token_id: int, temperature: float = 1.0,
    top_p: float = 1.0, generator=None, share_prompt: bool = True, diversity_penalty: float = 0.0,
) -> list[list[int]]:
    """k continuations of `prompt` (token ids, EOS left out), decoded together.

    share_prompt: prefill the prompt once and repeat its cache to k rows (the default); False prefills the
    k copies, the way `generate(num_return_sequences=k)` does. Both give the same tokens, as the k rows of
    the first step's logits are the same either way and the draws are made from them in one call.
    diversity_penalty > 0 decodes every row greedily with the Hamming penalty of pick_diverse_tokens instead
    of sampling: the paper's diverse beam search (4 groups, penalty 1.0) with one beam a group.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    if share_prompt:
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        logits = out.logits[:, -1].expand(k, -1)  # [k, V]
    else:
        out = model(input_ids=ids.expand(k, -1), use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    tokens = [[] for _ in range(k)]
    done = torch.zeros(k, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if diversity_penalty > 0:
            nxt = pick_diverse_tokens(logits, done, diversity_penalty)
        else:
            nxt = pick_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        nxt = nxt.masked_fill(done, eos_token_id)  # finished rows keep decoding (one batch) but add nothing
        for row, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
            if not finished and token != eos_token_id:
                tokens[row].append(token)
        done |= nxt == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # all rows have the same length, so no attention mask is needed and positions follow the cache
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return tokens


# ----------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("input and output")
    g.add_argument("--model", "--model_name_or_path", required=True, help="local Hugging Face causal LM directory (AutoModelForCausalLM + AutoTokenizer)")
    g.add_argument("--queries", "--data", "--data_path", required=True, help='queries: JSONL with a "query" string a line (RRHF JSONL is fine), or .txt with one query a line')
    g.add_argument("--out", "--output", required=True, help="RRHF JSONL to write; if it exists, its queries are skipped and new lines appended")
    g.add_argument("--keep-existing", "--keep_existing", action="store_true", help="also keep (and re-score) the responses the queries file already has, before the samples")
    g.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", help="allow custom model code shipped in --model or --reward-model")
    g = p.add_argument_group("sampling")
    g.add_argument("-k", "--num-candidates", "--num_return_sequences", type=number(int, 1), default=4, help="candidates sampled a query")
    g.add_argument("--temperature", type=number(float, 0), default=1.0, help="softmax temperature; 0: greedy (all k the same)")
    g.add_argument("--top-p", "--top_p", type=number(float, 0, low_inclusive=False), default=1.0, help="nucleus sampling: draw from the most likely tokens whose probabilities reach this")
    g.add_argument("--max-new-tokens", "--max_new_tokens", type=number(int, 1), default=128, help="tokens a candidate at most (the paper's 128)")
    g.add_argument("--diversity-penalty", "--diversity_penalty", type=number(float, 0), default=0.0, help="> 0: decode each candidate greedily, penalised this much for every earlier candidate that chose the same token at the same step (the paper's diverse beam search used 1.0 over 4 groups; one beam a group here); ignores --temperature / --top-p")
    g.add_argument("--seed", type=number(int, 0), default=0, help="every query samples from a generator seeded with (seed, its position)")
    g.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="policy weights; auto: bfloat16 on CUDA, float32 elsewhere")
    g = p.add_argument_group("reward (exactly one)")
    g.add_argument("--reward", help="task: the built-in addition task's reward; module:function: f(query, response) -> float, imported from the current directory or sys.path")
    g.add_argument("--reward-model", "--reward_model", help="local Hugging Face sequence-classification model; the score is logit 0 of query + response (bf16 on GPU)")
    g.add_argument("--reward-batch-size", "--reward_batch_size", type=number(int, 1), default=16, help="texts a reward-model forward pass")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.reward is None) == (args.reward_model is None):
        raise InputError("give exactly one of --reward (task or module:function) and --reward-model PATH")
    with bad_input():
        device = loading.device(args.device)
        loading.check_output_file(args.out, "--out")
        queries = read_queries(args.queries)
        done = read_done(args.out, [q for q, _, _ in queries])
        if args.reward:  # one --reward syntax for sample and evaluate, the values checked as they come
            function = loading.reward_function(args.reward)
            reward = lambda qs, rs: [function(q, r) for q, r in zip(qs, rs)]  # noqa: E731
        dtype = loading.compute_dtype(args.dtype, device)
        model, tokenizer = loading.load_model_and_tokenizer(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
        model.to(device).eval()
        if args.reward_model:
            reward = loading.reward_model(args.reward_model, on=device, batch_size=args.reward_batch_size,
                                          trust_remote_code=args.trust_remote_code)  # fmt: skip
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    from tqdm import tqdm

    generator = torch.Generator(device=device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as out:
        for index in tqdm(range(done, len(queries)), initial=done, total=len(queries), desc="sample", dynamic_ncols=True, disable=None):
            query, existing, _ = queries[index]
            generator.manual_seed(args.seed * 1_000_003 + index)  # per query, so a resumed run draws the same
            prompt = tokenizer(query).input_ids or [start_id]
            tokens = sample_candidates(
                model, prompt, args.num_candidates, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                temperature=args.temperature, top_p=args.top_p, generator=generator, diversity_penalty=args.diversity_penalty,
            )
            responses = (existing if args.keep_existing else []) + tokenizer.batch_decode(tokens, skip_special_tokens=True)
            with bad_input():
                scores = reward([query] * len(responses), responses)
            out.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
            out.flush()
    return 0


def cli(argv=None) -> int:
    return run(main, PROG, argv)


if __name__ == "__main__":
    sys.exit(cli())
