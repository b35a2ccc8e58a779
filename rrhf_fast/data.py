"""Preference data as people hold it: reading, format detection, checking, chat templates and tokenisation.

RRHF is listwise: each prompt comes with k responses and a score for each (higher is better). The format is
detected per file from the keys of its first record; every record must then have that format's keys. One
example line each:

    RRHF (the original code's format):
        {"query": "23+48=", "responses": ["71", "72"], "scores": [1.0, 0.8]}
    TRL, listwise (responses or completions; scores or rewards), standard or conversational:
        {"prompt": "The sky is", "completions": [" blue.", " green."], "rewards": [1.0, 0.2]}
        {"prompt": [{"role": "user", "content": "Sky colour?"}],
         "completions": [[{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green."}]],
         "scores": [1, 0]}
    TRL, pairwise: chosen / rejected become k = 2 with scores [1, 0]:
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    TRL, pairwise with an implicit prompt (Anthropic HH; or whole conversations):
        {"chosen": "\\n\\nHuman: Sky colour?\\n\\nAssistant: Blue.", "rejected": "\\n\\nHuman: Sky colour?\\n\\nAssistant: Green."}
    UltraFeedback:
        {"instruction": "Sky colour?", "completions": [{"response": "Blue.", "overall_score": 8.5}, ...]}
    Nectar (rank 1 is best; the score is -rank, so that better is higher):
        {"prompt": "\\n\\nHuman: Sky colour?\\n\\nAssistant:", "answers": [{"answer": "Blue.", "rank": 1}, ...]}
    On-policy sets (responses sampled from a policy, scored by a reward model):
        {"prompt": "Sky colour?", "all_generated_responses": ["Blue.", "Green."], "all_rm_scores": [0.9, 0.1]}

An implicit prompt is the longest shared beginning of chosen and rejected, as TRL's extract_prompt finds it:
for text, the shared characters, ending after the last "Assistant:" they contain when they contain one (so
that answers that begin alike keep their first words), else giving a space where they part to the responses;
for conversations, every message but the last, which must be the assistant's turn in both.

The prompt is kept as the file holds it, a string or a list of chat messages, so that `sample` writes messages
back as messages and a reward function receives the prompt as the line holds it; responses are kept as text
(an assistant message's content). Files are .jsonl / .json (read with Python's json module: every value as the
file writes it, so that a string that looks like a date or a number stays a string, and a problem is named at its
line), .parquet, a directory written by the `datasets` library's save_to_disk, or the name of a dataset in the local
Hugging Face cache (read offline, never from the network); those three declare their types and are read with the
`datasets` library, with a split ("train" by default).

Every problem is a `DataError` naming the file, the row (the line of a JSON Lines file, else the row index),
the field and what to change, so the commands print one line and exit 2.

Tokenisation. A string prompt is tokenised once with the tokenizer's special tokens (e.g. Llama's BOS), each
response without them and with EOS appended. Chat messages are rendered with the tokenizer's chat template
(or one passed in): the prompt with add_generation_prompt=True, and each response as the assistant turn of
the whole conversation, its tokens being the full conversation's tokens after the prompt's, so that prompt +
response tokens are exactly the template's tokens for the conversation (end-of-turn token included).
Over-long examples are cut to `max_length` tokens a candidate (prompt + response): the prompt from the left
(its end, next to the answer, is kept), the responses from the right. The texts go through the tokenizer's batch
call in rounds of about ROUND_CHARS characters, and each round's ids are packed into flat arrays
(rrhf_fast.tokens.TokenizedData) before the next: a data set of the size people publish would take gigabytes as
Python lists of ints.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Union

from rrhf_fast.tokens import Builder, TokenizedData, TokenizedExample, id_dtype  # noqa: F401  (TokenizedExample: re-exported)

Messages = list[dict]
Prompt = Union[str, Messages]

FORMATS = (
    "RRHF (query, responses, scores)",
    "TRL listwise (prompt, responses or completions, scores or rewards)",
    "TRL pairwise (prompt optional, chosen, rejected)",
    "UltraFeedback (instruction, completions with response and overall_score)",
    "Nectar (prompt, answers with answer and rank)",
    "on-policy (prompt, all_generated_responses, all_rm_scores)",
)
FILE_KINDS = ".jsonl, .json, .parquet, a save_to_disk directory, or a dataset name in the local Hugging Face cache"


class DataError(ValueError):
    """Bad input data: `str(err)` is "<file>:<line>: <what>", "<file>: row <index>: <what>" or "<file>: <what>"."""

    def __init__(self, path: str, line: int | None, message: str, *, index: int | None = None):
        self.path, self.line, self.index, self.message = path, line, index, message
        if line is not None:
            where = f"{path}:{line}: "
        elif index is not None:
            where = f"{path}: row {index}: "
        else:
            where = f"{path}: "
        super().__init__(where + message)


@dataclass
class Example:
    """One prompt (as the file holds it: text or chat messages) with its candidate responses and their scores."""

    prompt: Prompt
    responses: list[str]
    scores: list[float]
    line: int | None  # 1-based line of a JSON Lines file; None for other files
    index: int = 0  # 0-based row index in the file or split

    @property
    def query(self) -> Prompt:
        """The prompt, under the RRHF format's name."""
        return self.prompt

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


# ----------------------------------------------------------------------------------------------------------
# Checking one record


class _Bad(Exception):
    """A problem in one record; the caller adds the file and row."""


def _describe(value) -> str:
    return type(value).__name__ if value is not None else "null"


def _field(obj: dict, key: str, within: str = ""):
    value = obj.get(key)
    if value is None:  # absent, or null (the `datasets` library fills a key that other rows have with null)
        raise _Bad(f"{within}missing key {key!r}")
    return value


def _list(value, name: str, what: str) -> list:
    if not isinstance(value, list):
        raise _Bad(f"{name} must be a list of {what}, got {_describe(value)}")
    if not value:
        raise _Bad(f"empty {name} list (each prompt needs at least one response)")
    return value


def _score(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{name} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise _Bad(f"{name} is {value}; scores must be finite numbers")
    return float(value)


def _messages(value, name: str) -> Messages:
    """A checked list of chat messages, each {"role": str, "content": str} (keys the `datasets` library set to null dropped)."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"{name} must be a string or a non-empty list of chat messages, got {_describe(value) if value != [] else 'an empty list'}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise _Bad(f'{name}[{i}] must be a chat message {{"role": ..., "content": ...}} with string values')
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _prompt(value, name: str) -> Prompt:
    return value if isinstance(value, str) else _messages(value, name)


def _response(value, name: str, chat: bool = True) -> str:
    """A response as text: a string, or (chat) a list holding one assistant message (TRL's conversational completions)."""
    if isinstance(value, str):
        return value
    if not chat:
        raise _Bad(f"{name} must be a string, got {_describe(value)}")
    if isinstance(value, list):
        messages = _messages(value, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            got = f"a {messages[0]['role']} message" if len(messages) == 1 else f"{len(messages)} messages"
            raise _Bad(f"{name} must be a string or a list of one assistant message, got {got}")
        return messages[0]["content"]
    raise _Bad(f"{name} must be a string or a list of one assistant message, got {_describe(value)}")


def _responses_and_scores(responses, scores, r_name: str, s_name: str, chat: bool = True) -> tuple[list[str], list[float]]:
    responses = _list(responses, r_name, "strings")
    if not isinstance(scores, list):
        raise _Bad(f"{s_name} must be a list of numbers, got {_describe(scores)}")
    if len(responses) != len(scores):
        raise _Bad(f"{len(responses)} {r_name} but {len(scores)} {s_name} (need one score per response)")
    texts = [_response(r, f"{r_name}[{i}]", chat) for i, r in enumerate(responses)]
    return texts, [_score(s, f"{s_name}[{i}]") for i, s in enumerate(scores)]


def _either(obj: dict, names: tuple[str, str]) -> str:
    return names[0] if obj.get(names[0]) is not None or obj.get(names[1]) is None else names[1]


def _parse_rrhf(obj):
    query = _field(obj, "query")
    if not isinstance(query, str):
        raise _Bad(f"query must be a string, got {_describe(query)}")
    return (query, *_responses_and_scores(_field(obj, "responses"), _field(obj, "scores"), "responses", "scores", chat=False))


def _parse_trl_listwise(obj):
    r_key, s_key = _either(obj, ("responses", "completions")), _either(obj, ("scores", "rewards"))
    prompt = _prompt(_field(obj, "prompt"), "prompt")
    return (prompt, *_responses_and_scores(_field(obj, r_key), _field(obj, s_key), r_key, s_key))


def _parse_pairwise(obj):
    chosen, rejected = _field(obj, "chosen"), _field(obj, "rejected")
    if obj.get("prompt") is not None:
        prompt = _prompt(obj["prompt"], "prompt")
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    return prompt, [_response(chosen, "chosen"), _response(rejected, "rejected")], [1.0, 0.0]


def _parse_ultrafeedback(obj):
    instruction = _field(obj, "instruction")
    if not isinstance(instruction, str):
        raise _Bad(f"instruction must be a string, got {_describe(instruction)}")
    completions = _list(_field(obj, "completions"), "completions", "objects with response and overall_score")
    responses, scores = [], []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise _Bad(f"completions[{i}] must be an object with response and overall_score, got {_describe(c)}")
        responses.append(_response(_field(c, "response", f"completions[{i}]: "), f"completions[{i}].response"))
        scores.append(_score(_field(c, "overall_score", f"completions[{i}]: "), f"completions[{i}].overall_score"))
    return instruction, responses, scores


def _parse_nectar(obj):
    prompt = _prompt(_field(obj, "prompt"), "prompt")
    answers = _list(_field(obj, "answers"), "answers", "objects with answer and rank")
    responses, scores = [], []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or a.get("answer") is None or a.get("rank") is None:
            raise _Bad(f"answers[{i}] must be an object with answer and rank (1 is best)")
        responses.append(_response(a["answer"], f"answers[{i}].answer"))
        scores.append(-_score(a["rank"], f"answers[{i}].rank"))  # rank 1 best: -rank makes better higher
    return prompt, responses, scores


def _parse_on_policy(obj):
    prompt = _prompt(_field(obj, "prompt"), "prompt")
    responses, scores = _field(obj, "all_generated_responses"), _field(obj, "all_rm_scores")
    return (prompt, *_responses_and_scores(responses, scores, "all_generated_responses", "all_rm_scores"))


# (name, keys that identify it, parser), in the order they are tried: on-policy and UltraFeedback sets also
# carry chosen / rejected or completions columns, so the more specific keys come first.
_FORMATS = (
    ("rrhf", ("query",), _parse_rrhf),
    ("ultrafeedback", ("instruction", "completions"), _parse_ultrafeedback),
    ("nectar", ("prompt", "answers"), _parse_nectar),
    ("on-policy", ("all_generated_responses",), _parse_on_policy),
    ("pairwise", ("chosen", "rejected"), _parse_pairwise),
    ("trl-listwise", ("prompt", "responses"), _parse_trl_listwise),
    ("trl-listwise", ("prompt", "completions"), _parse_trl_listwise),
)


def detect_format(record: dict) -> str:
    """The name of the format `record` is in ("rrhf", "trl-listwise", "pairwise", "ultrafeedback", "nectar",
    "on-policy"); _Bad listing the keys found and the formats read when it is none of them."""
    for name, keys, _ in _FORMATS:
        if all(record.get(k) is not None for k in keys):
            return name
    found = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
    raise _Bad(f"unknown format: found keys {found}; reads {'; '.join(FORMATS)}")


def _parser(fmt: str):
    return next(parse for name, _, parse in _FORMATS if name == fmt)


def parse_example(obj, path: str, line: int | None, *, index: int = 0, fmt: str | None = None) -> Example:
    """Check one record (a decoded JSON object or a dataset row) and turn it into an Example, or raise DataError.

    `fmt` is the file's format (see `detect_format`); None detects it from this record.
    """
    try:
        if not isinstance(obj, dict):
            raise _Bad(f"expected a JSON object (e.g. with query, responses and scores), got {_describe(obj)}")
        prompt, responses, scores = _parser(fmt or detect_format(obj))(obj)
    except _Bad as bad:
        raise DataError(path, line, str(bad), index=None if line is not None else index) from None
    return Example(prompt, responses, scores, line, index)


def extract_prompt(chosen, rejected):
    """(prompt, chosen response, rejected response) from two texts or conversations that share their beginning.

    Text: the longest shared beginning; when it contains "Assistant:" (Anthropic HH) it ends right after the
    last one, else a space where the two part goes to the responses (TRL's extract_prompt does the same).
    Conversations: every message but the last, which must be an assistant message in both.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind("Assistant:")
        if cut >= 0:
            end = cut + len("Assistant:")
        else:
            end = len(shared) - 1 if shared.endswith(" ") else len(shared)
        return chosen[:end], chosen[end:], rejected[end:]
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _Bad("without a prompt, chosen and rejected must each end with an assistant message")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise _Bad("without a prompt, chosen and rejected must share every message but the last (add a prompt key)")
    return chosen[:-1], chosen[-1:], rejected[-1:]


# ----------------------------------------------------------------------------------------------------------
# Files. JSON and JSON Lines are read with Python's json module, so every value is what the file wrote (a type
# guessed per column would turn "2024-05-01" into a date, or ["2", 3] into strings, and blame the wrong line);
# only the stores that declare their types (parquet, save_to_disk directories, the local Hugging Face cache) are
# read through the `datasets` library, offline.

_ROWS_A_SLICE = 4096  # rows taken from a `datasets` table at a time: Python objects for a slice, not the whole set


def _datasets():
    """The `datasets` module, kept off the network (reading a dataset name looks only in the local cache)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become DataError
    return datasets


def _invalid(path: str, line: int, err: json.JSONDecodeError) -> DataError:
    return DataError(path, line, f"invalid JSON: {err.msg} (column {err.colno})")


def _utf8(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(path, line, "not UTF-8 text") from None


def _json_document(path: str):
    """The whole file as one JSON document, or the JSONDecodeError that says where it breaks."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, raw[: err.start].count(b"\n") + 1, "not UTF-8 text") from None
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, err


def _json_records(path: str):
    """(line, record) for each record of a JSON / JSON Lines file, values as written, blank lines skipped.

    A file that begins with "[" is one JSON array (its records have no line of their own: None); anything else is
    JSON Lines, a record a line, read line by line so that the text of the whole set is never held twice; a single
    object spread over several lines (a pretty-printed .json) is one record. A DataError names the line that
    breaks."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
    if head.startswith(b"["):
        document, err = _json_document(path)
        if err is None:
            yield from ((None, row) for row in (document if isinstance(document, list) else [document]))
            return
        if not err.msg.startswith("Extra data"):  # else: JSON Lines whose first line is an array
            raise _invalid(path, err.lineno, err)
    first = True
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                record = json.loads(_utf8(raw.rstrip(b"\n"), path, line))  # a column past the end is on this line
            except json.JSONDecodeError as err:
                if first:  # perhaps one object over several lines
                    document, whole = _json_document(path)
                    if whole is None:
                        yield line, document
                        return
                raise _invalid(path, line, err) from None
            first = False
            yield line, record


def _table_records(path: str, table):
    """(None, row) for each row of a `datasets` table, taken a slice at a time."""
    for start in range(0, len(table), _ROWS_A_SLICE):
        columns = table[start : start + _ROWS_A_SLICE]
        yield from ((None, dict(zip(columns, values))) for values in zip(*columns.values()))


def _read_parquet(path: str):
    import tempfile

    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="rrhf_fast-data-") as cache:  # no cache left behind
        try:
            return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as err:  # pyarrow / datasets raise many types; the file is what is wrong
            cause = err.__cause__ or err.__context__ or err
            raise DataError(path, None, f"cannot read as parquet: {' '.join(str(cause).split())}") from None


def _pick_split(path: str, loaded, split: str):
    datasets = _datasets()
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(path, None, f"no split {split!r}; it has {', '.join(loaded)} (choose with --data-split / --eval-split)")
        return loaded[split]
    own = str(loaded.split) if loaded.split is not None else "train"
    if split not in (own, "train"):
        raise DataError(path, None, f"holds one split ({own}), not {split!r}")
    return loaded


def iter_rows(path: str, split: str = "train"):
    """(line, record) for each record of `path`: the line of a JSON Lines file (else None) and the record as a dict.

    `path` is a .jsonl / .json / .parquet file, a save_to_disk directory, or a dataset name in the local Hugging
    Face cache; a file is one split, "train". Records come one at a time, so that a caller that keeps only what it
    needs of each never holds the whole set as Python objects."""
    if os.path.isdir(path):
        datasets = _datasets()
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise DataError(path, None, f"is a directory but not one written by save_to_disk; reads {FILE_KINDS}") from None
        return _table_records(path, _pick_split(path, loaded, split))
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".jsonl", ".json", ".parquet"):
            raise DataError(path, None, f"unknown file type {ext or '(no extension)'}; reads {FILE_KINDS}")
        if split != "train":
            raise DataError(path, None, f"a file holds one split, 'train', not {split!r}")
        return _table_records(path, _read_parquet(path)) if ext == ".parquet" else _json_records(path)
    if os.path.exists(path) or path.startswith((os.sep, ".", "~")) or os.path.splitext(path)[1]:
        raise DataError(path, None, "no such file")
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(path, split=split)
    except Exception as err:
        raise DataError(path, None, f"no such file, and no dataset of that name in the local Hugging Face cache ({' '.join(str(err).split())[:200]}); reads {FILE_KINDS}") from None
    return _table_records(path, loaded)


def load_rows(path: str, split: str = "train"):
    """(rows, lines): the records of `path` as dicts, and for a JSON Lines file each row's line (else None)."""
    found = list(iter_rows(path, split))
    if not found:
        raise DataError(path, None, "no examples (the file is empty)")
    lines = [line for line, _ in found]
    return [row for _, row in found], (lines if lines[0] is not None else None)


def read_examples(path: str, split: str = "train") -> list[Example]:
    """All examples of `path` (any format above, detected from the first record), checked; DataError on the first problem."""
    return _parse_records(iter_rows(path, split), path)


def _parse_records(records, path: str) -> list[Example]:
    """Examples of (line, record) pairs, the format detected from the first record; each record is dropped once read."""
    out, fmt = [], None
    for index, (line, row) in enumerate(records):
        if index == 0 and isinstance(row, dict):
            try:
                fmt = detect_format(row)
            except _Bad as bad:
                raise DataError(path, line, str(bad), index=0) from None
        out.append(parse_example(row, path, line, index=index, fmt=fmt))
    if not out:
        raise DataError(path, None, "no examples (the file is empty)")
    return out


def _parse_rows(rows: list, lines: list[int] | None, path: str) -> list[Example]:
    return _parse_records(zip(lines or [None] * len(rows), rows), path)


def read_jsonl(path: str) -> list[Example]:
    """The examples of a JSON Lines file (any format); `read_examples` reads every kind of file."""
    return read_examples(path)


def read_prompts(path: str, split: str = "train") -> list[Example]:
    """Prompts for `sample`: every format above (responses and scores kept), a prompt-only file ({"prompt": ...}
    or {"query": ...} a record, the prompt text or messages), or a .txt file (one prompt a line)."""
    if path.endswith(".txt") and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8-sig") as f:
                found = [(i, t.rstrip("\r\n")) for i, t in enumerate(f, start=1) if t.strip()]
        except UnicodeDecodeError:
            raise DataError(path, None, "not UTF-8 text") from None
        if not found:
            raise DataError(path, None, "no prompts (the file is empty)")
        return [Example(text, [], [], line, i) for i, (line, text) in enumerate(found)]
    rows, lines = load_rows(path, split)
    first = rows[0] if isinstance(rows[0], dict) else {}
    key = next((k for k in ("prompt", "query") if first.get(k) is not None), None)
    try:
        _parser(detect_format(first))(first)
    except _Bad:
        if key is not None:  # prompts without scores: any "responses" are kept (unscored), the rest is ignored
            return [_prompt_only(row, key, path, lines[i] if lines else None, i) for i, row in enumerate(rows)]
    return _parse_rows(rows, lines, path)


def _prompt_only(row, key: str, path: str, line: int | None, index: int) -> Example:
    try:
        if not isinstance(row, dict):
            raise _Bad(f"expected a JSON object with {key!r}, got {_describe(row)}")
        responses = row.get("responses") or []
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise _Bad("responses, when given without scores, must be a list of strings")
        return Example(_prompt(_field(row, key), key), list(responses), [], line, index)
    except _Bad as bad:
        raise DataError(path, line, str(bad), index=index) from None


def record(prompt: Prompt, responses: list[str], scores: list[float]) -> dict:
    """The line `sample` writes for a prompt, in a format read back as it was: RRHF for a text prompt, TRL's
    conversational listwise format (completions as assistant messages) for chat messages."""
    if isinstance(prompt, str):
        return {"query": prompt, "responses": list(responses), "scores": list(scores)}
    completions = [[{"role": "assistant", "content": r}] for r in responses]
    return {"prompt": prompt, "completions": completions, "scores": list(scores)}


def read_chat_template(path: str) -> str:
    """The Jinja chat template in the file `path` (--chat-template FILE); DataError when it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(path, None, "no such file (--chat-template takes a file holding a Jinja chat template)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, None, f"cannot read the chat template: {err}") from None
    if not text.strip():
        raise DataError(path, None, "the chat template file is empty")
    return text


# ----------------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Truncation:
    """How many prompts and responses `tokenize` cut to fit max_length."""

    prompts: int = 0
    responses: int = 0

    def __str__(self) -> str:
        return f"{self.prompts} prompt(s) cut from the left and {self.responses} response(s) cut from the right"


def _template(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the data has chat messages but the tokenizer has no chat template; "
            "pass --chat-template FILE (a Jinja chat template) or use a model whose tokenizer has one"
        )
    return template


def _render(tokenizer, template: str, messages: Messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False).input_ids if texts else []


def encode_prompts(prompts: list[Prompt], tokenizer, chat_template: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, as `tokenize` and generation use them: text with the tokenizer's special tokens
    ([BOS], or [EOS] without one, for an empty text); chat messages rendered by the chat template with the
    generation prompt (the opening of the assistant's turn)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    texts = [p for p in prompts if isinstance(p, str)]
    chats = [p for p in prompts if not isinstance(p, str)]
    text_ids = iter(_encode(tokenizer, texts, True))
    template = _template(tokenizer, chat_template) if chats else None
    chat_ids = iter(_encode(tokenizer, [_render(tokenizer, template, m, generation_prompt=True) for m in chats], False))
    return [(next(text_ids) or [start]) if isinstance(p, str) else next(chat_ids) for p in prompts]


def _chat_responses(examples: list[Example], prompt_ids: list[list[int]], tokenizer, template: str) -> list[list[list[int]]]:
    """Each response of each conversational example: the whole conversation's tokens after the prompt's."""
    convs = [ex.prompt + [{"role": "assistant", "content": r}] for ex in examples for r in ex.responses]
    full = iter(_encode(tokenizer, [_render(tokenizer, template, c, generation_prompt=False) for c in convs], False))
    out = []
    for ex, prompt in zip(examples, prompt_ids):
        group = []
        for i in range(len(ex.responses)):
            ids = next(full)
            if ids[: len(prompt)] != prompt:
                where = f"line {ex.line}" if ex.line is not None else f"row {ex.index}"
                raise ValueError(
                    f"{where}: the chat template renders the prompt differently alone (with the generation prompt) "
                    f"than followed by response {i}; use a template whose earlier turns do not change (--chat-template FILE)"
                )
            group.append(ids[len(prompt) :])
        out.append(group)
    return out


ROUND_CHARS = 2_000_000  # characters of text a round of the tokenizer's batch call takes


def _chars(ex: Example) -> int:
    prompt = len(ex.prompt) if isinstance(ex.prompt, str) else sum(len(m["content"]) for m in ex.prompt)
    return prompt + sum(map(len, ex.responses))


def rounds(examples: list[Example], chars: int = ROUND_CHARS):
    """Consecutive slices of `examples` of about `chars` characters of text each (at least one example)."""
    start, size = 0, 0
    for i, ex in enumerate(examples):
        size += _chars(ex)
        if size >= chars:
            yield examples[start : i + 1]
            start, size = i + 1, 0
    if start < len(examples):
        yield examples[start:]


def _tokenize_round(examples: list[Example], tokenizer, max_length: int, chat_template: str | None, cut: Truncation):
    """[(prompt ids, candidate ids, rewards)] of one round, as Python lists, cut to max_length (counted in `cut`)."""
    prompts = encode_prompts([ex.prompt for ex in examples], tokenizer, chat_template)
    # Batched calls (all texts of the round at once) rather than one per text: much faster for many short texts.
    text_examples = [ex for ex in examples if not ex.conversational]
    flat = iter(_encode(tokenizer, [r for ex in text_examples for r in ex.responses], False))
    chats = [(ex, p) for ex, p in zip(examples, prompts) if ex.conversational]
    template = _template(tokenizer, chat_template) if chats else None
    chat_groups = iter(_chat_responses([ex for ex, _ in chats], [p for _, p in chats], tokenizer, template) if chats else [])
    eos = [tokenizer.eos_token_id]
    out = []
    for ex, prompt in zip(examples, prompts):
        responses = next(chat_groups) if ex.conversational else [next(flat) + eos for _ in ex.responses]
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > max_length:
            keep = max(max_length - longest, max_length // 2)
            if len(prompt) > keep:
                prompt = prompt[len(prompt) - keep :]
                cut.prompts += 1
            room = max_length - len(prompt)
            cut.responses += sum(len(r) > room for r in responses)
            responses = [r[:room] for r in responses]
        out.append((prompt, responses, ex.scores))
    return out


def tokenize(examples: list[Example], tokenizer, max_length: int, chat_template: str | None = None) -> tuple[TokenizedData, Truncation]:
    """Token ids for every example, each candidate (prompt + response) at most max_length tokens, held compactly
    (rrhf_fast.tokens.TokenizedData: indexing it gives a TokenizedExample).

    Text responses end with EOS; chat responses end as the template ends the assistant's turn. The prompt keeps
    its last max(max_length - longest response, max_length // 2) tokens when the two do not fit together; each
    response then keeps its first (max_length - prompt) tokens. `chat_template` (a Jinja string) replaces the
    tokenizer's own for chat messages. The texts go through the tokenizer's batch call in rounds of about
    ROUND_CHARS characters, each round's lists packed into flat buffers before the next, so that Python lists of
    ints never hold more than a round.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    cut = Truncation()
    builder = Builder(id_dtype(max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)))
    for part in rounds(examples):
        builder.add_round(_tokenize_round(part, tokenizer, max_length, chat_template, cut))
    return builder.build(), cut
