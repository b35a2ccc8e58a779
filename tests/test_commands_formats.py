"""`sample` and `evaluate` on every preference format and file kind (rrhf_fast.data), on the tiny Llama with a small
chat template set on its tokenizer: evaluate's scores against the model's own logits over the template's tokens,
sample's output read back by rrhf_fast.data.read_examples with the same prompts (messages stay messages), and the
prompt a reward function receives."""

import json

import pytest
import torch
from test_formats import FORMATS, TEMPLATE, USER

from rrhf_fast import evaluate, sample
from rrhf_fast.data import read_examples

FAST = ["--device", "cpu", "--batch-size", "2"]


@pytest.fixture(scope="module")
def chat_llama(chat_model_dir) -> str:
    """The tiny Llama directory with TEMPLATE as its tokenizer's chat template (each turn closed by </s>)."""
    return chat_model_dir(TEMPLATE)


@pytest.fixture(scope="module")
def model_and_tokenizer(chat_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(chat_llama).eval(), AutoTokenizer.from_pretrained(chat_llama)


def template_score(model, tokenizer, prompt, response: str) -> float:
    """Mean log-probability of the response tokens from one plain forward over the whole candidate, computed without
    rrhf_fast: a text prompt with its special tokens then response + EOS; a chat prompt as the template's tokens of
    the conversation, the response being what follows the prompt rendered with the generation prompt."""
    if isinstance(prompt, str):
        head = tokenizer(prompt).input_ids or [tokenizer.eos_token_id]
        ids = head + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    else:
        head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True)
        head, ids = [list(getattr(x, "input_ids", x)) for x in (head, ids)]
        assert ids[: len(head)] == head
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    return logp[len(head) - 1 :].gather(1, torch.tensor(ids[len(head) :])[:, None]).mean().item()


def write(tmp_path, records, kind: str) -> str:
    """records as a .jsonl file, a .parquet file or a save_to_disk directory (split "test")."""
    import datasets

    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(path))
    return str(path)


def split_flag(kind: str) -> list[str]:
    return ["--data-split", "test"] if kind == "saved" else []


CASES = [(name, "jsonl") for name in FORMATS] + [
    (name, kind) for kind in ("parquet", "saved") for name in ("trl conversational listwise", "ultrafeedback")
]


def records_of(name: str) -> tuple[list[dict], tuple]:
    """Two records of the format (the example twice: two queries, the second at another position) and what each reads as."""
    raw, expected = FORMATS[name]
    return [raw, raw], expected


@pytest.mark.parametrize("name, kind", CASES)
def test_evaluate_reads_every_format(chat_llama, model_and_tokenizer, tmp_path, name, kind):
    records, (prompt, responses, scores) = records_of(name)
    path, out, summary = write(tmp_path, records, kind), tmp_path / "scores.jsonl", tmp_path / "eval.json"
    args = ["--model", chat_llama, "--data", path, "--out", str(out), "--json", str(summary), *FAST, *split_flag(kind),
            "--reward", f"{__name__}:seen_reward", "--max-new-tokens", "2"]  # fmt: skip
    assert evaluate.cli(args) == 0
    want = [template_score(*model_and_tokenizer, prompt, r) for r in responses]
    for line in map(json.loads, out.read_text().splitlines()):
        assert line["model_scores"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert line.get("query", line.get("prompt")) == prompt and line["responses"] == responses
    pairs = sum(a < b for a in scores for b in scores)
    correct = sum(scores[i] < scores[j] and want[i] < want[j] for i in range(len(scores)) for j in range(len(scores)))
    result = json.loads(summary.read_text())
    assert (result["queries"], result["candidates"], result["pairs"]) == (2, 2 * len(responses), 2 * pairs)
    assert result["rank_acc"] == (pytest.approx(correct / pairs) if pairs else None)
    assert (result["reward"] >= 1000) == (not isinstance(prompt, str))  # the reward got the prompt as the file holds it


def seen_reward(prompt, response):
    """A reward that tells a chat prompt from a text one: 1000 + messages for a list of messages, else its length."""
    if isinstance(prompt, list):
        assert all(set(m) == {"role", "content"} for m in prompt)
        return 1000.0 + len(prompt) + len(response)
    return float(len(prompt) + len(response))


@pytest.mark.parametrize("name, kind", CASES)
def test_sample_reads_every_format_and_train_reads_its_output(chat_llama, tmp_path, name, kind):
    records, (prompt, responses, _) = records_of(name)
    path, out = write(tmp_path, records, kind), tmp_path / "samples.jsonl"
    args = ["--model", chat_llama, "--queries", path, "--out", str(out), "-k", "2", "--max-new-tokens", "3",
            "--keep-existing", "--reward", f"{__name__}:seen_reward", *FAST, *split_flag(kind)]  # fmt: skip
    assert sample.cli(args) == 0
    examples = read_examples(str(out))  # what train reads
    assert [ex.prompt for ex in examples] == [prompt, prompt]
    for ex in examples:
        assert ex.responses[: len(responses)] == responses and len(ex.responses) == len(responses) + 2
        assert ex.scores == [seen_reward(prompt, r) for r in ex.responses]
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == ({"query", "responses", "scores"} if isinstance(prompt, str) else {"prompt", "completions", "scores"})


def test_chat_prompts_end_at_the_templates_end_of_turn(chat_llama, model_and_tokenizer, tmp_path):
    """The sampled chat answers are the model's greedy continuation of the template's generation prompt, cut at </s>
    (the template's end of turn): the tokens training sees for the prompt."""
    path, out = write(tmp_path, [{"prompt": USER}], "jsonl"), tmp_path / "o.jsonl"
    assert sample.cli(["--model", chat_llama, "--queries", path, "--out", str(out), "-k", "1", "--temperature", "0",
                       "--max-new-tokens", "6", "--reward", f"{__name__}:seen_reward", *FAST]) == 0  # fmt: skip
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.apply_chat_template(USER, tokenize=True, add_generation_prompt=True)
    ids = list(getattr(ids, "input_ids", ids))
    new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    new = new[0, len(ids) :].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    line = json.loads(out.read_text())
    assert line["completions"] == [[{"role": "assistant", "content": tokenizer.decode(new)}]]


def test_chat_prompts_without_a_template_exit_2(tiny_llama, tmp_path, capsys):
    path = write(tmp_path, [FORMATS["trl conversational listwise"][0]], "jsonl")
    assert sample.cli(["--model", tiny_llama, "--queries", path, "--out", str(tmp_path / "o.jsonl"), "--reward", "task", *FAST]) == 2
    assert evaluate.cli(["--model", tiny_llama, "--data", path, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no chat template; pass --chat-template FILE" in line for line in err)
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    assert evaluate.cli(["--model", tiny_llama, "--data", path, "--chat-template", str(template), *FAST]) == 0
