"""RRHF JSONL reading, checking and tokenisation (rrhf_fast.data)."""

import json

import pytest

from rrhf_fast.data import DataError, read_jsonl, tokenize
from rrhf_fast.default_model import build_tokenizer

GOOD = {"query": "1+2=", "responses": ["3", "4"], "scores": [1.0, 0.5]}


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_reads_good_file_skipping_blank_lines(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "scores": [0, 2], "extra": 1})])
    examples = read_jsonl(path)
    assert [ex.line for ex in examples] == [1, 3]
    assert examples[1].scores == [0.0, 2.0] and isinstance(examples[1].scores[0], float)
    assert examples[0].responses == ["3", "4"] and examples[0].query == "1+2="


BAD_LINES = [
    ('{"query": "a", "responses": ["b"], "scores": [1.0]', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"responses": ["b"], "scores": [1.0]}', "missing key 'query'"),
    ('{"query": "a", "scores": [1.0]}', "missing key 'responses'"),
    ('{"query": "a", "responses": ["b"]}', "missing key 'scores'"),
    ('{"query": 3, "responses": ["b"], "scores": [1.0]}', "query must be a string"),
    ('{"query": "a", "responses": "b", "scores": [1.0]}', "responses must be a list"),
    ('{"query": "a", "responses": [], "scores": []}', "empty responses list"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0]}', "2 responses but 1 scores"),
    ('{"query": "a", "responses": ["b", 7], "scores": [1.0, 2.0]}', "responses[1] must be a string, got int"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0, NaN]}', "scores[1] is nan"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [Infinity, 1]}', "scores[0] is inf"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0, "2"]}', "scores[1] must be a number, got str"),
    ('{"query": "a", "responses": ["b", "c"], "scores": [1.0, true]}', "scores[1] must be a number, got bool"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", line])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(write_lines(tmp_path, ["", "  "]))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="bin.jsonl:1: not UTF-8"):
        read_jsonl(str(binary))


def _examples(tmp_path, records):
    return read_jsonl(write_lines(tmp_path, [json.dumps(r) for r in records]))


def test_tokenize_query_once_responses_with_eos(tmp_path):
    tok = build_tokenizer()
    (ex,), cut = tokenize(_examples(tmp_path, [{"query": "12+3=", "responses": ["15", ""], "scores": [1, 0]}]), tok, 64)
    assert ex.prompt == list(b"12+3=")
    assert ex.candidates == [list(b"15") + [tok.eos_token_id], [tok.eos_token_id]]
    assert ex.rewards == [1.0, 0.0]
    assert (cut.prompts, cut.responses) == (0, 0)


def test_tokenize_cuts_prompt_from_left_and_responses_from_right(tmp_path):
    tok = build_tokenizer()
    records = [
        {"query": "abcdefghij", "responses": ["xy", "0123456789"], "scores": [0, 1]},  # 10 + 11 > 12
        {"query": "q", "responses": ["ok"], "scores": [1]},  # fits
    ]
    (long_ex, short_ex), cut = tokenize(_examples(tmp_path, records), tok, 12)
    # The prompt keeps max(12 - 11, 12 // 2) = 6 tokens from its end; responses keep 12 - 6 = 6 from their start.
    assert long_ex.prompt == list(b"efghij")
    assert long_ex.candidates == [list(b"xy") + [tok.eos_token_id], list(b"012345")]
    assert short_ex.prompt == list(b"q")
    assert (cut.prompts, cut.responses) == (1, 1)
    assert all(len(long_ex.prompt) + len(c) <= 12 for c in long_ex.candidates)


def test_empty_query_gets_a_start_token(tmp_path):
    tok = build_tokenizer()
    (ex,), _ = tokenize(_examples(tmp_path, [{"query": "", "responses": ["a"], "scores": [1]}]), tok, 8)
    assert ex.prompt == [tok.eos_token_id]
