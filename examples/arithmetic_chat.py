"""Arithmetic chat questions with graded answers, as a TRL conversational listwise JSONL file.

    python examples/arithmetic_chat.py out.jsonl --prompts 160 --k 5 --seed 0

Each line: a system message and a question ("What is 47 * 12?") as `prompt` messages, k assistant answers as
`completions` and their `scores`: the answer alone (1.0), the answer in a sentence (0.9), an answer off by one or
ten (0.3), twice the answer in a sentence (0.1), a refusal (0.0), in a shuffled order. The answers differ in length
(1 to 7 tokens with SmolLM2's tokenizer), so the candidates of a group have different lengths, as real data has.
The benchmarks and tests on SmolLM2 train and check on it.
"""

import argparse
import json
import random

SYSTEM = "You are a helpful assistant."
SCORES = (1.0, 0.9, 0.3, 0.1, 0.0)


def records(prompts: int, k: int = 5, seed: int = 0) -> list[dict]:
    """`prompts` questions, each with k of the five graded answers (k <= 5)."""
    if not 1 <= k <= len(SCORES):
        raise ValueError(f"k must be between 1 and {len(SCORES)}, got {k}")
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        answers = (f"{answer}", f"The answer is {answer}.", f"{answer + rng.choice((-1, 1, 10))}",
                   f"I think it is {2 * answer}.", "I am not sure, sorry.")  # fmt: skip
        chosen = rng.sample(range(len(SCORES)), k)
        out.append({
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} {op} {b}?"}],
            "completions": [[{"role": "assistant", "content": answers[i]}] for i in chosen],
            "scores": [SCORES[i] for i in chosen],
        })  # fmt: skip
    return out


def write(path: str, prompts: int, k: int = 5, seed: int = 0) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(prompts, k, seed))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSONL file to write")
    parser.add_argument("--prompts", type=int, default=160, help="questions (default 160)")
    parser.add_argument("-k", "--k", type=int, default=5, help="answers a question, 1 to 5 (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the questions and the answers' order")
    args = parser.parse_args(argv)
    print(write(args.out, args.prompts, args.k, args.seed))


if __name__ == "__main__":
    main()
