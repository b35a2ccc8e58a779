"""Online RRHF: the training groups of a step sampled from the current policy and scored, instead of read from a file.

`rrhf_fast.train --data prompts.jsonl --reward module:function -k 4` (or --reward-model PATH) trains this way: every
micro-batch draws its prompts as offline data would (a shuffled order an epoch, each rank its own share), and then

    sample   k candidates a prompt from the model being trained (rrhf_fast.generation: the prompts of the micro-batch
             prefilled once together, each prompt's cache repeated to its k rows), --temperature / --top-p, at most
             --max-completion-length tokens. The j-th prompt drawn in the run (counting every rank's share of every
             micro-batch in order) samples from generator query_seed(--seed, j), as line j of a queries file does in
             rrhf_fast.sample: the candidates of a step are what `sample --seed S` writes for the prompts drawn so far,
             and a resumed run draws what an uninterrupted one would.
    score    every reward on all the micro-batch's candidates at once (TRL's signature, see Rewards), combined as
             sum_i weight_i * reward_i (TRL's reward_weights); a reward that raises or gives no finite number is
             bad input naming the prompt.
    add      with --reference-column NAME, the prompt's reference answer (that column of its record) as one more
             candidate, scored by the same rewards: the paper's way to keep a good answer in every group.
    train    the RRHF loss on the groups; with --sft-min-reward X, a group whose best reward is below X trains with
             the ranking term only (SFT on the best of k wrong answers teaches the wrong answer). Off by default: on
             SmolLM2-135M's multiplication task (benchmarks/bench_online.py) the ranking term alone collapsed the
             model within 4 steps, SFT on every group's best sample held, and the reference answer did best.

A candidate's tokens are the sampled ones, followed by the end token when the sample stopped (the chat template's
end of turn for chat prompts, EOS for text, as rrhf_fast.data.tokenize ends a candidate) and cut where
--max-completion-length stopped it (clipped: no end token). A group whose rewards all tie gives no pair to rank;
their fraction is logged as frac_reward_zero_std, with what a GRPO user reads (reward mean and std in all and per
reward function, completion lengths, clipped ratio, seconds spent sampling and scoring).

The prompts: any file rrhf_fast.sample reads (prompt-only {"prompt": ...} or {"query": ...} records, text or chat
messages; a preference file's prompts; .txt one a line). Every other column of a record goes to the reward
functions as a keyword argument, a list with one value a completion, as TRL passes a dataset's columns.
"""

import inspect
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from rrhf_fast import generation
from rrhf_fast.data import Example, TokenizedExample, encode_prompts, read_prompts, tokenize


@dataclass
class Prompts:
    """The prompts of an online run as read: the prompts (text or chat messages), each record's other columns, and
    where each came from (for errors)."""

    path: str
    prompts: list
    columns: list[dict]
    lines: list  # 1-based line of a JSON Lines file, or None


def read(path: str, split: str = "train") -> Prompts:
    """The prompts of `path` (rrhf_fast.data.read_prompts) and the other columns of their records."""
    from rrhf_fast.data import load_rows

    examples = read_prompts(path, split)
    rows = [{} for _ in examples] if path.endswith(".txt") else load_rows(path, split)[0]
    keys = ("prompt", "query")
    columns = [{k: v for k, v in row.items() if k not in keys} if isinstance(row, dict) else {} for row in rows]
    return Prompts(path, [ex.prompt for ex in examples], columns, [ex.line for ex in examples])


# ----------------------------------------------------------------------------------------------------------
# Rewards


def takes_completions(fn) -> bool:
    """Whether `fn` has TRL's reward signature, f(prompts, completions, **columns) -> list[float]: it names a
    `completions` parameter or takes **kwargs. Otherwise it is rrhf_fast's f(prompt, response) -> float (or on lists,
    generation.is_batched_reward)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completions" or p.kind is p.VAR_KEYWORD for p in parameters)


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass
class Rewards:
    """The reward functions of a run, their names (for the logs and errors) and weights.

    Each function is called once a micro-batch on all its candidates. TRL's kind gets keyword arguments:
    prompts (one a completion, repeated k times), completions (text, or [{"role": "assistant", "content": text}]
    for a chat prompt, as TRL passes them), completion_ids (token ids; the reference answer's, for it) and every
    other column of the prompts' records; it returns one float a completion. rrhf_fast's kind (the reward of
    `rrhf_fast.sample --reward`) gets (prompt, response text) or the lists of them."""

    functions: list
    names: list[str]
    weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.functions:
            raise ValueError("reward_funcs: give at least one reward function or reward model")
        if len(self.names) != len(self.functions):
            raise ValueError(f"reward names: {len(self.names)} for {len(self.functions)} reward functions")
        if not self.weights:
            self.weights = [1.0] * len(self.functions)
        if len(self.weights) != len(self.functions):
            raise ValueError(f"--reward-weights: {len(self.weights)} weights for {len(self.functions)} reward functions "
                             f"({', '.join(self.names)}); give one a function")  # fmt: skip
        if not all(_finite(w) for w in self.weights):
            raise ValueError(f"--reward-weights: {self.weights} must be finite numbers")

    def score(self, prompts: list, completions: list[str], completion_ids: list, columns: list[dict]) -> tuple[list[float], list[list[float]]]:
        """(the weighted sum of the rewards of each completion, [function][completion] rewards); prompts[i] and
        columns[i] belong to completion i. ValueError naming the function and the prompt on a failure."""
        per_function = [self._one(fn, name, prompts, completions, completion_ids, columns)
                        for fn, name in zip(self.functions, self.names)]  # fmt: skip
        combined = [sum(w * r[i] for w, r in zip(self.weights, per_function)) for i in range(len(completions))]
        return combined, per_function

    def _one(self, fn, name, prompts, completions, completion_ids, columns) -> list[float]:
        if not takes_completions(fn):
            scores = generation.score_responses(fn, prompts, [[c] for c in completions], name=name)
            return [s for (s,) in scores]
        keys = sorted({k for c in columns for k in c})
        kwargs = {k: [c.get(k) for c in columns] for k in keys if k not in ("prompts", "completions", "completion_ids")}
        shown = [c if isinstance(p, str) else [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        try:
            values = list(fn(prompts=prompts, completions=shown, completion_ids=completion_ids, **kwargs))
        except Exception as err:
            first = _failing_prompt(fn, prompts, shown, completion_ids, kwargs)
            raise ValueError(f"{name}: raised {type(err).__name__}: {err} on prompt {first!r}") from None
        if len(values) != len(completions):
            raise ValueError(f"{name}: returned {len(values)} rewards for {len(completions)} completions; give one a completion")
        for prompt, value in zip(prompts, values):
            if not _finite(value):
                raise ValueError(f"{name}: returned {value!r} for prompt {prompt!r}; expected a finite float")
        return [float(v) for v in values]


def _failing_prompt(fn, prompts, completions, completion_ids, kwargs):
    """The first prompt whose completions alone make `fn` raise (the whole batch's first prompt when none does)."""
    for i in range(len(prompts)):
        try:
            fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], completion_ids=completion_ids[i : i + 1],
               **{k: v[i : i + 1] for k, v in kwargs.items()})  # fmt: skip
        except Exception:
            return prompts[i]
    return prompts[0]


def function_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# ----------------------------------------------------------------------------------------------------------
# The groups of a step


@dataclass
class Options:
    """What a draw needs from the run's config."""

    k: int
    max_completion_length: int
    temperature: float
    top_p: float
    seed: int
    sft_min_reward: float | None = None


@dataclass
class Draw:
    """One micro-batch's groups and what the logs report about them (this rank's share)."""

    groups: list[TokenizedExample]
    rewards: list[list[float]]  # [prompt][candidate] combined, the reference last where there is one
    sampled: list[list[float]]  # [function][completion]: the rewards of the sampled completions alone
    lengths: list[int]  # sampled completion lengths (tokens, the end token not counted)
    clipped: int  # sampled completions cut at --max-completion-length
    tied: int  # groups whose rewards all tie
    sft_kept: list[bool]  # groups that keep their SFT term (--sft-min-reward)
    generation_s: float
    reward_s: float

    def share(self, first: int, last: int, k: int, limit: int) -> "Draw":
        """The draw of groups first:last alone (a rank's share under FSDP2, where every rank samples them all); k the
        sampled candidates a group, limit --max-completion-length."""
        lengths = self.lengths[first * k : last * k]
        return Draw(self.groups[first:last], self.rewards[first:last], [v[first * k : last * k] for v in self.sampled],
                    lengths, sum(n == limit for n in lengths), sum(max(r) == min(r) for r in self.rewards[first:last]),
                    self.sft_kept[first:last], self.generation_s, self.reward_s)  # fmt: skip


class Source:
    """The online groups of a run: its prompts encoded once, its rewards, and the draw of each micro-batch."""

    def __init__(self, prompts: Prompts, tokenizer, rewards: Rewards, options: Options, *, max_length: int,
                 stop_token_ids, reference_column: str | None = None, chat_template: str | None = None):  # fmt: skip
        self.prompts, self.tokenizer, self.rewards, self.options = prompts, tokenizer, rewards, options
        self.stops = list(stop_token_ids)
        room = max_length - options.max_completion_length
        if room < 1:
            raise ValueError(f"--model-max-length {max_length} leaves no token of the prompt beside --max-completion-length "
                             f"{options.max_completion_length}; raise it or lower --max-completion-length")  # fmt: skip
        ids = encode_prompts(prompts.prompts, tokenizer, chat_template)
        self.cut = sum(len(p) > room for p in ids)
        self.prompt_ids = [p[len(p) - room :] if len(p) > room else p for p in ids]  # the end, next to the answer, kept
        ends = {kind: self._end_token(kind, chat_template) for kind in {isinstance(p, str) for p in prompts.prompts}}
        self.end_tokens = [ends[isinstance(p, str)] for p in prompts.prompts]
        self.references = self._references(reference_column, max_length, chat_template) if reference_column else None
        self.reference_column = reference_column

    def _end_token(self, text: bool, chat_template) -> int:
        """The token that ends a sampled candidate that stopped: the chat template's end of turn after chat prompts
        (text=False), EOS after text ones."""
        if not text:
            template_tokenizer = self.tokenizer
            if chat_template is not None:
                import copy

                template_tokenizer = copy.copy(self.tokenizer)
                template_tokenizer.chat_template = chat_template
            end = generation.chat_end_of_turn(template_tokenizer)
            if end is not None:
                return end
        return self.tokenizer.eos_token_id

    def _references(self, column: str, max_length: int, chat_template) -> list[tuple[str, list[int]]]:
        """(text, token ids) of every prompt's reference answer, tokenised as offline data is (rrhf_fast.data.tokenize)."""
        texts = []
        for i, (columns, line) in enumerate(zip(self.prompts.columns, self.prompts.lines)):
            value = columns.get(column)
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):  # [{"role": "assistant", ...}]
                value = value[0].get("content")
            if not isinstance(value, str) or not value:
                where = f"{self.prompts.path}:{line}" if line is not None else f"{self.prompts.path}: row {i}"
                got = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
                raise ValueError(f"{where}: --reference-column {column}: {got}; every prompt needs a non-empty reference answer (text)")
            texts.append(value)
        examples = [Example(p, [t], [0.0], None) for p, t in zip(self.prompts.prompts, texts)]
        tokenized, _ = tokenize(examples, self.tokenizer, max_length, chat_template)
        return [(t, ex.candidates[0]) for t, ex in zip(texts, tokenized)]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def draw(self, model, indices: list[int], positions: list[int], generate=None) -> Draw:
        """The groups of the prompts at `indices`, the i-th sampled from generator query_seed(seed, positions[i]).

        generate(fn) runs the sampling (default: fn()); under FSDP2 the trainer passes one that runs it inside the
        root module's hooks, where the whole model is gathered."""
        o = self.options
        t0 = time.perf_counter()
        sample = lambda: generation.sample_candidates(  # noqa: E731
            model, [self.prompt_ids[i] for i in indices], o.k, max_new_tokens=o.max_completion_length,
            stop_token_ids=self.stops, temperature=o.temperature, top_p=o.top_p, seed=o.seed, positions=positions,
            batch_size=max(1, len(indices)), pad_token_id=self.tokenizer.pad_token_id or 0,
        )  # fmt: skip
        sampled = (generate or (lambda fn: fn()))(sample)
        t1 = time.perf_counter()
        prompts, completions, ids, columns = [], [], [], []
        for i, candidates in zip(indices, sampled):
            for tokens in candidates:
                prompts.append(self.prompts.prompts[i])
                completions.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
                ids.append(list(tokens))
                columns.append(self.prompts.columns[i])
            if self.references is not None:
                text, ref_ids = self.references[i]
                prompts.append(self.prompts.prompts[i])
                completions.append(text)
                ids.append(list(ref_ids))
                columns.append(self.prompts.columns[i])
        combined, per_function = self.rewards.score(prompts, completions, ids, columns)
        t2 = time.perf_counter()
        per_group = o.k + (self.references is not None)
        groups, rewards, kept, lengths, clipped, tied = [], [], [], [], 0, 0
        sampled_only = [[] for _ in per_function]
        for g, (i, candidates) in enumerate(zip(indices, sampled)):
            scores = combined[g * per_group : (g + 1) * per_group]
            tokens = []
            for tokens_j in candidates:
                stopped = len(tokens_j) < o.max_completion_length
                tokens.append(list(tokens_j) + ([self.end_tokens[i]] if stopped else []))
                lengths.append(len(tokens_j))
                clipped += not stopped
            if self.references is not None:
                tokens.append(self.references[i][1])
            for f, values in enumerate(per_function):
                sampled_only[f] += values[g * per_group : g * per_group + o.k]
            groups.append(TokenizedExample(self.prompt_ids[i], tokens, scores))
            rewards.append(scores)
            tied += max(scores) == min(scores)
            kept.append(o.sft_min_reward is None or max(scores) >= o.sft_min_reward)
        return Draw(groups, rewards, sampled_only, lengths, clipped, tied, kept, t1 - t0, t2 - t1)

    def probe_groups(self, indices: list[int]) -> list[TokenizedExample]:
        """Groups for the exactness check before the first step, without sampling: each prompt with k candidates cut
        from real tokens (its reference answer where there is one, else pieces of its own prompt) of different
        lengths; the check compares paths on their structure, so real tokens of the right shape are what it needs."""
        groups = []
        for i in indices:
            source = self.references[i][1] if self.references is not None else self.prompt_ids[i]
            longest = min(self.options.max_completion_length, max(1, len(source)))
            candidates = [source[: max(1, longest - j)] for j in range(self.options.k)]
            groups.append(TokenizedExample(self.prompt_ids[i], candidates, [float(-j) for j in range(len(candidates))]))
        return groups


def sft_terms(scores: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor, cu_groups: torch.Tensor,
              *, length_penalty: float, sft_reduction: str) -> torch.Tensor:  # fmt: skip
    """[G] the SFT term of each group, sft_g = -(1 / L_b) sum_t logp_bt ('sum': without 1 / L_b), from the candidates'
    scores p_i = sum_t logp_it / L_i ** length_penalty (differentiable through them): b is the group's first
    highest-reward candidate, as in the loss (DESIGN.md section 2)."""
    bounds = cu_groups.tolist()
    best = torch.tensor([first + int(torch.argmax(rewards[first:last])) for first, last in zip(bounds[:-1], bounds[1:])],
                        device=scores.device)  # fmt: skip  argmax: the first of the highest
    length = lengths[best].to(scores.dtype)
    summed = scores[best] * length**length_penalty
    return -(summed / length if sft_reduction == "mean" else summed)


def gated_loss(output, batch, kept: list[bool], loss_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the RRHF loss with the SFT term of the groups not `kept` taken out, the SFT loss that is left): output is
    rrhf_loss's on `batch`, whose SFT term is sft_weight x the mean over all G groups."""
    if all(kept):
        return output.loss, output.sft_loss
    dropped = torch.tensor([not k for k in kept], device=output.scores.device)
    sft = sft_terms(output.scores, batch.candidate_lengths.to(output.scores.device), batch.rewards.to(output.scores.device),
                    batch.cu_groups, length_penalty=loss_options["length_penalty"], sft_reduction=loss_options["sft_reduction"])  # fmt: skip
    removed = (sft * dropped).sum() / len(kept)
    return output.loss - loss_options["sft_weight"] * removed, output.sft_loss - removed


# ----------------------------------------------------------------------------------------------------------
# Logs and held-out reward


def step_figures(draws: list[Draw], names: list[str]) -> dict:
    """The logged numbers of a step from every rank's draws: TRL's names where TRL logs the same thing."""
    combined = [r for d in draws for group in d.rewards for r in group]
    lengths = [n for d in draws for n in d.lengths]
    groups = sum(len(d.groups) for d in draws)
    out = {"reward": _mean(combined), "reward_std": _std(combined)}
    for f, name in enumerate(names):
        values = [v for d in draws for v in d.sampled[f]]
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = _mean(values), _std(values)
    out.update({
        "completions/mean_length": _mean(lengths), "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)), "completions/clipped_ratio": sum(d.clipped for d in draws) / len(lengths),
        "frac_reward_zero_std": sum(d.tied for d in draws) / groups,
        "frac_sft": sum(sum(d.sft_kept) for d in draws) / groups,
        "generation_s": max(d.generation_s for d in draws), "reward_s": max(d.reward_s for d in draws),
    })  # fmt: skip
    return out


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values) -> float:
    """The sample standard deviation (n - 1), as torch.std and TRL's logs."""
    if len(values) < 2:
        return float("nan")
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def greedy_reward(model, source: Source, *, batch_size: int) -> dict:
    """The mean combined reward of the model's greedy answers to every prompt of `source` (one answer a prompt, at
    most --max-completion-length tokens), and each reward function's mean."""
    o = source.options
    answers = generation.sample_candidates(
        model, source.prompt_ids, 1, max_new_tokens=o.max_completion_length, stop_token_ids=source.stops,
        temperature=0.0, batch_size=batch_size, pad_token_id=source.tokenizer.pad_token_id or 0,
    )  # fmt: skip
    texts = [source.tokenizer.decode(a[0], skip_special_tokens=True) for a in answers]
    combined, per_function = source.rewards.score(source.prompts.prompts, texts, [a[0] for a in answers], source.prompts.columns)
    out = {"reward": _mean(combined)}
    for name, values in zip(source.rewards.names, per_function):
        out[f"rewards/{name}"] = _mean(values)
    return out
