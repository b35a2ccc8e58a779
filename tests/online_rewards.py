"""Reward functions for the online tests (tests/test_online.py, and its torchrun runs through --reward), each
recording what it was called with, so that the tests check the trainer against what the rewards saw."""

CALLS = []  # (function name, prompts, completions, columns) of every call in this process


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def code_sum(text: str) -> float:
    """A number in 0, 0.1, ..., 0.6 that differs between most texts: the sum of the character codes mod 7, / 10."""
    return (sum(map(ord, text)) % 7) / 10


def length(prompts, completions, **columns):
    """TRL's signature: code_sum of the completion; a prompt starting with "t" ties at 1."""
    CALLS.append(("length", list(prompts), list(completions), columns))
    return [1.0 if (p if isinstance(p, str) else p[-1]["content"]).startswith("t") else code_sum(_text(c))
            for p, c in zip(prompts, completions)]  # fmt: skip


def digits(prompts, completions, answer, **columns):
    """TRL's signature with a column: the number of characters of the completion that occur in the answer column."""
    CALLS.append(("digits", list(prompts), list(completions), {"answer": answer, **columns}))
    return [float(sum(ch in str(a) for ch in _text(c))) for c, a in zip(completions, answer)]


def per_item(prompt, response):
    """rrhf_fast.sample's signature: one (prompt, response) at a time."""
    return float(len(response) % 3)


def raises_on_seven(prompts, completions, **columns):
    if any("7+5" in p for p in prompts):
        raise RuntimeError("no sevens")
    return [0.0] * len(prompts)


def nan_on_seven(prompts, completions, **columns):
    return [float("nan") if "7+5" in p else 0.0 for p in prompts]
