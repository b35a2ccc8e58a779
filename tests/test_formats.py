"""Preference formats, file kinds, chat templates and their bad inputs (rrhf_fast.data)."""

import json
import os

import pytest

from rrhf_fast.data import (
    DataError,
    encode_prompts,
    extract_prompt,
    read_chat_template,
    read_examples,
    read_prompts,
    record,
    tokenize,
)
from rrhf_fast.default_model import build_tokenizer

SMOLLM2_DIR = os.environ.get("RRHF_FAST_SMOLLM2_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct"
)
smollm2 = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SMOLLM2_DIR, "config.json")),
    reason=f"SmolLM2 not prepared at {SMOLLM2_DIR} (python examples/prepare_smollm2.py, or set RRHF_FAST_SMOLLM2_DIR)",
)

# A template in the usual shape: every turn closed by </s> (the byte tokenizer's EOS), then a newline.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]


def write_jsonl(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def triples(examples):
    return [(ex.prompt, ex.responses, ex.scores) for ex in examples]


FORMATS = {
    "rrhf": ({"query": "1+2=", "responses": ["3", "4"], "scores": [1, 0.5]}, ("1+2=", ["3", "4"], [1.0, 0.5])),
    "trl listwise": (
        {"prompt": "The sky is", "completions": [" blue.", " red.", " green."], "rewards": [1.0, 0.1, 0.2]},
        ("The sky is", [" blue.", " red.", " green."], [1.0, 0.1, 0.2]),
    ),
    "trl listwise, responses and scores": (
        {"prompt": "Q", "responses": ["a"], "scores": [2]},
        ("Q", ["a"], [2.0]),
    ),
    "trl conversational listwise": (
        {
            "prompt": USER,
            "completions": [[{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Red."}]],
            "scores": [1, 0],
        },
        (USER, ["Blue.", "Red."], [1.0, 0.0]),
    ),
    "pairwise": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, ("The sky is", [" blue.", " green."], [1.0, 0.0])),
    "pairwise conversational": (
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]},
        (USER, ["Blue.", "No."], [1.0, 0.0]),
    ),
    # The shared text is "\n\nHuman: Sky?\n\nAssistant: I" (both answers begin with "I"); the prompt ends after the
    # last "Assistant:" in it, so each answer keeps its " I".
    "implicit prompt, Anthropic HH": (
        {"chosen": "\n\nHuman: Sky?\n\nAssistant: It is blue.", "rejected": "\n\nHuman: Sky?\n\nAssistant: I do not know."},
        ("\n\nHuman: Sky?\n\nAssistant:", [" It is blue.", " I do not know."], [1.0, 0.0]),
    ),
    "implicit prompt, conversation": (
        {
            "chosen": USER + [{"role": "assistant", "content": "Blue."}],
            "rejected": USER + [{"role": "assistant", "content": "Red."}],
        },
        (USER, ["Blue.", "Red."], [1.0, 0.0]),
    ),
    "ultrafeedback": (
        {
            "instruction": "Sky?",
            "completions": [{"response": "Blue.", "overall_score": 8.5, "model": "m1"}, {"response": "Red.", "overall_score": 2}],
        },
        ("Sky?", ["Blue.", "Red."], [8.5, 2.0]),
    ),
    # rank 1 is best: scores -1 > -3 > -2 order the answers as their ranks do.
    "nectar": (
        {"prompt": "\n\nHuman: Sky?\n\nAssistant:", "answers": [{"answer": "Blue", "rank": 1}, {"answer": "Red", "rank": 3}, {"answer": "Grey", "rank": 2}]},
        ("\n\nHuman: Sky?\n\nAssistant:", ["Blue", "Red", "Grey"], [-1.0, -3.0, -2.0]),
    ),
    "on-policy": (
        {"prompt": "Sky?", "all_generated_responses": ["Blue.", "Red."], "all_rm_scores": [0.9, -0.4], "chosen": [{"role": "assistant", "content": "Blue."}]},
        ("Sky?", ["Blue.", "Red."], [0.9, -0.4]),
    ),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_from_jsonl(tmp_path, name):
    raw, expected = FORMATS[name]
    examples = read_examples(write_jsonl(tmp_path, [raw, raw]))
    assert triples(examples) == [expected, expected]
    assert [ex.line for ex in examples] == [1, 2] and [ex.index for ex in examples] == [0, 1]


def test_trl_extract_prompt_gives_the_space_to_the_responses():
    """Without "Assistant:", the shared text "The sky is " ends in a space, which starts each response."""
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("abc", "xyz") == ("", "abc", "xyz")


def test_bom_json_array_parquet_and_save_to_disk_splits(tmp_path):
    import datasets

    raw, expected = FORMATS["ultrafeedback"]
    other, other_expected = FORMATS["trl conversational listwise"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(raw) + "\n\n" + json.dumps(raw) + "\n").encode())
    examples = read_examples(str(bom))
    assert triples(examples) == [expected, expected] and [ex.line for ex in examples] == [1, 3]

    array = tmp_path / "data.json"
    array.write_text(json.dumps([raw, raw], indent=1), encoding="utf-8")
    examples = read_examples(str(array))
    assert triples(examples) == [expected] * 2 and [ex.line for ex in examples] == [None, None]

    parquet = str(tmp_path / "data.parquet")
    datasets.Dataset.from_list([other, other, other]).to_parquet(parquet)
    assert triples(read_examples(parquet)) == [other_expected] * 3

    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([raw]), "test": datasets.Dataset.from_list([other, other])}).save_to_disk(saved)
    assert triples(read_examples(saved)) == [expected]
    assert triples(read_examples(saved, split="test")) == [other_expected] * 2
    with pytest.raises(DataError, match=r"saved: no split 'dev'; it has train, test \(choose with --data-split"):
        read_examples(saved, split="dev")
    with pytest.raises(DataError, match="a file holds one split"):
        read_examples(parquet, split="test")


BAD = [
    # The second line is cut after "scores": [1, its 47th character: the parser breaks at column 48, its end.
    ('{"query": "a", "responses": ["b"], "scores": [1', ":2: invalid JSON: Expecting ',' delimiter (column 48)"),
    # The format is the first record's: a later record in another one lacks that format's keys.
    ('{"prompt": "a", "completions": ["b"], "scores": [1]}', ":2: missing key 'query'"),
    ('{"prompt": "a", "chosen": "b"}', ":2: missing key 'rejected'"),
    ('{"prompt": 3, "chosen": "b", "rejected": "c"}', ":2: prompt must be a string or a non-empty list of chat messages, got int"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', ':2: prompt[0] must be a chat message {"role": ..., "content": ...}'),
    ('{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}', ":2: without a prompt, chosen and rejected must each end with an assistant message"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, line, message):
    first = FORMATS["rrhf"][0] if "query" in line or "completions" in line else FORMATS["pairwise"][0]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(first) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_examples(str(path))
    assert str(info.value).startswith(str(path) + message), str(info.value)


def test_bad_rows_of_other_formats(tmp_path):
    cases = [
        ({"instruction": "a", "completions": [{"response": "b"}]}, "completions[0]: missing key 'overall_score'"),
        ({"prompt": "a", "answers": [{"answer": "b"}]}, "answers[0] must be an object with answer and rank (1 is best)"),
        ({"prompt": "a", "all_generated_responses": ["b", "c"], "all_rm_scores": [1]}, "2 all_generated_responses but 1 all_rm_scores (need one score per response)"),
        ({"prompt": "a", "completions": [[{"role": "user", "content": "b"}]], "scores": [1]}, "completions[0] must be a string or a list of one assistant message, got a user message"),
    ]
    for i, (row, message) in enumerate(cases):
        parquet = str(tmp_path / f"bad{i}.parquet")
        import datasets

        datasets.Dataset.from_list([row]).to_parquet(parquet)
        with pytest.raises(DataError) as info:
            read_examples(parquet)
        assert str(info.value) == f"{parquet}: row 0: {message}"


def test_unknown_format_lists_keys_and_formats(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "hi", "label": None, "id": 1}])
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:1: unknown format: found keys id, text; reads RRHF (query, responses, scores); TRL listwise")
    assert "on-policy (prompt, all_generated_responses, all_rm_scores)" in str(info.value)


def test_missing_paths_and_unknown_kinds(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(str(tmp_path / "absent.parquet"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown file type \.csv; reads \.jsonl"):
        read_examples(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="not one written by save_to_disk"):
        read_examples(str(tmp_path))
    with pytest.raises(DataError, match="no dataset of that name in the local Hugging Face cache"):
        read_examples("no-such-owner-rrhf/no-such-set")


def test_read_prompts_keeps_messages_and_record_reads_back(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": USER}, {"prompt": USER[1:]}])
    prompts = read_prompts(path)
    assert [p.prompt for p in prompts] == [USER, USER[1:]] and prompts[0].responses == []
    unscored = read_prompts(write_jsonl(tmp_path, [{"query": "q", "responses": ["a"]}, {"query": "r"}], "unscored.jsonl"))
    assert [(p.prompt, p.responses, p.line) for p in unscored] == [("q", ["a"], 1), ("r", [], 2)]
    with pytest.raises(DataError, match=r"unscored2.jsonl:2: responses, when given without scores, must be a list of strings"):
        read_prompts(write_jsonl(tmp_path, [{"query": "q"}, {"query": "r", "responses": [3]}], "unscored2.jsonl"))
    txt = tmp_path / "q.txt"
    txt.write_text("a b\n\nc\n", encoding="utf-8")
    assert [(p.prompt, p.line) for p in read_prompts(str(txt))] == [("a b", 1), ("c", 3)]
    back = write_jsonl(tmp_path, [record(USER, ["x", "y"], [0.5, 1.0]), record(USER, ["z"], [2.0])], "out.jsonl")
    assert triples(read_examples(back)) == [(USER, ["x", "y"], [0.5, 1.0]), (USER, ["z"], [2.0])]
    assert triples(read_prompts(back))[0] == (USER, ["x", "y"], [0.5, 1.0])
    text = write_jsonl(tmp_path, [record("q", ["r"], [1.0])], "text.jsonl")
    assert json.loads(open(text).read()) == {"query": "q", "responses": ["r"], "scores": [1.0]}


def conversation_ids(tok, template, messages):
    """The chat template's own tokens for the whole conversation (transformers' tokenize=True path)."""
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_round_trip_with_a_small_template(tmp_path):
    tok = build_tokenizer()
    raw = FORMATS["trl conversational listwise"][0]
    examples = read_examples(write_jsonl(tmp_path, [raw])) + read_examples(write_jsonl(tmp_path, [FORMATS["rrhf"][0]], "text.jsonl"))
    with pytest.raises(ValueError, match="no chat template; pass --chat-template FILE"):
        tokenize(examples, tok, 512)
    (chat, text), cut = tokenize(examples, tok, 512, chat_template=TEMPLATE)
    for response, candidate in zip(raw["completions"], chat.candidates):
        assert chat.prompt + candidate == conversation_ids(tok, TEMPLATE, USER + response)
        assert candidate[-2:] == [tok.eos_token_id, ord("\n")]  # the end of the turn is part of the response
    assert chat.prompt == encode_prompts([USER], tok, TEMPLATE)[0] == list(b"<system>Be brief.") + [257] + list(b"\n<user>Sky?") + [257] + list(b"\n<assistant>")
    assert text.prompt == list(b"1+2=") and text.candidates == [[ord("3"), 257], [ord("4"), 257]]  # unchanged
    assert (cut.prompts, cut.responses) == (0, 0)
    # The prompt is 17 + 1 + 11 + 1 + 12 = 42 tokens, the responses "Blue." and "Red." 5 + 2 and 4 + 2 (</s>, "\n").
    # Cut to 10 tokens a candidate: the prompt keeps its last max(10 - 7, 10 // 2) = 5, each response its first 5.
    (short, _), cut = tokenize(examples, tok, 10, chat_template=TEMPLATE)
    assert len(chat.prompt) == 42 and [len(c) for c in chat.candidates] == [7, 6]
    assert short.prompt == chat.prompt[-5:] and short.candidates == [c[:5] for c in chat.candidates]
    assert (cut.prompts, cut.responses) == (1, 2)


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """This template closes the last turn differently, so the prompt alone is not a prefix of the conversation."""
    tok = build_tokenizer()
    bad = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    examples = read_examples(write_jsonl(tmp_path, [FORMATS["pairwise conversational"][0]]))
    with pytest.raises(ValueError, match="line 1: the chat template renders the prompt differently"):
        tokenize(examples, tok, 64, chat_template=bad)


def test_read_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    assert read_chat_template(str(path)) == TEMPLATE
    with pytest.raises(DataError, match="no such file"):
        read_chat_template(str(tmp_path / "absent.jinja"))
    (tmp_path / "e.jinja").write_text(" \n")
    with pytest.raises(DataError, match="empty"):
        read_chat_template(str(tmp_path / "e.jinja"))


@smollm2
def test_smollm2_chat_round_trip(tmp_path):
    """On SmolLM2's real template: prompt + response tokens are the template's tokens for the conversation,
    ending with <|im_end|> and a newline."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    raw = {
        "prompt": USER,
        "completions": [[{"role": "assistant", "content": "Blue, mostly."}], [{"role": "assistant", "content": ""}]],
        "scores": [1, 0],
    }
    (ex,), _ = tokenize(read_examples(write_jsonl(tmp_path, [raw])), tok, 256)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for response, candidate in zip(raw["completions"], ex.candidates):
        assert ex.prompt + candidate == conversation_ids(tok, None, USER + response)
        assert candidate[-2:] == [end_of_turn, tok("\n", add_special_tokens=False).input_ids[0]]
    assert tok.decode(ex.prompt).endswith("<|im_start|>assistant\n")
