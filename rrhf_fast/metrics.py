"""Held-out evaluation: the model as a reward model (ranking accuracy) and the reward of its greedy answers.

Ranking accuracy (the paper's Table 5): over every pair of candidates (i, j) of the same query with
r_i < r_j, the fraction where the model's score p_i (length-normalised log-probability, the quantity the
RRHF loss ranks) is strictly below p_j. Ties in reward make no pair; a tie in score counts as wrong.

The scores come from the path rrhf_fast.probe found exact on the model (checked.model_loss: the probe's plan, its
mode and head, "logits" being the model's own logits where the fused head is not the model's, as with a logit
softcap or scale), so they equal a plain forward over each candidate alone on any model. Greedy answers are
decoded in batches by rrhf_fast.generation.
"""

import torch

from rrhf_fast import generation
from rrhf_fast.batch import pack_examples
from rrhf_fast.checked import model_loss


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


def _scored_batches(model, examples, *, batch_size: int, mode: str, loss_options: dict, max_tokens: int, pad_token_id: int, progress=None):
    """(packed batch, [C] scores on the CPU) for each batch of batch_size examples, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    starts = range(0, len(examples), batch_size)
    try:
        for start in progress(starts) if progress else starts:
            batch = pack_examples(examples[start : start + batch_size], max_tokens=max_tokens, pad_token_id=pad_token_id)
            with torch.no_grad():  # the probe, at the first batch, takes its own gradients
                scores = model_loss(model, batch, mode=mode, **loss_options).scores
            yield batch, scores.float().cpu()
    finally:
        model.train(was_training)


def ranking_accuracy(
    model, examples, *, batch_size: int, mode: str, loss_options: dict, max_tokens: int = 4096, pad_token_id: int = 0
) -> float:
    """Ranking accuracy of `model` over tokenised examples (rrhf_fast.data.TokenizedExample); NaN without pairs."""
    correct = pairs = 0
    batches = _scored_batches(model, examples, batch_size=batch_size, mode=mode, loss_options=loss_options,
                              max_tokens=max_tokens, pad_token_id=pad_token_id)  # fmt: skip
    for batch, scores in batches:
        c, p = pair_accuracy(scores, batch.rewards.cpu(), batch.cu_groups.cpu())
        correct, pairs = correct + c, pairs + p
    return correct / pairs if pairs else float("nan")


def candidate_scores(
    model, examples, *, batch_size: int, mode: str, length_penalty: float = 1.0, pad_token_id: int = 0,
    max_tokens: int = 4096, progress=None, loss_options: dict | None = None,
) -> list[list[float]]:  # fmt: skip
    """[[score of each candidate] for each example]: length-normalised log-probabilities under `model`.

    progress: wraps the range of batch starts (e.g. a tqdm bar); None: no progress shown."""
    options = dict(loss_options or {}, length_penalty=length_penalty)
    out = []
    batches = _scored_batches(model, examples, batch_size=batch_size, mode=mode, loss_options=options,
                              max_tokens=max_tokens, pad_token_id=pad_token_id, progress=progress)  # fmt: skip
    for batch, scores in batches:
        flat, bounds = scores.tolist(), batch.cu_groups.tolist()
        out += [flat[first:last] for first, last in zip(bounds[:-1], bounds[1:])]
    return out


def greedy_answers(model, tokenizer, queries: list, *, batch_size: int, max_new_tokens: int, chat_template=None) -> list[str]:
    """The model's greedy continuation of each query (text or chat messages), decoded, up to a stop token or
    max_new_tokens: rrhf_fast.generation.greedy_answers, batch_size queries decoded together."""
    return generation.greedy_answers(model, tokenizer, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     chat_template=chat_template)  # fmt: skip


def mean_reward(reward_fn, queries: list, answers: list[str], *, name: str = "reward") -> float:
    """reward_fn(query, answer) (or on lists) averaged over the pairs; ValueError naming the query when it raises
    or returns anything but a finite number (rrhf_fast.generation.score_responses)."""
    scores = generation.score_responses(reward_fn, queries, [[a] for a in answers], name=name)
    return sum(s for (s,) in scores) / len(queries)
