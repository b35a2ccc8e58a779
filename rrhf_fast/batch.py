"""The packed batch: token ids of G query groups laid out once for the model and once for the loss.

A group is one prompt and its k candidate responses. The model side sees rows of tokens; each row holds one or
more whole groups back to back, each group as [prompt, cand_1, ..., cand_k], and ends in padding:

    row 0:  p0 p0 p0 a a a b b | p1 p1 c c c c | pad pad
            (group 0: prompt of 3, candidates a and b)  (group 1: prompt of 2, candidate c)

Position ids restart after the prompt for every candidate (a, b and c above all start at their prompt's
length), so a candidate sees exactly the positions it would see re-encoded alone after its prompt.
`group_ids` and `segment_ids` let the model side build the attention mask: a token attends to earlier tokens
of its own group that are either prompt tokens or tokens of its own candidate; padding attends to itself.

The loss side sees the layout of DESIGN.md section 3: `targets`, `cu_seqlens`, `rewards`, `cu_groups`, with
no padding. `hidden_index` joins the two: response token n is predicted by the hidden state at flat position
`hidden_index[n]` of the [rows * T] token grid, that is the previous token of its candidate, or the prompt's
last token for a candidate's first token (shared by the k candidates of the group).
"""

from dataclasses import dataclass, fields, replace
from math import isfinite
from numbers import Integral, Real

import torch

DEFAULT_MAX_TOKENS = 4096


@dataclass
class PackedBatch:
    """G groups, C candidates, N response tokens, packed in `rows` rows of T tokens.

    Model side (all [rows, T] int64 unless said otherwise):
        input_ids       token ids; padding holds `pad_token_id`
        position_ids    prompt tokens 0..P-1, each candidate's tokens P..P+L-1, padding 0
        group_ids       index g of the group a token belongs to; -1 for padding
        segment_ids     index c of the candidate a token belongs to; -1 for prompt tokens and padding
        hidden_index    [N] flat index into the [rows * T] grid of the hidden state that predicts targets[n]
        prompt_starts   [G] flat index into the [rows * T] grid of each prompt's first token
        prompt_lengths  [G] tokens in each prompt (P_g >= 1)

    Loss side (DESIGN.md section 3):
        targets         [N] int64 response token ids, candidate after candidate, group after group
        cu_seqlens      [C + 1] int64, candidate c owns targets[cu_seqlens[c] : cu_seqlens[c + 1]]
        rewards         [C] float32
        cu_groups       [G + 1] int64, group g owns candidates cu_groups[g] : cu_groups[g + 1]

    pad_token_id is the id written into padding; nothing downstream may depend on it.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group_ids: torch.Tensor
    segment_ids: torch.Tensor
    hidden_index: torch.Tensor
    prompt_starts: torch.Tensor
    prompt_lengths: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    rewards: torch.Tensor
    cu_groups: torch.Tensor
    pad_token_id: int = 0

    @property
    def num_groups(self) -> int:
        return self.cu_groups.numel() - 1

    @property
    def num_candidates(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        """N: response tokens, the rows of the hidden states the loss takes."""
        return self.targets.numel()

    @property
    def candidate_lengths(self) -> torch.Tensor:
        """[C] tokens in each candidate."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device) -> "PackedBatch":
        """A copy with every tensor on `device`."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **{name: t.to(device) for name, t in tensors.items()})


def _bad_token(ids) -> tuple[int, object] | None:
    """(position, value) of the first entry of `ids` that is not a non-negative integer token id, or None."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            return 0, f"a {ids.dtype} tensor"
        negative = (ids < 0).nonzero()
        return (int(negative[0, 0]), int(ids[negative[0, 0]])) if negative.numel() else None
    for t, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, Integral) or token < 0:
            return t, repr(token)
    return None


def _is_number(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_groups(prompts, candidates, rewards) -> None:
    """Errors at the boundary, each saying what to change."""
    if not (len(prompts) == len(candidates) == len(rewards)):
        raise ValueError(
            f"pack_batch needs one prompt, one candidate list and one reward list per group; got {len(prompts)} prompts, "
            f"{len(candidates)} candidate lists and {len(rewards)} reward lists"
        )
    if len(prompts) == 0:
        raise ValueError("pack_batch needs at least one group")
    for g, (prompt, cands, rews) in enumerate(zip(prompts, candidates, rewards)):
        if len(prompt) == 0:
            raise ValueError(
                f"group {g} has an empty prompt; the first response token needs a prompt token to predict it "
                "(prepend a BOS token or a chat-template prefix)"
            )
        if (bad := _bad_token(prompt)) is not None:
            raise ValueError(
                f"the prompt of group {g} holds {bad[1]} at position {bad[0]}; token ids are non-negative integers"
            )
        if len(cands) == 0:
            raise ValueError(f"group {g} has no candidates; give each group at least one candidate")
        if len(cands) != len(rews):
            raise ValueError(f"group {g} has {len(cands)} candidates but {len(rews)} rewards; give one reward per candidate")
        for i, cand in enumerate(cands):
            if len(cand) == 0:
                raise ValueError(f"candidate {i} of group {g} is empty; drop it or give it at least one token (e.g. EOS)")
            if (bad := _bad_token(cand)) is not None:
                raise ValueError(
                    f"candidate {i} of group {g} holds {bad[1]} at position {bad[0]}; token ids are non-negative integers"
                )
        for i, r in enumerate(rews):
            if not _is_number(r):
                raise ValueError(f"reward {i} of group {g} is {r!r}, not a number; rewards must be finite numbers")
            if not isfinite(float(r)):
                raise ValueError(f"reward {i} of group {g} is {r}; rewards must be finite numbers")


def check_vocabulary(batch: PackedBatch, vocab_size: int) -> None:
    """ValueError naming the group and position of the first token id past a vocabulary of `vocab_size` (the
    model's embedding would raise an IndexError from deep inside its forward)."""
    if batch.pad_token_id >= vocab_size:
        raise ValueError(f"pad_token_id {batch.pad_token_id} is past the model's vocabulary of {vocab_size} tokens")
    if int(batch.input_ids.max()) < vocab_size:
        return
    for g, (start, plen) in enumerate(zip(batch.prompt_starts.tolist(), batch.prompt_lengths.tolist())):
        prompt = batch.input_ids.reshape(-1)[start : start + plen]
        if int(prompt.max()) >= vocab_size:
            t = int((prompt >= vocab_size).nonzero()[0, 0])
            raise ValueError(
                f"the prompt of group {g} holds token id {int(prompt[t])} at position {t}, past the model's vocabulary "
                f"of {vocab_size} tokens; tokenize with the model's own tokenizer"
            )
    n = int((batch.targets >= vocab_size).nonzero()[0, 0])
    c = int(torch.searchsorted(batch.cu_seqlens, n, right=True)) - 1
    g = int(torch.searchsorted(batch.cu_groups, c, right=True)) - 1
    raise ValueError(
        f"candidate {c - int(batch.cu_groups[g])} of group {g} holds token id {int(batch.targets[n])} at position "
        f"{n - int(batch.cu_seqlens[c])}, past the model's vocabulary of {vocab_size} tokens; tokenize with the "
        "model's own tokenizer"
    )


def pack_batch(prompts, candidates, rewards, *, max_tokens: int = DEFAULT_MAX_TOKENS, pad_token_id: int = 0) -> PackedBatch:
    """Pack G groups of token ids into a PackedBatch (on the CPU; call `.to(device)`).

    prompts      list of G token-id lists, each non-empty
    candidates   for each group a list of k_g non-empty token-id lists
    rewards      for each group k_g finite floats
    max_tokens   a row takes groups in order while their tokens (P_g + sum of the group's candidate lengths) fit;
                 a group longer than max_tokens gets a row of its own (nothing is cut). Fewer, wider rows waste
                 less padding, but mode="packed" under sdpa/eager computes attention over all T x T pairs of a
                 row (the mask only zeroes them), so a row of n groups costs about n times their attention;
                 FlexAttention skips the masked blocks, and the other modes do not use the rows.
    pad_token_id id written into padding; any id in the vocabulary will do

    Groups keep their order in every field, so targets/cu_seqlens/rewards/cu_groups follow the input order.
    """
    _check_groups(prompts, candidates, rewards)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")

    # Assign groups to rows in order: next-fit keeps the loss-side order equal to the row order.
    group_sizes = [len(p) + sum(len(c) for c in cands) for p, cands in zip(prompts, candidates)]
    rows: list[list[int]] = []
    row_fill = 0
    for g, size in enumerate(group_sizes):
        if not rows or row_fill + size > max_tokens:
            rows.append([])
            row_fill = 0
        rows[-1].append(g)
        row_fill += size
    width = max(sum(group_sizes[g] for g in row) for row in rows)

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    group_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    hidden_index, prompt_starts, targets, cu_seqlens, flat_rewards, cu_groups = [], [], [], [0], [], [0]

    candidate = 0
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            prompt = prompts[g]
            row_base = r * width
            plen = len(prompt)
            input_ids[r, col : col + plen] = torch.as_tensor(prompt, dtype=torch.long)
            position_ids[r, col : col + plen] = torch.arange(plen)
            group_ids[r, col : col + plen] = g
            prompt_starts.append(row_base + col)
            prompt_last = row_base + col + plen - 1
            col += plen
            for cand, reward in zip(candidates[g], rewards[g]):
                clen = len(cand)
                input_ids[r, col : col + clen] = torch.as_tensor(cand, dtype=torch.long)
                position_ids[r, col : col + clen] = torch.arange(plen, plen + clen)
                group_ids[r, col : col + clen] = g
                segment_ids[r, col : col + clen] = candidate
                # Token 0 is predicted by the prompt's last position, token t > 0 by the candidate's token t - 1.
                hidden_index.append(prompt_last)
                hidden_index.extend(range(row_base + col, row_base + col + clen - 1))
                targets.extend(cand)
                cu_seqlens.append(cu_seqlens[-1] + clen)
                flat_rewards.append(float(reward))
                candidate += 1
                col += clen
            cu_groups.append(candidate)

    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        group_ids=group_ids,
        segment_ids=segment_ids,
        hidden_index=torch.tensor(hidden_index, dtype=torch.long),
        prompt_starts=torch.tensor(prompt_starts, dtype=torch.long),
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.long),
        rewards=torch.tensor(flat_rewards, dtype=torch.float32),
        cu_groups=torch.tensor(cu_groups, dtype=torch.long),
        pad_token_id=pad_token_id,
    )


def pack_examples(examples, *, max_tokens: int = DEFAULT_MAX_TOKENS, pad_token_id: int = 0) -> PackedBatch:
    """pack_batch of tokenised examples (rrhf_fast.data.TokenizedExample): their prompts, candidates and rewards."""
    return pack_batch(
        [ex.prompt for ex in examples], [ex.candidates for ex in examples], [ex.rewards for ex in examples],
        max_tokens=max_tokens, pad_token_id=pad_token_id,
    )
