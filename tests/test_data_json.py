"""JSON read as the file holds it, the compact token store and its cache (rrhf_fast.data, tokens, token_cache).

Every documented format (README, "Data formats") is written with values a type-guessing reader would change:
strings that look like dates, numbers or booleans, ints beside floats, keys some records lack; each must read as
the same records as the plain RRHF JSONL that spells the same prompts, responses and scores. Bad values are named
at their own line. The store must hold exactly the ids the tokenizer gives each text, and the cache must give back
exactly what it stored and miss when the data, the tokenizer or the template changes.
"""

import json
import os
import random

import numpy as np
import pytest
from test_formats import triples, write_jsonl

from rrhf_fast import data, token_cache, train
from rrhf_fast.data import DataError, iter_rows, read_examples, tokenize
from rrhf_fast.default_model import build_tokenizer
from rrhf_fast.tokens import TokenizedData, id_dtype

DATE, NUMBER, BOOL = "2024-05-01", "3.50", "true"
USER = [{"role": "user", "content": DATE}]


def said(text):
    return [{"role": "assistant", "content": text}]


# name -> (two records in the format, the (prompt, responses, scores) each means). The second record lacks a key the
# first has, and its scores mix ints and floats.
FORMATS = {
    "rrhf": (
        [{"query": DATE, "responses": [NUMBER, BOOL], "scores": [1, 0.5], "id": 7},
         {"query": NUMBER, "responses": ["007", "1e5", "null"], "scores": [2, 1.5, -3]}],
        [(DATE, [NUMBER, BOOL], [1, 0.5]), (NUMBER, ["007", "1e5", "null"], [2, 1.5, -3])],
    ),
    "trl listwise": (
        [{"prompt": DATE, "completions": ["2024-05-02", NUMBER], "rewards": [0.25, 1]},
         {"prompt": "12:30", "completions": [BOOL], "rewards": [3]}],
        [(DATE, ["2024-05-02", NUMBER], [0.25, 1]), ("12:30", [BOOL], [3])],
    ),
    "trl conversational listwise": (
        [{"prompt": USER, "completions": [said(NUMBER), said(DATE)], "scores": [1, 0]},
         {"prompt": [{"role": "user", "content": "42"}], "completions": [said("false")], "scores": [0.5]}],
        [(USER, [NUMBER, DATE], [1, 0]), ([{"role": "user", "content": "42"}], ["false"], [0.5])],
    ),
    "pairwise": (
        [{"prompt": DATE, "chosen": "2024-05-02", "rejected": "no", "id": 1},
         {"prompt": "1999-12-31", "chosen": NUMBER, "rejected": "3"}],
        [(DATE, ["2024-05-02", "no"], [1, 0]), ("1999-12-31", [NUMBER, "3"], [1, 0])],
    ),
    "pairwise conversational": (
        [{"prompt": USER, "chosen": said(DATE), "rejected": said("0")},
         {"prompt": USER, "chosen": said(BOOL), "rejected": said(NUMBER)}],
        [(USER, [DATE, "0"], [1, 0]), (USER, [BOOL, NUMBER], [1, 0])],
    ),
    "implicit prompt": (
        [{"chosen": f"\n\nHuman: {DATE}?\n\nAssistant: 2024-05-02", "rejected": f"\n\nHuman: {DATE}?\n\nAssistant: 3.50"},
         {"chosen": "\n\nHuman: 7\n\nAssistant: 8", "rejected": "\n\nHuman: 7\n\nAssistant: true"}],
        [(f"\n\nHuman: {DATE}?\n\nAssistant:", [" 2024-05-02", " 3.50"], [1, 0]),
         ("\n\nHuman: 7\n\nAssistant:", [" 8", " true"], [1, 0])],
    ),
    "implicit prompt, conversation": (
        [{"chosen": USER + said(NUMBER), "rejected": USER + said(DATE)},
         {"chosen": USER + said("1"), "rejected": USER + said("2")}],
        [(USER, [NUMBER, DATE], [1, 0]), (USER, ["1", "2"], [1, 0])],
    ),
    "ultrafeedback": (
        [{"instruction": DATE, "completions": [{"response": NUMBER, "overall_score": 8, "model": "m"},
                                               {"response": DATE, "overall_score": 2.5}]},
         {"instruction": "100", "completions": [{"response": "1e3", "overall_score": 9.5}]}],
        [(DATE, [NUMBER, DATE], [8, 2.5]), ("100", ["1e3"], [9.5])],
    ),
    "nectar": (
        [{"prompt": DATE, "answers": [{"answer": "2", "rank": 2}, {"answer": NUMBER, "rank": 1}]},
         {"prompt": NUMBER, "answers": [{"answer": BOOL, "rank": 1, "model": "m"}]}],
        [(DATE, ["2", NUMBER], [-2, -1]), (NUMBER, [BOOL], [-1])],
    ),
    "on-policy": (
        [{"prompt": DATE, "all_generated_responses": ["1", "2024"], "all_rm_scores": [0.5, 1]},
         {"prompt": USER, "all_generated_responses": [NUMBER], "all_rm_scores": [-2]}],
        [(DATE, ["1", "2024"], [0.5, 1]), (USER, [NUMBER], [-2])],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_reads_values_as_written(tmp_path, name):
    records, meaning = FORMATS[name]
    examples = read_examples(write_jsonl(tmp_path, records))
    assert triples(examples) == [(p, r, [float(x) for x in s]) for p, r, s in meaning]
    assert all(isinstance(x, str) for ex in examples for x in ex.responses)
    # each record reads as the plain RRHF line that spells it (the conversational listwise line `sample` writes for
    # chat messages, which RRHF cannot hold)
    for i, (ex, (p, r, s)) in enumerate(zip(examples, meaning)):
        plain = read_examples(write_jsonl(tmp_path, [data.record(p, r, s)], f"plain{i}.jsonl"))
        assert triples(plain) == triples([ex]) and (isinstance(p, str)) == ("query" in data.record(p, r, s))


def test_rows_are_the_json_values_themselves(tmp_path):
    """An int stays an int, a date-like string a string, and a key the second line lacks is absent there (a
    type-guessing table would give it null)."""
    records, _ = FORMATS["rrhf"]
    rows = list(iter_rows(write_jsonl(tmp_path, records)))
    assert [line for line, _ in rows] == [1, 2]
    assert rows[0][1] == records[0] and type(rows[0][1]["scores"][0]) is int and "id" not in rows[1][1]


def test_a_json_array_reads_alike(tmp_path):
    records, meaning = FORMATS["nectar"]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    assert triples(read_examples(str(path))) == [(p, r, [float(x) for x in s]) for p, r, s in meaning]


# (the first record's format, a bad second record, what the message says after ":2: ")
BAD_SECOND = [
    ("rrhf", {"query": "q", "responses": ["2", 3], "scores": [1, 2]}, "responses[1] must be a string, got int"),
    ("rrhf", {"query": "q", "responses": [2, 3], "scores": [1, 2]}, "responses[0] must be a string, got int"),
    ("rrhf", {"query": 20240501, "responses": ["a"], "scores": [1]}, "query must be a string, got int"),
    ("rrhf", {"query": "q", "responses": ["a"], "scores": ["1"]}, "scores[0] must be a number, got str"),
    ("trl listwise", {"prompt": "p", "completions": ["a", None], "rewards": [1, 2]}, "completions[1] must be a string or a list of one assistant message, got null"),
    ("pairwise", {"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen must be a string or a list of one assistant message, got int"),
    ("ultrafeedback", {"instruction": "i", "completions": [{"response": "a", "overall_score": "8"}]}, "completions[0].overall_score must be a number, got str"),
    ("nectar", {"prompt": "p", "answers": [{"answer": "a", "rank": "1"}]}, "answers[0].rank must be a number, got str"),
    ("on-policy", {"prompt": "p", "all_generated_responses": ["a", 1.5], "all_rm_scores": [1, 2]}, "all_generated_responses[1] must be a string or a list of one assistant message, got float"),
]  # fmt: skip


@pytest.mark.parametrize("fmt,bad,message", BAD_SECOND)
def test_a_bad_value_is_named_at_its_own_line(tmp_path, fmt, bad, message):
    good = FORMATS[fmt][0][0]
    path = write_jsonl(tmp_path, [good, bad, good])
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value) == f"{path}:2: {message}"


def test_invalid_json_and_bad_bytes_at_their_line(tmp_path):
    good = json.dumps(FORMATS["rrhf"][0][0])
    path = tmp_path / "d.jsonl"
    path.write_bytes((good + "\n\n" + good + "\n").encode() + b'{"query": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4: not UTF-8 text$"):
        read_examples(str(path))
    path.write_text(good + "\n" + good[:-1] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON: Expecting ',' delimiter"):
        read_examples(str(path))


def test_bad_data_through_train_exits_2_with_one_line(tmp_path, capsys):
    """Nothing is trained: no final/, summary.json or metrics.jsonl, and stderr is the one line naming line 2."""
    data_path = write_jsonl(tmp_path, [FORMATS["rrhf"][0][0], BAD_SECOND[0][1]])
    out = tmp_path / "o"
    argv = ["--data", data_path, "--output-dir", str(out), "--tiny-hidden-size", "32", "--tiny-layers", "1", "--device", "cpu"]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"rrhf_fast.train: error: {data_path}:2: responses[1] must be a string, got int"]
    assert "Traceback" not in err
    assert not {"final", "summary.json", "metrics.jsonl"} & set(os.listdir(out))


# ----------------------------------------------------------------------------------------------------------
# The compact store

ALPHABET = "ab cdé\n0123456789-:.?!é中文😀"


def random_text(rng, low=0, high=37):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def random_examples(rng, n):
    return [
        data.Example(random_text(rng), [random_text(rng) for _ in range(rng.randint(1, 5))],
                     [float(rng.randint(-3, 3)) for _ in range(5)], i + 1, i)
        for i in range(n)
    ]  # fmt: skip


def fix_scores(examples):
    for ex in examples:
        ex.scores = ex.scores[: len(ex.responses)]
    return examples


def expected_ids(tok, ex):
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    prompt = tok(ex.prompt).input_ids or [start]
    return prompt, [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in ex.responses]


def tokenizers():
    yield "byte", build_tokenizer()
    smollm2 = os.path.join(os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct")
    smollm2 = os.environ.get("RRHF_FAST_SMOLLM2_DIR") or smollm2
    if os.path.isfile(os.path.join(smollm2, "tokenizer.json")):
        from transformers import AutoTokenizer

        yield "smollm2", AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.parametrize("name,tok", list(tokenizers()))
def test_store_holds_exactly_the_tokenizers_ids(name, tok, monkeypatch):
    """Random odd-length texts (empty ones, multi-byte characters), rounds of ~50 characters so that many rounds
    are stitched together: every group reads back as the tokenizer's own ids."""
    rng = random.Random(7)
    examples = fix_scores(random_examples(rng, 47))
    monkeypatch.setattr(data, "ROUND_CHARS", 50)
    stored, cut = tokenize(examples, tok, 10_000)
    assert (cut.prompts, cut.responses) == (0, 0) and len(stored) == 47
    assert stored.ids.dtype == np.uint16  # both vocabularies fit 16 bits
    for ex, group in zip(examples, stored):
        prompt, candidates = expected_ids(tok, ex)
        assert group.prompt == prompt and group.candidates == candidates and group.rewards == ex.scores
    whole, _ = tokenize(examples, tok, 10_000)  # one round: the same buffers
    monkeypatch.setattr(data, "ROUND_CHARS", 10**9)
    assert all((getattr(whole, a) == getattr(stored, a)).all() for a in ("ids", "offsets", "groups", "rewards"))
    assert [g.prompt for g in stored[3:6]] == [stored[i].prompt for i in (3, 4, 5)] and stored[-1].prompt == stored[46].prompt


def test_store_is_compact_and_wide_ids_fit():
    assert id_dtype(258) == np.uint16 and id_dtype(65536) == np.uint16 and id_dtype(65537) == np.int32
    rng = random.Random(3)
    stored, _ = tokenize(fix_scores(random_examples(rng, 20)), build_tokenizer(), 10_000)
    assert stored.nbytes < 2 * len(stored.ids) + 8 * (len(stored.offsets) + len(stored.groups) + len(stored.rewards)) + 1
    wide = TokenizedData(np.array([70000, 1, 2], np.int32), np.array([0, 1, 3]), np.array([0, 2]), np.array([0.5]))
    assert wide[0].prompt == [70000] and wide[0].candidates == [[1, 2]] and wide[0].rewards == [0.5]


# ----------------------------------------------------------------------------------------------------------
# The cache


def cached(examples, tok, path, directory, template=None, max_length=64):
    got = token_cache.tokenize(examples, tok, max_length, template, path=path, directory=directory)
    got.store()
    return got


def same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in ("ids", "offsets", "groups", "rewards"))  # fmt: skip


def test_cache_gives_back_what_it_stored_and_misses_on_any_change(tmp_path):
    tok, cache = build_tokenizer(), str(tmp_path / "tokenized")
    records = [{"query": "12+3=", "responses": ["15", "16"], "scores": [1, 0]},
               {"query": "abcdefghijkl" * 4, "responses": ["x" * 70], "scores": [1]}]  # fmt: skip
    path = write_jsonl(tmp_path, records)
    examples = read_examples(path)
    first = cached(examples, tok, path, cache)
    again = cached(examples, tok, path, cache)
    assert not first.hit and again.hit and same(first.data, again.data)
    assert (again.cut.prompts, again.cut.responses) == (first.cut.prompts, first.cut.responses) == (1, 1)
    assert same(again.data, tokenize(examples, tok, 64)[0])

    records[0]["responses"][1] = "17"  # the file changes
    write_jsonl(tmp_path, records)
    changed = cached(read_examples(path), tok, path, cache)
    assert not changed.hit and changed.data[0].candidates[1] == list(b"17") + [tok.eos_token_id]

    other = build_tokenizer()
    other.add_tokens(["15"])  # another tokenizer: "15" is one token now
    retok = cached(read_examples(path), other, path, cache)
    assert not retok.hit and retok.data[0].candidates[0] == [len(tok), other.eos_token_id]

    chat = write_jsonl(tmp_path, [{"prompt": USER, "completions": [said("1")], "scores": [1]}], "chat.jsonl")
    templates = ["{% for m in messages %}{{ m['content'] }}</s>{% endfor %}",
                 "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"]  # fmt: skip
    a = cached(read_examples(chat), tok, chat, cache, templates[0])
    b = cached(read_examples(chat), tok, chat, cache, templates[1])
    assert not a.hit and not b.hit and a.data[0].prompt != b.data[0].prompt
    assert cached(read_examples(chat), tok, chat, cache, templates[0]).hit
    assert not cached(read_examples(path), tok, path, cache, max_length=63).hit


def test_a_damaged_cache_file_is_a_miss(tmp_path):
    tok, cache = build_tokenizer(), str(tmp_path / "tokenized")
    path = write_jsonl(tmp_path, [FORMATS["rrhf"][0][0]])
    cached(read_examples(path), tok, path, cache)
    (stored,) = [f for f in os.listdir(cache) if f.endswith(".npz")]
    with open(os.path.join(cache, stored), "r+b") as f:
        f.truncate(100)
    again = cached(read_examples(path), tok, path, cache)
    assert not again.hit and same(again.data, tokenize(read_examples(path), tok, 64)[0])
    assert cached(read_examples(path), tok, path, cache).hit


def test_train_reuses_its_cache(tmp_path, monkeypatch):
    """A second run into the same --output-dir loads the tokens the first stored (the same loss follows), and
    --no-data-cache tokenises afresh."""
    path = write_jsonl(tmp_path, [FORMATS["rrhf"][0][0]] * 4)
    out = tmp_path / "o"
    argv = ["--data", path, "--output-dir", str(out), "--tiny-hidden-size", "32", "--tiny-layers", "1", "--device", "cpu",
            "--max-steps", "1", "--save-every", "0", "--log-every", "1", "--batch-size", "4"]  # fmt: skip
    calls = []
    real = data.tokenize

    def counting(examples, *a, **k):
        calls.append(len(examples))
        return real(examples, *a, **k)

    monkeypatch.setattr(data, "tokenize", counting)
    losses = []
    for extra in ([], ["--overwrite-output-dir"], ["--overwrite-output-dir", "--no-data-cache"]):
        assert train.cli([*argv, *extra]) == 0
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses.append(next(r["loss"] for r in rows if r["type"] == "train"))
    assert len(os.listdir(out / "data" / "tokenized")) == 1
    # run 1: train (miss) + its evaluation queries; run 2: the evaluation queries only; run 3: both again
    assert calls == [4, 4, 4, 4, 4] and losses[0] == losses[1] == losses[2]

