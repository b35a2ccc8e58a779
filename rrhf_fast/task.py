"""The built-in task: two-number addition with graded candidate answers.

A query is "23+48=" and the right answer "71". Each query comes with four candidates, the kinds a weak
model would produce, ordered by the reward function below:

    exact           "71"    reward 1
    one digit off   "72"    one digit replaced by another
    swapped digits  "17"    two neighbouring digits exchanged (another digit changed where that is no change)
    random          "134"   any other sum in range

    reward(query, response) = 1 / (1 + |answer - true| / 4)     for a response that is a plain integer
                            = 0                                  otherwise (empty, words, signs, spaces inside)

so a closer answer always earns more, the exact one most. The same function scores the model's own greedy
answers. Train and held-out data are drawn from disjoint sets of operand pairs by a seeded generator, so
the held-out queries are never seen in training, and written in the RRHF JSONL format.
"""

import json
import os
import random
import re

MAX_OPERAND = 99  # operands are 0..99, sums 0..198
_QUERY = re.compile(r"^(\d+)\+(\d+)=$")
_ANSWER = re.compile(r"^\d{1,6}$")


def true_answer(query: str) -> int:
    """The sum a query asks for ("23+48=" -> 71)."""
    match = _QUERY.match(query)
    if match is None:
        raise ValueError(f"not an addition query: {query!r}")
    return int(match.group(1)) + int(match.group(2))


def reward(query: str, response: str) -> float:
    """1 / (1 + |answer - truth| / 4) for a plain integer answer (surrounding white space ignored), else 0."""
    text = response.strip()
    if _ANSWER.match(text) is None:
        return 0.0
    return 1.0 / (1.0 + abs(int(text) - true_answer(query)) / 4.0)


def _one_digit_off(digits: str, rng: random.Random) -> str:
    position = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[position] and not (position == 0 and d == "0" and len(digits) > 1)]
    return digits[:position] + rng.choice(choices) + digits[position + 1 :]


def _swapped(digits: str, rng: random.Random) -> str:
    positions = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and not (i == 0 and digits[1] == "0")]
    if not positions:
        return _one_digit_off(digits, rng)
    i = rng.choice(positions)
    return digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]


def candidates(query: str, rng: random.Random) -> list[str]:
    """[exact, one digit off, swapped digits, random] for a query, distinct from each other."""
    exact = str(true_answer(query))
    out = [exact, _one_digit_off(exact, rng)]
    swapped = _swapped(exact, rng)
    while swapped in out:
        swapped = _one_digit_off(exact, rng)
    out.append(swapped)
    other = str(rng.randrange(2 * MAX_OPERAND + 1))
    while other in out:
        other = str(rng.randrange(2 * MAX_OPERAND + 1))
    out.append(other)
    return out


def make_records(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out records ({"query", "responses", "scores"}) over disjoint operand pairs."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    if num_train + num_eval > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct queries, asked for {num_train} + {num_eval}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    records = []
    for a, b in pairs[: num_train + num_eval]:
        query = f"{a}+{b}="
        responses = candidates(query, rng)
        records.append({"query": query, "responses": responses, "scores": [reward(query, r) for r in responses]})
    return records[num_eval:], records[:num_eval]


def write_jsonl(records: list[dict], path: str) -> None:
    """One JSON object a line, written to a temporary file first and renamed into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
