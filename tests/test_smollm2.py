"""A real pretrained model: SmolLM2-135M-Instruct (30 layers, vocabulary 49152, a real chat template).

Run where examples/prepare_smollm2.py has prepared it (or RRHF_FAST_SMOLLM2_DIR names it), skipped elsewhere:
one training step through the trainer on a conversational file, rrhf_fast.sequence_scores on prefix_forward's
hidden states against the model's own logits on chat-rendered candidates, and the probe's plan for it. The
example's reward and prompts (examples/) need no model and always run.
"""

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file
from test_formats import SMOLLM2_DIR, smollm2

from rrhf_fast import pack_batch, prefix_forward, sequence_scores
from rrhf_fast.data import read_examples, tokenize

SYSTEM = {"role": "system", "content": "Answer in one word."}
# Two queries, k = 3 and 2, answers of different lengths (one a single word: a short candidate).
RECORDS = [
    {
        "prompt": [SYSTEM, {"role": "user", "content": "What colour is the sky on a clear day?"}],
        "completions": [
            [{"role": "assistant", "content": "Blue."}],
            [{"role": "assistant", "content": "It is usually a light shade of blue."}],
            [{"role": "assistant", "content": "Green, I think."}],
        ],
        "scores": [1.0, 0.4, 0.0],
    },
    {
        "prompt": [SYSTEM, {"role": "user", "content": "Which animal barks?"}],
        "completions": [
            [{"role": "assistant", "content": "Dog"}],
            [{"role": "assistant", "content": "The animal that barks is the dog, of course."}],
        ],
        "scores": [1.0, 0.2],
    },
]


@pytest.fixture(scope="module")
def smollm2_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(SMOLLM2_DIR)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2_data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return str(path)


def chat_batch(tokenizer, path):
    """The file's groups rendered with the real chat template, packed."""
    examples, _ = tokenize(read_examples(path), tokenizer, 256)
    batch = pack_batch([ex.prompt for ex in examples], [ex.candidates for ex in examples],
                       [ex.rewards for ex in examples], max_tokens=512)  # fmt: skip
    return examples, batch


@smollm2
def test_one_training_step_changes_the_weights(tmp_path, chat_file):
    """The trainer on SmolLM2 with a conversational file: exit 0, and final/ holds weights that moved."""
    from rrhf_fast import train

    out = tmp_path / "run"
    argv = [
        "--model", SMOLLM2_DIR, "--data", chat_file, "--eval-data", chat_file, "--output-dir", str(out),
        "--max-steps", "1", "--batch-size", "2", "--learning-rate", "1e-4", "--warmup-steps", "0",
        "--threads", "1", "--save-every", "0", "--model-max-length", "128",
    ]  # fmt: skip
    assert train.cli(argv) == 0
    before = load_file(f"{SMOLLM2_DIR}/model.safetensors")
    after = load_file(str(out / "final" / "model.safetensors"))
    moved = [name for name in before if name in after and not torch.equal(before[name], after[name])]
    # AdamW's first step moves every weight with a non-zero gradient by about the learning rate.
    assert "model.norm.weight" in moved and "model.layers.29.mlp.down_proj.weight" in moved, moved[:5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary, "summary.json is empty"


@smollm2
def test_sequence_scores_equal_the_models_own_logits(smollm2_model, chat_file):
    """Fused head on prefix_forward's hidden states (auto mode) against the mean log-probability of each
    chat-rendered candidate from model(prompt + candidate).logits alone, in float64 from the fp32 logits."""
    model, tokenizer = smollm2_model
    examples, batch = chat_batch(tokenizer, chat_file)
    with torch.no_grad():
        hidden = prefix_forward(model, batch, "auto")
        weight = model.get_output_embeddings().weight
        ours = sequence_scores(hidden, weight, batch.targets, batch.cu_seqlens)
        expected = []
        for ex in examples:
            for cand in ex.candidates:
                logits = model(torch.tensor([ex.prompt + cand])).logits[0, len(ex.prompt) - 1 : -1]
                logp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(cand)[:, None])
                expected.append(logp.mean())
    expected = torch.stack(expected)
    assert ours.shape == (5,)
    # Five distinct scores: a wrong gather or a shifted position would not give these values.
    torch.testing.assert_close(ours.double(), expected, atol=2e-4, rtol=1e-4)
    assert expected.unique().numel() == 5


@smollm2
def test_probe_plans_the_fused_head(smollm2_model, chat_file):
    """SmolLM2 is a plain Llama with a tied linear head and full attention: the probe keeps the fused head and the
    mode that resolve_mode picks first; the plan is cached for the next call."""
    from rrhf_fast import probe
    from rrhf_fast.prefix import resolve_mode

    model, tokenizer = smollm2_model
    _, batch = chat_batch(tokenizer, chat_file)
    plan = probe.plan(model, batch)
    assert plan.head == "fused"
    assert plan.mode == resolve_mode(model, "auto")
    assert plan.mode in ("kv-cache", "packed")
    assert probe.plan(model, batch) is plan


@smollm2
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fast_path_holds_on_every_batch(smollm2_model, tmp_path, dtype):
    """Four batches of arithmetic chat (one and two questions of five answers), in float32 and under bfloat16
    autocast: every one keeps the fused head and kv-cache, each path's error far below the bound (the float32
    rounding of the old in-dtype comparison crossed its bound on one batch in four here)."""
    from examples import arithmetic_chat
    from rrhf_fast import probe

    model, tokenizer = smollm2_model
    examples, _ = tokenize(read_examples(arithmetic_chat.write(str(tmp_path / "a.jsonl"), 6, seed=1)), tokenizer, 256)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    for part in (examples[0:1], examples[1:2], examples[2:4], examples[4:6]):
        batch = pack_batch([e.prompt for e in part], [e.candidates for e in part], [e.rewards for e in part])
        with context:
            plan = probe.run_probe(model, batch)
        assert (plan.mode, plan.head, plan.reason) == ("kv-cache", "fused", ""), plan
        assert all(err <= probe.TOLERANCE / 100 for path, err in plan.errors if not path.startswith("twin")), plan


@smollm2
def test_the_trainer_takes_the_fast_path_under_bf16(tmp_path):
    """`train --bf16` on the arithmetic chat file: summary.json records the fused head and a sharing mode."""
    from examples import arithmetic_chat
    from rrhf_fast import train

    data = arithmetic_chat.write(str(tmp_path / "a.jsonl"), 4, seed=2)
    out = tmp_path / "run"
    argv = [
        "--model", SMOLLM2_DIR, "--data", data, "--eval-data", data, "--eval-max-examples", "1", "--output-dir",
        str(out), "--max-steps", "1", "--threads", "1", "--save-every", "0", "--bf16",
    ]  # fmt: skip
    assert train.cli(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head"] == "fused" and summary["prefix_mode"] in ("kv-cache", "packed"), summary


def test_brevity_reward_and_prompts():
    """The example's reward reads the limit from the prompt (text or the last user message): 1 for 1..N words,
    N / words above (4 / 8 = 0.5), 0 for nothing; its prompts are disjoint and each carries a limit."""
    from examples.brevity_reward import reward, word_limit
    from examples.iterated_rrhf_smollm2 import make_questions

    chat = [{"role": "system", "content": "at most 99 words"}, {"role": "user", "content": "Sky? Answer in at most 4 words."}]
    assert word_limit(chat) == 4 and word_limit("no limit here") == 8
    assert reward(chat, "It is blue today") == 1.0
    assert reward(chat, "one two three four five six seven eight") == 0.5
    assert reward(chat, "  \n") == 0.0
    train, held_out = make_questions(30, 7, seed=0)
    assert len(train) == 30 and len(held_out) == 7 and not set(train) & set(held_out)
    assert all(2 <= word_limit(q) <= 10 and q.endswith("words.") for q in train + held_out)
