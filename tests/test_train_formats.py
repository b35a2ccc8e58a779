"""The trainer on every preference format and file kind rrhf_fast.data reads (issue 14, the train part).

Each case writes a few records in one format, trains 2 steps on the tiny_llama fixture (a copy whose tokenizer has a
small chat template), and compares the first step's logged loss with the RRHF loss computed here without rrhf_fast:
the records as a person reads them (prompt, responses, best-first scores written by hand), tokenised by hand
(a text prompt with the tokenizer's special tokens and each response with EOS appended; a conversation through the
template's own rendering), every candidate scored by one plain forward of the model. The step-1 loss is the loss
of the initial weights over every group (--batch-size is the number of records), so a format whose scores are read
the wrong way round, whose prompt is cut in the wrong place or whose responses are swapped fails.
"""

import json
import os

import pytest
import torch

from rrhf_fast import train

# Every turn ends with a newline; the generation prompt opens the assistant's turn.
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# (records as the file holds them, what they mean: [(prompt, responses, scores)])
FORMATS = {
    "rrhf": (
        [{"query": "12+7=", "responses": ["19", "18", "1"], "scores": [1.0, 0.5, 0.0]},
         {"query": "3+4=", "responses": ["6", "7"], "scores": [0.0, 1.0]}],
        [("12+7=", ["19", "18", "1"], [2, 1, 0]), ("3+4=", ["6", "7"], [0, 1])],
    ),
    "trl-standard": (
        [{"prompt": "The sky is", "completions": [" green.", " blue.", " loud"], "rewards": [0.2, 0.9, -1.0]},
         {"prompt": "Grass is", "completions": [" green", " red"], "rewards": [3, 1]}],
        [("The sky is", [" green.", " blue.", " loud"], [1, 2, 0]), ("Grass is", [" green", " red"], [1, 0])],
    ),
    "trl-conversational": (
        [{"prompt": user("Sky?"), "completions": [assistant("Green."), assistant("Blue.")], "scores": [0, 1]},
         {"prompt": user("Grass?"), "completions": [assistant("Green"), assistant("Red"), assistant("?")], "scores": [5, 2, 1]}],
        [(user("Sky?"), ["Green.", "Blue."], [0, 1]), (user("Grass?"), ["Green", "Red", "?"], [2, 1, 0])],
    ),
    "pairwise": (
        [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "Hi", "chosen": " there", "rejected": "!!"}],
        [("2+2=", ["4", "5"], [1, 0]), ("Hi", [" there", "!!"], [1, 0])],
    ),
    "implicit-prompt": (  # Anthropic HH: the prompt ends after the last "Assistant:"
        [{"chosen": "\n\nHuman: 2+2?\n\nAssistant: four", "rejected": "\n\nHuman: 2+2?\n\nAssistant: five"},
         {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}],
        [("\n\nHuman: 2+2?\n\nAssistant:", [" four", " five"], [1, 0]), ("\n\nHuman: Hi\n\nAssistant:", [" Hello", " Go"], [1, 0])],
    ),
    "implicit-conversational": (  # every message but the last
        [{"chosen": user("Sky?") + assistant("Blue."), "rejected": user("Sky?") + assistant("Red.")},
         {"chosen": user("1+1?") + assistant("2"), "rejected": user("1+1?") + assistant("3")}],
        [(user("Sky?"), ["Blue.", "Red."], [1, 0]), (user("1+1?"), ["2", "3"], [1, 0])],
    ),
    "ultrafeedback": (
        [{"instruction": "Name a colour.", "completions": [{"response": "Car", "overall_score": 2.0},
                                                          {"response": "Blue", "overall_score": 8.5},
                                                          {"response": "Red", "overall_score": 7.0}]},
         {"instruction": "5-3=", "completions": [{"response": "2", "overall_score": 9}, {"response": "3", "overall_score": 1}]}],
        [("Name a colour.", ["Car", "Blue", "Red"], [0, 2, 1]), ("5-3=", ["2", "3"], [1, 0])],
    ),
    "nectar": (  # rank 1 is best
        [{"prompt": "\n\nHuman: Colour?\n\nAssistant:", "answers": [{"answer": "Red", "rank": 2}, {"answer": "Blue", "rank": 1},
                                                                 {"answer": "Loud", "rank": 3}]},
         {"prompt": "\n\nHuman: 1+2?\n\nAssistant:", "answers": [{"answer": "3", "rank": 1}, {"answer": "4", "rank": 2}]}],
        [("\n\nHuman: Colour?\n\nAssistant:", ["Red", "Blue", "Loud"], [1, 2, 0]), ("\n\nHuman: 1+2?\n\nAssistant:", ["3", "4"], [1, 0])],
    ),
    "on-policy": (
        [{"prompt": user("Sky?"), "all_generated_responses": ["Blue", "Green", "Grey"], "all_rm_scores": [0.9, -0.3, 0.1]},
         {"prompt": "Count: 1 2", "all_generated_responses": [" 3", " 4"], "all_rm_scores": [2.5, -1.0]}],
        [(user("Sky?"), ["Blue", "Green", "Grey"], [2, 0, 1]), ("Count: 1 2", [" 3", " 4"], [1, 0])],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def chat_model(chat_model_dir) -> str:
    """A copy of the tiny_llama fixture whose tokenizer has TEMPLATE as its chat template."""
    return chat_model_dir(TEMPLATE)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def hand_tokenized(tokenizer, prompt, responses):
    """(prompt ids, [response ids]) as docs/data-formats.md describes them, without rrhf_fast."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
        return ids, [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]

    def render(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(prompt, True)
    full = [render(prompt + assistant(r), False) for r in responses]
    assert all(f[: len(ids)] == ids for f in full)
    return ids, [f[len(ids) :] for f in full]


def independent_scores(model_dir, groups) -> list[list[float]]:
    """Each candidate's mean log-probability (length penalty 1) under the model in model_dir, from a plain float64
    log-softmax of the candidate's own forward after its prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for prompt, responses, _ in groups:
            prompt_ids, candidates = hand_tokenized(tokenizer, prompt, responses)
            p = []
            for c in candidates:
                logp = torch.log_softmax(model(torch.tensor([prompt_ids + c])).logits[0, :-1].double(), -1)
                p.append(logp[len(prompt_ids) - 1 :].gather(1, torch.tensor(c)[:, None]).mean().item())
            out.append(p)
    return out


def pairs(scores):
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] < scores[j]]


def independent_loss(model_dir, groups) -> float:
    """The RRHF loss (length penalty 1, rank and SFT weights 1, margin 0, SFT the best candidate's mean NLL):
    (1/G) sum_g [sum_{s_i < s_j} max(0, p_i - p_j) - p_best]."""
    total = 0.0
    for p, (_, _, scores) in zip(independent_scores(model_dir, groups), groups):
        total += sum(max(0.0, p[i] - p[j]) for i, j in pairs(scores)) - p[scores.index(max(scores))]
    return total / len(groups)


def independent_accuracy(model_dir, groups) -> float:
    """The fraction of pairs s_i < s_j with p_i < p_j."""
    found = [(p[i] < p[j]) for p, (_, _, s) in zip(independent_scores(model_dir, groups), groups) for i, j in pairs(s)]
    return sum(found) / len(found)


def train_run(model_dir, data, out, *extra) -> list[dict]:
    """A 2-step in-process run; its metrics.jsonl rows."""
    argv = ["--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--save-every", "0", "--log-every", "1", "--device", "cpu", "--threads", "1", *extra]  # fmt: skip
    assert train.cli(argv) == 0
    return [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]


def first_loss(rows) -> float:
    return next(r["loss"] for r in rows if r["type"] == "train" and r["step"] == 1)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_trains_with_the_loss_of_its_records(fmt, chat_model, tmp_path):
    records, meaning = FORMATS[fmt]
    rows = train_run(chat_model, write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "o")
    assert first_loss(rows) == pytest.approx(independent_loss(chat_model, meaning), rel=1e-5)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]
    assert os.path.isfile(tmp_path / "o" / "final" / "model.safetensors")


def test_scores_read_the_wrong_way_round_would_fail(chat_model):
    """The comparison above tells the orders apart: reversing every group's scores changes the loss."""
    _, meaning = FORMATS["ultrafeedback"]
    reversed_ = [(p, r, [-s for s in scores]) for p, r, scores in meaning]
    assert independent_loss(chat_model, reversed_) != pytest.approx(independent_loss(chat_model, meaning), rel=1e-3)


def test_parquet_file(chat_model, tmp_path):
    from datasets import Dataset

    records, meaning = FORMATS["ultrafeedback"]
    path = str(tmp_path / "d.parquet")
    Dataset.from_list(records).to_parquet(path)
    rows = train_run(chat_model, path, tmp_path / "o")
    assert first_loss(rows) == pytest.approx(independent_loss(chat_model, meaning), rel=1e-5)


def test_save_to_disk_dataset_with_two_splits(chat_model, tmp_path, capsys):
    """--data-split picks what trains, --eval-split what is held out: the first step's loss is the train split's, and
    the held-out ranking accuracy before training is the test split's (pairwise records, 2 pairs)."""
    from datasets import Dataset, DatasetDict

    train_records, meaning = FORMATS["trl-conversational"]
    test_records, test_meaning = FORMATS["pairwise"]
    DatasetDict({"train": Dataset.from_list(train_records), "test": Dataset.from_list(test_records)}).save_to_disk(tmp_path / "ds")
    ds = str(tmp_path / "ds")
    rows = train_run(chat_model, ds, tmp_path / "o", "--data-split", "train", "--eval-data", ds, "--eval-split", "test")
    assert first_loss(rows) == pytest.approx(independent_loss(chat_model, meaning), rel=1e-5)
    before = next(r for r in rows if r["type"] == "eval" and r["step"] == 0)
    assert before["rank_acc"] == independent_accuracy(chat_model, test_meaning)
    assert train.cli(["--model", chat_model, "--data", ds, "--data-split", "validation", "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rrhf_fast.train: error: ") and "no split 'validation'" in err and "train, test" in err


def test_chat_template_file_for_a_tokenizer_without_one(tiny_llama, tmp_path, capsys):
    """Conversational data on the plain tiny_llama (no chat template): exit 2 saying to pass --chat-template; with
    --chat-template FILE it trains with the loss of the template's own rendering."""
    records, meaning = FORMATS["trl-conversational"]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert train.cli(["--model", tiny_llama, "--data", data, "--output-dir", str(tmp_path / "o1"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.train: error: ") and "--chat-template FILE" in err[0]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    rows = train_run(tiny_llama, data, tmp_path / "o2", "--chat-template", str(template))
    assert first_loss(rows) == pytest.approx(independent_loss(tiny_llama, meaning), rel=1e-5)
    assert train.cli(["--model", tiny_llama, "--data", data, "--chat-template", str(tmp_path / "nope.jinja"),
                      "--output-dir", str(tmp_path / "o3")]) == 2  # fmt: skip
    assert "no such file" in capsys.readouterr().err
