"""pack_batch: the packed layout on a hand-worked example, row packing, and the errors at the boundary."""

from dataclasses import fields

import pytest
import torch

from rrhf_fast.batch import PackedBatch, check_vocabulary, pack_batch

PROMPTS = [[11, 12, 13], [21, 22]]
CANDIDATES = [[[31, 32, 33], [41, 42]], [[51, 52, 53, 54]]]
REWARDS = [[1.0, 0.5], [2.0]]


def test_layout_of_two_groups_in_one_row():
    """Group 0 = prompt (11 12 13) + a (31 32 33) + b (41 42); group 1 = prompt (21 22) + c (51 52 53 54).

    Row: 11 12 13 31 32 33 41 42 21 22 51 52 53 54    (14 tokens, flat index = column)
    a's tokens are predicted by columns 2 (prompt's last), 3, 4; b's by 2, 6; c's by 9, 10, 11, 12.
    """
    batch = pack_batch(PROMPTS, CANDIDATES, REWARDS, max_tokens=14)
    assert batch.input_ids.tolist() == [[11, 12, 13, 31, 32, 33, 41, 42, 21, 22, 51, 52, 53, 54]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3, 4, 5]]
    assert batch.group_ids.tolist() == [[0] * 8 + [1] * 6]
    assert batch.segment_ids.tolist() == [[-1, -1, -1, 0, 0, 0, 1, 1, -1, -1, 2, 2, 2, 2]]
    assert batch.hidden_index.tolist() == [2, 3, 4, 2, 6, 9, 10, 11, 12]
    assert batch.targets.tolist() == [31, 32, 33, 41, 42, 51, 52, 53, 54]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert batch.cu_groups.tolist() == [0, 2, 3]
    assert batch.rewards.tolist() == [1.0, 0.5, 2.0]
    assert batch.prompt_starts.tolist() == [0, 8]
    assert batch.prompt_lengths.tolist() == [3, 2]
    assert (batch.num_groups, batch.num_candidates, batch.num_tokens) == (2, 3, 9)
    assert batch.candidate_lengths.tolist() == [3, 2, 4]
    # hidden_index always points at the token just before the target in its own sequence.
    flat = batch.input_ids.reshape(-1)
    assert flat[batch.hidden_index].tolist() == [13, 31, 32, 13, 41, 22, 51, 52, 53]


def test_budget_splits_rows_and_padding_is_marked():
    batch = pack_batch(PROMPTS, CANDIDATES, REWARDS, max_tokens=10, pad_token_id=99)
    # Group 0 takes 8 tokens, group 1 six: 14 > 10, so two rows of width 8.
    assert batch.input_ids.tolist() == [[11, 12, 13, 31, 32, 33, 41, 42], [21, 22, 51, 52, 53, 54, 99, 99]]
    assert batch.group_ids[1].tolist() == [1, 1, 1, 1, 1, 1, -1, -1]
    assert batch.segment_ids[1].tolist() == [-1, -1, 2, 2, 2, 2, -1, -1]
    assert batch.prompt_starts.tolist() == [0, 8]
    assert batch.hidden_index.tolist() == [2, 3, 4, 2, 6, 9, 10, 11, 12]
    # The loss side does not depend on how groups were split into rows.
    together = pack_batch(PROMPTS, CANDIDATES, REWARDS)
    for name in ("targets", "cu_seqlens", "rewards", "cu_groups", "prompt_lengths"):
        assert torch.equal(getattr(batch, name), getattr(together, name))


def test_group_longer_than_budget_gets_its_own_row():
    batch = pack_batch(PROMPTS, CANDIDATES, REWARDS, max_tokens=3)
    assert batch.input_ids.shape == (2, 8)
    assert batch.targets.tolist() == [31, 32, 33, 41, 42, 51, 52, 53, 54]


def test_to_moves_every_tensor():
    """To the meta device (which every build has), so that a tensor left behind on the CPU would show."""
    batch = pack_batch(PROMPTS, CANDIDATES, REWARDS, pad_token_id=7)
    moved = batch.to("meta")
    assert isinstance(moved, PackedBatch)
    tensors = [f.name for f in fields(PackedBatch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert len(tensors) == 11
    for name in tensors:
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == "meta", name
        assert (after.shape, after.dtype) == (before.shape, before.dtype), name
    assert moved.pad_token_id == 7
    assert batch.targets.device.type == "cpu"  # a copy: the original stays where it was


def test_tensors_and_numpy_integers_are_token_ids():
    np = pytest.importorskip("numpy")
    prompts = [torch.tensor([11, 12, 13]), np.array([21, 22])]
    candidates = [[[31, 32, 33], np.array([41, 42])], [torch.tensor([51, 52, 53, 54])]]
    batch = pack_batch(prompts, candidates, [[np.float32(1.0), torch.tensor(0.5)], [2]])
    assert torch.equal(batch.targets, pack_batch(PROMPTS, CANDIDATES, REWARDS).targets)
    assert batch.rewards.tolist() == [1.0, 0.5, 2.0]


def test_vocabulary_check_names_group_and_position():
    batch = pack_batch(PROMPTS, CANDIDATES, REWARDS)
    check_vocabulary(batch, 55)  # the largest id is 54
    with pytest.raises(ValueError, match="candidate 0 of group 1 holds token id 54 at position 3.*vocabulary of 54"):
        check_vocabulary(batch, 54)
    with pytest.raises(ValueError, match="candidate 0 of group 0 holds token id 31 at position 0"):
        check_vocabulary(batch, 30)
    with pytest.raises(ValueError, match="prompt of group 1 holds token id 21 at position 0"):
        check_vocabulary(pack_batch([[1], [21, 2]], [[[3]], [[4]]], [[0.0], [0.0]]), 21)
    with pytest.raises(ValueError, match="pad_token_id 99 is past"):
        check_vocabulary(pack_batch(PROMPTS, CANDIDATES, REWARDS, pad_token_id=99), 60)


@pytest.mark.parametrize(
    "prompts, candidates, rewards, message",
    [
        ([[]], [[[1]]], [[0.0]], "empty prompt"),
        ([[1]], [[[]]], [[0.0]], "candidate 0 of group 0 is empty"),
        ([[1]], [[[2], [3]]], [[0.0]], "2 candidates but 1 rewards"),
        ([[1]], [[[2]]], [[float("nan")]], "must be finite"),
        ([[1]], [[[2]]], [[float("inf")]], "must be finite"),
        ([[1], [2]], [[[2]]], [[0.0]], "one prompt, one candidate list and one reward list per group"),
        ([[1]], [[]], [[]], "no candidates"),
        ([], [], [], "at least one group"),
        ([[1, -3]], [[[2]]], [[0.0]], "prompt of group 0 holds -3 at position 1"),
        ([[1], [1]], [[[2]], [[2], [5, 2.7]]], [[0.0], [0.0, 1.0]], "candidate 1 of group 1 holds 2.7 at position 1"),
        ([[1]], [[[2.0]]], [[0.0]], "candidate 0 of group 0 holds 2.0 at position 0"),
        ([[1]], [[[True]]], [[0.0]], "holds True at position 0"),
        ([[1]], [[torch.tensor([2.0])]], [[0.0]], "holds a torch.float32 tensor"),
        ([[1]], [[torch.tensor([2, -1])]], [[0.0]], "holds -1 at position 1"),
        ([[1]], [[["2"]]], [[0.0]], "holds '2' at position 0"),
        ([[1]], [[[2], [3]]], [[0.0, "1.5"]], "reward 1 of group 0 is '1.5', not a number"),
        ([[1]], [[[2]]], [[None]], "reward 0 of group 0 is None, not a number"),
    ],
)
def test_errors_say_what_to_change(prompts, candidates, rewards, message):
    with pytest.raises(ValueError, match=message):
        pack_batch(prompts, candidates, rewards)
