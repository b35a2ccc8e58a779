"""RRHF JSONL: reading, checking and tokenising.

The format of the original RRHF code, one JSON object a line (blank lines are skipped):

    {"query": "23+48=", "responses": ["71", "72", "17", "134"], "scores": [1.0, 0.8, 0.07, 0.06]}

Every problem is a `DataError` naming the file, the line and what is wrong, so the CLI can print one line
and exit 2. Tokenisation follows the original code's intent without its bugs: the query is tokenised once
(with the tokenizer's special tokens, e.g. Llama's BOS), each response separately without them and with
EOS appended. Over-long examples are cut to `max_length` tokens a candidate (prompt + response): the prompt
from the left (its end, next to the answer, is kept), the responses from the right.
"""

import json
import math
from dataclasses import dataclass


class DataError(ValueError):
    """Bad input data: `str(err)` is "<file>:<line>: <what is wrong>" (no line where it concerns the file)."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclass
class Example:
    """One query with its candidate responses and their rewards, as read (text)."""

    query: str
    responses: list[str]
    scores: list[float]
    line: int  # 1-based line number in the file


@dataclass
class TokenizedExample:
    """One group ready for `rrhf_fast.pack_batch`: prompt ids, candidate ids (EOS appended), rewards."""

    prompt: list[int]
    candidates: list[list[int]]
    rewards: list[float]


def _describe(value) -> str:
    return type(value).__name__ if value is not None else "null"


def parse_example(obj, path: str, line: int) -> Example:
    """Check one decoded JSON object and turn it into an Example, or raise DataError."""
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object with query, responses and scores, got {_describe(obj)}")
    for key in ("query", "responses", "scores"):
        if key not in obj:
            raise DataError(path, line, f"missing key {key!r} (each line needs query, responses and scores)")
    query, responses, scores = obj["query"], obj["responses"], obj["scores"]
    if not isinstance(query, str):
        raise DataError(path, line, f"query must be a string, got {_describe(query)}")
    if not isinstance(responses, list):
        raise DataError(path, line, f"responses must be a list of strings, got {_describe(responses)}")
    if not isinstance(scores, list):
        raise DataError(path, line, f"scores must be a list of numbers, got {_describe(scores)}")
    if not responses:
        raise DataError(path, line, "empty responses list (each query needs at least one response)")
    if len(responses) != len(scores):
        raise DataError(path, line, f"{len(responses)} responses but {len(scores)} scores (need one score per response)")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise DataError(path, line, f"responses[{i}] must be a string, got {_describe(response)}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(path, line, f"scores[{i}] must be a number, got {_describe(score)}")
        if not math.isfinite(score):
            raise DataError(path, line, f"scores[{i}] is {score}; scores must be finite numbers")
    return Example(query, list(responses), [float(s) for s in scores], line)


def read_jsonl(path: str) -> list[Example]:
    """All examples of an RRHF JSONL file, checked; DataError on the first problem."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a JSONL file") from None
    except OSError as err:
        raise DataError(path, None, f"cannot open: {err.strerror}") from None
    examples = []
    with f:
        try:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(path, line_no, f"invalid JSON: {err.msg} (column {err.colno})") from None
                examples.append(parse_example(obj, path, line_no))
        except UnicodeDecodeError:
            raise DataError(path, len(examples) + 1, "not UTF-8 text") from None
    if not examples:
        raise DataError(path, None, "no examples (the file is empty)")
    return examples


@dataclass
class Truncation:
    """How many prompts and responses `tokenize` cut to fit max_length."""

    prompts: int = 0
    responses: int = 0

    def __str__(self) -> str:
        return f"{self.prompts} prompt(s) cut from the left and {self.responses} response(s) cut from the right"


def tokenize(examples: list[Example], tokenizer, max_length: int) -> tuple[list[TokenizedExample], Truncation]:
    """Token ids for every example, each candidate (prompt + response + EOS) at most max_length tokens.

    The prompt keeps its last max(max_length - longest response, max_length // 2) tokens when the two do not
    fit together; each response then keeps its first (max_length - prompt) tokens. An empty prompt becomes
    [BOS] (or [EOS] without one) so that the first response token has a position to be predicted from.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    cut = Truncation()
    out = []
    # Two batched calls (all queries, all responses) rather than one call per text: much faster for many short texts.
    prompts = tokenizer([ex.query for ex in examples]).input_ids
    flat = tokenizer([r for ex in examples for r in ex.responses], add_special_tokens=False).input_ids
    first = 0
    for ex, prompt in zip(examples, prompts):
        prompt = prompt or [start]
        responses = [ids + [tokenizer.eos_token_id] for ids in flat[first : first + len(ex.responses)]]
        first += len(ex.responses)
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > max_length:
            keep = max(max_length - longest, max_length // 2)
            if len(prompt) > keep:
                prompt = prompt[len(prompt) - keep :]
                cut.prompts += 1
            room = max_length - len(prompt)
            cut.responses += sum(len(r) > room for r in responses)
            responses = [r[:room] for r in responses]
        out.append(TokenizedExample(prompt, responses, list(ex.scores)))
    return out, cut
