"""The tokenised data set held compactly: flat token-id buffers and offsets instead of a Python list per candidate.

A Python list of ints costs about 36 bytes a token (an 8-byte pointer and a 28-byte int object for each id past
256), so the published preference sets (UltraFeedback: 64k prompts x 4 completions; Nectar: 183k x 7) would take
gigabytes as lists before the first step. Here every token takes 2 bytes (uint16, when the vocabulary has at most
65536 ids) or 4 (int32), and each sequence 8 bytes of offset:

    ids        [T]      every group's prompt, then its k_g candidates, group after group
    offsets    [S + 1]  int64: sequence s owns ids[offsets[s] : offsets[s + 1]]
    groups     [G + 1]  int64: group g owns sequences groups[g] : groups[g + 1]; the first of them is its prompt
    rewards    [C]      float64: the candidates' rewards, group after group (group g's start at groups[g] - g)

Indexing a group gives a TokenizedExample of Python lists, which is what rrhf_fast.pack_batch takes: only the
groups of one micro-batch exist as lists at a time.
"""

from dataclasses import dataclass
from itertools import chain

import numpy as np


@dataclass
class TokenizedExample:
    """One group ready for `rrhf_fast.pack_batch`: prompt ids, candidate ids (EOS or end of turn ends each), rewards."""

    prompt: list[int]
    candidates: list[list[int]]
    rewards: list[float]


def id_dtype(vocab_size: int):
    """The narrowest integer type that holds every id of a vocabulary of vocab_size tokens."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


@dataclass
class TokenizedData:
    """G tokenised groups (see the module docstring for the layout); a sequence of TokenizedExample."""

    ids: np.ndarray
    offsets: np.ndarray
    groups: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.groups) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[g] for g in range(*index.indices(len(self)))]
        g = range(len(self))[index]  # IndexError past the end, negative indices from the end
        first, last = int(self.groups[g]), int(self.groups[g + 1])
        bounds = self.offsets[first : last + 1].tolist()
        seqs = [self.ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        return TokenizedExample(seqs[0], seqs[1:], self.rewards[first - g : last - g - 1].tolist())

    def __iter__(self):
        return (self[g] for g in range(len(self)))

    @property
    def num_candidates(self) -> int:
        return len(self.rewards)

    @property
    def nbytes(self) -> int:
        """Bytes of the four buffers."""
        return sum(a.nbytes for a in (self.ids, self.offsets, self.groups, self.rewards))

    def candidate_mask(self) -> np.ndarray:
        """[S] True for the sequences that are candidates, False for the prompts."""
        mask = np.ones(len(self.offsets) - 1, dtype=bool)
        mask[self.groups[:-1]] = False
        return mask

    def candidate_lengths(self) -> np.ndarray:
        """[C] tokens in each candidate."""
        return np.diff(self.offsets)[self.candidate_mask()]

    def candidate_ids(self) -> np.ndarray:
        """The ids of every candidate, back to back (prompts left out)."""
        owner = np.repeat(self.candidate_mask(), np.diff(self.offsets))
        return self.ids[owner]

    @staticmethod
    def concatenate(parts: list["TokenizedData"], dtype) -> "TokenizedData":
        """One TokenizedData of the groups of `parts`, in order."""
        ids = np.concatenate([p.ids for p in parts]).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        seq_base = np.cumsum([0] + [len(p.ids) for p in parts])
        group_base = np.cumsum([0] + [len(p.offsets) - 1 for p in parts])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, seq_base)]).astype(np.int64)
        groups = np.concatenate([[0]] + [p.groups[1:] + base for p, base in zip(parts, group_base)]).astype(np.int64)
        rewards = np.concatenate([np.zeros(0)] + [p.rewards for p in parts]).astype(np.float64)
        return TokenizedData(ids, offsets, groups, rewards)


class Builder:
    """Collects groups of Python lists (one round of the tokenizer's output) into TokenizedData, round by round,
    so that lists exist for one round only."""

    def __init__(self, dtype):
        self.dtype, self.parts = dtype, []

    def add_round(self, groups: list[tuple[list[int], list[list[int]], list[float]]]) -> None:
        """Append (prompt, candidates, rewards) groups."""
        seqs = [seq for prompt, candidates, _ in groups for seq in (prompt, *candidates)]
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(seqs), dtype=self.dtype, count=int(offsets[-1]))
        sizes = np.fromiter((1 + len(c) for _, c, _ in groups), dtype=np.int64, count=len(groups))
        group_offsets = np.zeros(len(groups) + 1, dtype=np.int64)
        np.cumsum(sizes, out=group_offsets[1:])
        rewards = np.fromiter((r for _, _, rs in groups for r in rs), dtype=np.float64)
        self.parts.append(TokenizedData(ids, offsets, group_offsets, rewards))

    def build(self) -> TokenizedData:
        return TokenizedData.concatenate(self.parts, self.dtype)
