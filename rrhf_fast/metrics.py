"""Held-out evaluation: the model as a reward model (ranking accuracy) and the reward of its greedy answers.

Ranking accuracy (the paper's Table 5): over every pair of candidates (i, j) of the same query with
r_i < r_j, the fraction where the model's score p_i (length-normalised log-probability, the quantity the
RRHF loss ranks) is strictly below p_j. Ties in reward make no pair; a tie in score counts as wrong.
"""

import torch

from rrhf_fast.batch import pack_examples
from rrhf_fast.prefix import model_loss


def pair_accuracy(scores, rewards, cu_groups) -> tuple[int, int]:
    """(correct pairs, pairs) for [C] scores and rewards split into groups by cu_groups [G + 1]."""
    scores, rewards, bounds = torch.as_tensor(scores), torch.as_tensor(rewards), torch.as_tensor(cu_groups).tolist()
    correct = pairs = 0
    for first, last in zip(bounds[:-1], bounds[1:]):
        r, p = rewards[first:last], scores[first:last]
        ordered = r[:, None] < r[None, :]  # [k, k]: pair (i, j) with r_i < r_j
        pairs += int(ordered.sum())
        correct += int((ordered & (p[:, None] < p[None, :])).sum())
    return correct, pairs


@torch.no_grad()
def ranking_accuracy(
    model, examples, *, batch_size: int, mode: str, loss_options: dict, max_tokens: int = 4096, pad_token_id: int = 0
) -> float:
    """Ranking accuracy of `model` over tokenised examples (rrhf_fast.data.TokenizedExample)."""
    was_training = model.training
    model.eval()
    correct = pairs = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = pack_examples(chunk, max_tokens=max_tokens, pad_token_id=pad_token_id)
        scores = model_loss(model, batch, mode=mode, **loss_options).scores
        c, p = pair_accuracy(scores.float().cpu(), batch.rewards, batch.cu_groups)
        correct, pairs = correct + c, pairs + p
    model.train(was_training)
    return correct / pairs if pairs else float("nan")


@torch.no_grad()
def greedy_answers(model, tokenizer, queries: list[str], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy continuation of each query, decoded, up to EOS or max_new_tokens."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        for start in range(0, len(queries), batch_size):
            enc = tokenizer(queries[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def mean_reward(reward_fn, queries: list[str], answers: list[str]) -> float:
    """reward_fn(query, answer) averaged over the pairs."""
    return sum(reward_fn(q, a) for q, a in zip(queries, answers)) / len(queries)


def candidate_scores(model, examples, *, batch_size: int, mode: str, length_penalty: float, pad_token_id: int, progress=None):
    """[[score of each candidate] for each example]: length-normalised log-probabilities under `model`.

    progress: wraps the range of batch starts (e.g. a tqdm bar); None: no progress shown."""
    was_training = model.training
    model.eval()
    scores = []
    starts = range(0, len(examples), batch_size)
    with torch.no_grad():
        for start in progress(starts) if progress else starts:
            batch = pack_examples(examples[start : start + batch_size], pad_token_id=pad_token_id)
            flat = model_loss(model, batch, mode=mode, length_penalty=length_penalty).scores.float().cpu().tolist()
            bounds = batch.cu_groups.tolist()
            scores += [flat[first:last] for first, last in zip(bounds[:-1], bounds[1:])]
    model.train(was_training)
    return scores
