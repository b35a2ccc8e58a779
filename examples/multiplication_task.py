"""A verifiable task for online RRHF and GRPO: multiply a 2-digit number by a 1-digit one, the answer checked.

    python examples/multiplication_task.py out/mult --train 256 --eval 64 --seed 0

writes out/mult/train.jsonl and out/mult/eval.jsonl, TRL conversational prompt-only records with the answer as a
column (TRL passes it to the reward as a keyword argument; `--reference-column solution` makes it a candidate):

    {"prompt": [{"role": "user", "content": "What is 47 * 8? Reply with the number only."}],
     "a": 47, "b": 8, "answer": 376, "solution": "47 * 8 = 376"}

The reward, TRL's signature (rrhf_fast.train --reward examples.multiplication_task:reward, or reward_funcs=[reward]):
the answer is the completion's first number other than the two factors (SmolLM2 writes "47 * 8 = 376" as often as
"376"); it earns 1 when it is the product, else 0.5 x max(0, 1 - |error| / product) (partial credit, so that k wrong
answers still rank: 370 for 376 earns 0.49, 188 earns 0.25); no such number earns 0.
Train and held-out questions are disjoint pairs (a, b), a in 10..99, b in 2..9 (720 in all).
"""

import argparse
import json
import os
import random
import re

QUESTION = "What is {} * {}? Reply with the number only."
_NUMBER = re.compile(r"-?\d[\d,]*")


def first_number(text: str, factors=()) -> int | None:
    """The first integer in `text` (thousands commas dropped) that is not one of `factors`, or None."""
    for found in _NUMBER.finditer(text):
        digits = found.group().replace(",", "")
        if digits.lstrip("-") and int(digits) not in factors:
            return int(digits)
    return None


def score(completion: str, answer: int, factors=()) -> float:
    got = first_number(completion, factors)
    if got is None:
        return 0.0
    return 1.0 if got == answer else 0.5 * max(0.0, 1.0 - abs(got - answer) / answer)


def _text(completion) -> str:
    """A completion as text: TRL passes [{"role": "assistant", "content": ...}] for a chat prompt."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def reward(prompts, completions, answer, a, b, **columns) -> list[float]:
    """One reward a completion (see the module docstring); answer, a and b are the records' columns, one a completion."""
    return [score(_text(c), int(n), (int(x), int(y))) for c, n, x, y in zip(completions, answer, a, b)]


def correct(prompts, completions, answer, a, b, **columns) -> list[float]:
    """1 for the right product, else 0: the exact-match rate, for logs beside the shaped reward."""
    return [float(first_number(_text(c), (int(x), int(y))) == int(n)) for c, n, x, y in zip(completions, answer, a, b)]


def records(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    if n_train + n_eval > len(pairs):
        raise ValueError(f"at most {len(pairs)} questions in all, asked for {n_train} + {n_eval}")
    random.Random(seed).shuffle(pairs)
    out = [{"prompt": [{"role": "user", "content": QUESTION.format(a, b)}], "a": a, "b": b, "answer": a * b, "solution": f"{a} * {b} = {a * b}"}
           for a, b in pairs[: n_train + n_eval]]  # fmt: skip
    return out[:n_train], out[n_train:]


def write(directory: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "eval"), records(n_train, n_eval, seed)):
        path = os.path.join(directory, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory for train.jsonl and eval.jsonl")
    p.add_argument("--train", type=int, default=256, help="training questions (default 256)")
    p.add_argument("--eval", type=int, default=64, help="held-out questions (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    args = p.parse_args(argv)
    print(*write(args.out, args.train, args.eval, args.seed))


if __name__ == "__main__":
    main()
