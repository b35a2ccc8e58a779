"""Online RRHF (`rrhf_fast.train --reward ...` on prompts, rrhf_fast.online, rrhf_fast.trainer) on the tiny Llama.

Checked against computations made without the trainer: the candidates of a step are what `rrhf_fast.sample` writes
for the same seed and prompts; the logged loss is rrhf_fast.reference's RRHF loss of those candidates and rewards
through the model's own float64 forward; the logged reward figures are recomputed from what the reward functions
saw (tests/online_rewards.py records every call); a resumed run is the uninterrupted one; the Python entry point is
the command; two torchrun processes are one process with the global batch.
"""

import json
import os
import statistics

import pytest
import torch

import online_rewards
from online_rewards import CALLS
from rrhf_fast import online, reference, sample, train
from rrhf_fast.trainer import RRHFConfig, RRHFTrainer
from test_train import count_probes, interrupt_during_step, load_weights

PROMPTS = ["12+34=", "7+5=", "two+two=", "99+1=", "ten+one=", "3+4=", "50+50=", "8+8="]
HELD_OUT = ["1+2=", "7+5=", "6+6="]
K, NEW, BATCH = 3, 5, 2


@pytest.fixture()
def files(tmp_path):
    """(training prompts, held-out prompts): prompt-only JSONL with an answer column."""
    paths = []
    for name, prompts in (("train", PROMPTS), ("eval", HELD_OUT)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": str(eval(p[:-1].replace("two", "2").replace("ten", "10").replace("one", "1")))}) + "\n"
                                for p in prompts))  # fmt: skip
        paths.append(str(path))
    return paths


def argv(model, files, out, *extra):
    return ["--model", model, "--data", files[0], "--eval-data", files[1], "--reward", "online_rewards:length",
            "-k", str(K), "--max-completion-length", str(NEW), "--batch-size", str(BATCH), "--max-steps", "3",
            "--log-every", "1", "--save-every", "0", "--eval-every", "0", "--learning-rate", "1e-3", "--threads", "1",
            "--device", "cpu", "--output-dir", str(out), *extra]  # fmt: skip


def step_calls(name="length"):
    """The reward calls of training steps (K x BATCH completions), not of the held-out greedy answers."""
    return [c for c in CALLS if c[0] == name and len(c[2]) == K * BATCH]


def rows(out, kind="train"):
    timings = ("tokens_per_s", "peak_mem_mb", "generation_s", "reward_s", "train_s")
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    return [{k: v for k, v in r.items() if k not in timings} for r in lines if r["type"] == kind]


def run(args) -> int:
    CALLS.clear()
    return train.cli(args)


# ----------------------------------------------------------------------------------------------------------
# What a step draws and computes


def test_a_step_samples_what_rrhf_fast_sample_writes(tiny_llama, files, tmp_path):
    """Step 1 samples from the starting model what `sample --seed 0` writes for the step's prompts; step 2, from the
    model after step 1 (checkpoint-1), what sample writes as lines 3-4 of the prompts of steps 1 and 2."""
    out = tmp_path / "run"
    assert run(argv(tiny_llama, files, out, "--max-steps", "2", "--save-every", "1")) == 0
    steps = step_calls()
    assert len(steps) == 2
    drawn = [p for _, prompts, _, _ in steps for p in prompts[::K]]
    for model, lines, call in ((tiny_llama, slice(0, 2), steps[0]), (str(out / "checkpoint-1"), slice(2, 4), steps[1])):
        queries, written = tmp_path / f"q{lines.start}.jsonl", tmp_path / f"s{lines.start}.jsonl"
        queries.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in drawn[: lines.stop]))
        assert sample.cli(["--model", model, "--queries", str(queries), "--out", str(written), "-k", str(K),
                           "--max-new-tokens", str(NEW), "--seed", "0", "--reward", "online_rewards:per_item",
                           "--device", "cpu"]) == 0  # fmt: skip
        sampled = [json.loads(line)["responses"] for line in written.read_text().splitlines()][lines]
        assert [c for group in sampled for c in group] == call[2]
    assert len(set(drawn)) == 4  # four different prompts: a fresh one each time within the epoch


@pytest.mark.parametrize("bar", [None, 0.99], ids=["sft-always", "sft-min-reward"])
def test_the_step_loss_is_the_reference_loss_of_the_drawn_groups(tiny_llama, files, tmp_path, monkeypatch, bar):
    """The logged loss of step 1 (before any update) is rrhf_fast.reference's loss of the drawn candidates and rewards
    through the starting model's own float64 forward, each candidate after its prompt alone. With --sft-min-reward a
    group whose best reward is below it keeps its ranking term only: the mean over groups of rank_g + [kept] sft_g."""
    draws = []
    real = online.Source.draw
    monkeypatch.setattr(online.Source, "draw", lambda self, *a, **kw: draws.append(real(self, *a, **kw)) or draws[-1])
    extra = ["--max-steps", "1"] + (["--sft-min-reward", str(bar)] if bar is not None else [])
    assert run(argv(tiny_llama, files, tmp_path / "o", *extra)) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    (draw,) = draws
    (call,) = step_calls()
    texts, expected = iter(call[2]), online_rewards.length(call[1], call[2])
    losses = []
    for group, rewards in zip(draw.groups, draw.rewards):
        logits, targets, bounds = [], [], [0]
        for cand, r in zip(group.candidates, rewards):
            text = next(texts)
            ended = len(cand) <= NEW and cand[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(cand[:-1] if ended else cand, skip_special_tokens=True) == text
            assert r == expected.pop(0)  # what the reward gave for what it saw
            with torch.no_grad():
                full = model(torch.tensor([group.prompt + cand])).logits[0]
            logits.append(full[len(group.prompt) - 1 : -1])
            targets += cand
            bounds.append(bounds[-1] + len(cand))
        kept = bar is None or max(rewards) >= bar
        losses.append(reference.rrhf_loss_from_logits(
            torch.cat(logits), torch.tensor(targets), torch.tensor(bounds), torch.tensor(rewards, dtype=torch.float64),
            torch.tensor([0, len(rewards)]), sft_weight=1.0 if kept else 0.0,
        ).loss.item())  # fmt: skip
    (logged,) = rows(tmp_path / "o")
    assert logged["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert logged["frac_sft"] == sum(bar is None or max(r) >= bar for r in draw.rewards) / BATCH
    if bar is not None:
        assert 0 < logged["frac_sft"] < 1  # the bar keeps one group's SFT term and drops the other's


def test_logged_reward_figures_and_tied_groups(tiny_llama, files, tmp_path):
    """reward, reward_std (n - 1), the completion lengths and frac_reward_zero_std of every step, recomputed from what
    the reward saw: the prompts starting with "t" get 1 for every completion, so their groups tie."""
    assert run(argv(tiny_llama, files, tmp_path / "o", "--max-steps", "4")) == 0
    logged = rows(tmp_path / "o")
    assert len(logged) == 4
    ties_seen = 0
    for row, (_, prompts, completions, _) in zip(logged, step_calls()):
        rewards = online_rewards.length(prompts, completions)
        groups = [rewards[i : i + K] for i in range(0, len(rewards), K)]
        tied = sum(len(set(g)) == 1 for g in groups)
        ties_seen += tied
        assert row["frac_reward_zero_std"] == tied / BATCH
        assert row["reward"] == pytest.approx(statistics.mean(rewards))
        assert row["reward_std"] == pytest.approx(statistics.stdev(rewards))
        assert row["rewards/length/mean"] == pytest.approx(statistics.mean(rewards))
        assert row["prompts"] == row["step"] * BATCH and 0 <= row["completions/clipped_ratio"] <= 1
        assert 1 <= row["completions/min_length"] <= row["completions/mean_length"] <= row["completions/max_length"] <= NEW
    assert ties_seen >= 2  # the two "t" prompts were drawn in these 8 draws of an 8-prompt epoch
    CALLS.clear()


def test_reward_weights_combine_as_trls(tiny_llama, files, tmp_path):
    """Two TRL-style rewards with --reward-weights 0.5 -2: the step's reward is the mean of 0.5 length - 2 digits
    over its completions, each function's mean is logged under its name, and the answer column reaches the one that
    asks for it, aligned with the completions (one value a completion)."""
    args = argv(tiny_llama, files, tmp_path / "o", "--reward", "online_rewards:digits", "--reward-weights", "0.5", "-2",
                "--max-steps", "2")  # fmt: skip
    assert run(args) == 0
    answers = {json.loads(line)["prompt"]: json.loads(line)["answer"] for line in open(files[0])}
    for row, lengths, digit_calls in zip(rows(tmp_path / "o"), step_calls("length"), step_calls("digits")):
        _, prompts, completions, columns = digit_calls
        assert completions == lengths[2] and columns["answer"] == [answers[p] for p in prompts]
        first = online_rewards.length(prompts, completions)
        second = online_rewards.digits(prompts, completions, columns["answer"])
        assert row["reward"] == pytest.approx(statistics.mean(0.5 * a - 2 * b for a, b in zip(first, second)))
        assert row["rewards/length/mean"] == pytest.approx(statistics.mean(first))
        assert row["rewards/digits/mean"] == pytest.approx(statistics.mean(second))


def test_rewards_get_chat_completions_as_messages_and_name_a_bad_value():
    """For chat prompts TRL hands completions over as [{"role": "assistant", "content": ...}]; a value that is not a
    finite number names the function and the prompt."""
    seen = []

    def reward(prompts, completions, **columns):
        seen.append(completions)
        return [len(c if isinstance(c, str) else c[0]["content"]) for c in completions]

    chat = [{"role": "user", "content": "hi"}]
    rewards = online.Rewards([reward, online_rewards.per_item], ["reward", "per_item"], [2.0, 1.0])
    combined, per_function = rewards.score([chat, "text"], ["abcd", "xy"], [[1], [2]], [{}, {}])
    assert seen == [[[{"role": "assistant", "content": "abcd"}], "xy"]]
    assert per_function == [[4.0, 2.0], [1.0, 2.0]] and combined == [9.0, 6.0]
    bad = online.Rewards([lambda prompts, completions, **kw: [None] * len(prompts)], ["none"])
    with pytest.raises(ValueError, match="none: returned None for prompt 'p'"):
        bad.score(["p"], ["c"], [[1]], [{}])
    with pytest.raises(ValueError, match="--reward-weights: 1 weights for 2"):
        online.Rewards([reward, reward], ["a", "b"], [1.0])


@pytest.mark.parametrize("reward", ["raises_on_seven", "nan_on_seven"])
def test_a_reward_that_raises_or_is_not_finite_exits_2_naming_the_prompt(tiny_llama, files, tmp_path, capsys, reward):
    """The held-out prompts include 7+5=: the first held-out evaluation scores it and the run ends there."""
    args = argv(tiny_llama, files, tmp_path / "o")
    args[args.index("online_rewards:length")] = f"online_rewards:{reward}"
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrhf_fast.train: error:") and "'7+5='" in err[0], err


def test_one_exactness_check_a_run(tiny_llama, files, tmp_path, monkeypatch):
    """The plan checked before the first sample (on candidates cut from the prompts' tokens) serves every sampled step
    and every held-out evaluation: one probe in a run of 3 steps evaluated at every step."""
    calls = count_probes(monkeypatch)
    assert run(argv(tiny_llama, files, tmp_path / "o", "--eval-every", "1")) == 0
    assert calls == ["auto"]


@pytest.mark.parametrize("extra, message", [
    (["--reward-weights", "1", "2"], "--reward-weights: 2 weights for 1 rewards"),
    (["--reference-column", "nothing"], "train.jsonl:1: --reference-column nothing: missing"),
    (["--max-completion-length", "600"], "--model-max-length 512 leaves no token of the prompt"),
])  # fmt: skip
def test_bad_online_flags_exit_2(tiny_llama, files, tmp_path, capsys, extra, message):
    assert run(argv(tiny_llama, files, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


def test_online_flags_need_a_reward(tmp_path, capsys):
    assert train.cli(["--sft-min-reward", "1", "--output-dir", str(tmp_path)]) == 2
    assert "--sft-min-reward is for online RRHF" in capsys.readouterr().err


def test_the_reference_answer_is_one_more_candidate(tiny_llama, files, tmp_path, monkeypatch):
    """--reference-column answer: every group holds the k samples and, last, the answer's tokens + EOS, scored by the
    same reward."""
    draws = []
    real = online.Source.draw
    monkeypatch.setattr(online.Source, "draw", lambda self, *a, **kw: draws.append(real(self, *a, **kw)) or draws[-1])
    assert run(argv(tiny_llama, files, tmp_path / "o", "--reference-column", "answer", "--max-steps", "1")) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    answers = [json.loads(line) for line in open(files[0])]
    for group, rewards in zip(draws[0].groups, draws[0].rewards):
        answer = next(a["answer"] for a in answers if tokenizer(a["prompt"]).input_ids == group.prompt)
        assert len(group.candidates) == K + 1 and group.candidates[-1] == tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert rewards[-1] == online_rewards.length([tokenizer.decode(group.prompt)], [answer])[0]


# ----------------------------------------------------------------------------------------------------------
# Resume, the Python entry point, LoRA, DDP


def test_an_interrupted_online_run_resumes_to_the_uninterrupted_run(tiny_llama, files, tmp_path, monkeypatch):
    """Sampling included: the steps after the resume draw and train on what the uninterrupted run did."""
    whole = argv(tiny_llama, files, tmp_path / "whole", "--max-steps", "4", "--save-every", "2")
    assert run(whole) == 0
    cut = argv(tiny_llama, files, tmp_path / "cut", "--max-steps", "4", "--save-every", "2")
    with monkeypatch.context() as m:
        interrupt_during_step(m, 3)
        assert run(cut) == 130
    assert os.path.isdir(tmp_path / "cut" / "checkpoint-3")
    assert run([*cut, "--resume"]) == 0
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    a, b = load_weights(tmp_path / "cut" / "final"), load_weights(tmp_path / "whole" / "final")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_python_entry_point_is_the_command(tiny_llama, files, tmp_path):
    """RRHFTrainer with TRL's argument names (8 completions a step: 2 prompts x 4) runs what the command runs: the same
    logged steps and the same final weights."""
    rows_of = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    config = RRHFConfig(output_dir=str(tmp_path / "py"), num_generations=4, max_completion_length=NEW,
                        per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=0,
                        use_cpu=True, threads=1)  # fmt: skip
    trainer = RRHFTrainer(model=tiny_llama, reward_funcs=online_rewards.length, args=config,
                          train_dataset=rows_of(files[0]), eval_dataset=rows_of(files[1]))  # fmt: skip
    summary = trainer.train()
    assert summary["steps"] == 3
    command = argv(tiny_llama, files, tmp_path / "cmd", "-k", "4")
    assert run(command) == 0
    assert rows(tmp_path / "py") == rows(tmp_path / "cmd") and rows(tmp_path / "py", "eval") == rows(tmp_path / "cmd", "eval")
    a, b = load_weights(tmp_path / "py" / "final"), load_weights(tmp_path / "cmd" / "final")
    assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="per_device_train_batch_size \\(6\\) must be a multiple of num_generations \\(4\\)"):
        RRHFTrainer(tiny_llama, online_rewards.length, RRHFConfig(per_device_train_batch_size=6), rows_of(files[0])).train()


def test_the_python_entry_point_trains_a_model_object_in_place(tiny_llama, files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RRHFConfig(output_dir=str(tmp_path / "py"), num_generations=K, per_device_train_batch_size=K * BATCH,
                        max_completion_length=NEW, max_steps=2, learning_rate=1e-3, save_steps=0, use_cpu=True)  # fmt: skip
    RRHFTrainer(model, [online_rewards.length], config, files[0], processing_class=tokenizer).train()
    after = load_weights(tmp_path / "py" / "final")
    assert all(torch.equal(model.state_dict()[k], after[k]) for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="processing_class"):
        RRHFTrainer(model, [online_rewards.length], config, files[0])


def test_lora_online(tiny_llama, files, tmp_path):
    from peft import LoraConfig

    config = RRHFConfig(output_dir=str(tmp_path / "lora"), num_generations=K, per_device_train_batch_size=K * BATCH,
                        max_completion_length=NEW, max_steps=2, learning_rate=1e-3, save_steps=1, use_cpu=True)  # fmt: skip
    trainer = RRHFTrainer(tiny_llama, online_rewards.length, config, files[0], peft_config=LoraConfig(r=4, lora_alpha=8))
    assert trainer.train()["steps"] == 2
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    assert trainer.command_line()[-8:] == ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.0", "--lora-target-modules", "all-linear"]
    assert (tmp_path / "lora" / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_two_processes_sample_their_own_prompts_and_equal_one_process(tiny_llama, files, tmp_path):
    """torchrun, two gloo processes of --batch-size 1: each rank samples its own prompt of every micro-batch, from the
    generator of its place in the run's order, so the job draws and trains what one process with --batch-size 2 does."""
    from test_distributed import assert_same_training, torchrun

    args = [a.replace("online_rewards:", "tests.online_rewards:") for a in argv(tiny_llama, files, "ddp", "--max-steps", "2")]
    torchrun([*args, "--batch-size", "1"], tmp_path)
    assert run(argv(tiny_llama, files, tmp_path / "one", "--max-steps", "2")) == 0
    assert_same_training(rows(tmp_path / "ddp"), rows(tmp_path / "one"), rel=1e-5)
    ddp, one = rows(tmp_path / "ddp", "eval"), rows(tmp_path / "one", "eval")
    assert len(ddp) == len(one) and all(a.keys() == b.keys() for a, b in zip(ddp, one))
    for a, b in zip(ddp, one):
        assert a == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in b.items()}


def test_fsdp_samples_the_whole_micro_batch_on_every_rank_and_equals_ddp(tiny_llama, files, tmp_path):
    """Under --fsdp every rank decodes all ranks' prompts of a micro-batch (an FSDP2 forward is a collective) and keeps
    its own share: the job trains what the DDP job does."""
    from test_distributed import assert_same_training, torchrun

    args = [a.replace("online_rewards:", "tests.online_rewards:") for a in argv(tiny_llama, files, "out", "--max-steps", "2")]
    torchrun([*args, "--batch-size", "1", "--output-dir", "ddp"], tmp_path)
    torchrun([*args, "--batch-size", "1", "--output-dir", "fsdp", "--fsdp"], tmp_path)
    assert_same_training(rows(tmp_path / "fsdp"), rows(tmp_path / "ddp"), rel=1e-5)


def test_a_checkpoints_weights_load_into_a_given_model_whole_or_not_at_all(tmp_path):
    """checkpoint.load_weights, the trainer's resume into a model it was handed: a tied head saved once loads, equal
    to the saved model; a checkpoint lacking a key the model has, or holding one it lacks, is a ValueError, never a partial
    load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rrhf_fast import checkpoint

    def tiny(seed, **kw):
        torch.manual_seed(seed)
        options = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=True) | kw  # fmt: skip
        return LlamaForCausalLM(LlamaConfig(**options))

    saved, into = tiny(0), tiny(1)
    saved.save_pretrained(tmp_path / "ckpt")
    checkpoint.load_weights(into, str(tmp_path / "ckpt"))
    ids = torch.randint(0, 37, (1, 7))
    assert torch.equal(into(ids).logits, saved(ids).logits)
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.load_weights(tiny(2, tie_word_embeddings=False), str(tmp_path / "ckpt"))  # lm_head.weight missing
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.load_weights(tiny(3, num_hidden_layers=1), str(tmp_path / "ckpt"))  # layers.1 unexpected
