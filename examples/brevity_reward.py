"""The reward of the brevity task: answer within the number of words the prompt asks for.

Every prompt of examples/iterated_rrhf_smollm2.py ends with "Answer in at most N words." A response of 1 to N
words earns 1; a longer one N / words (partial credit, so that the k candidates of a prompt differ: 16 words
against a limit of 8 earn 0.5); an empty one 0. Used by `sample` and `evaluate` as

    --reward examples.brevity_reward:reward

and called as reward(prompt, response) -> float, the prompt as the data file holds it: a string or a list of chat
messages ({"role", "content"}), whose last user message carries the limit.
"""

import re

DEFAULT_LIMIT = 8
_LIMIT = re.compile(r"at most (\d+) words?", re.IGNORECASE)


def word_limit(prompt) -> int:
    """N from "at most N words" in the prompt (the last user message of a conversation); DEFAULT_LIMIT without."""
    if not isinstance(prompt, str):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    found = _LIMIT.findall(prompt)
    return int(found[-1]) if found else DEFAULT_LIMIT


def reward(prompt, response: str) -> float:
    """1 for 1..N words, N / words above, 0 for an empty response."""
    words = len(response.split())
    if words == 0:
        return 0.0
    limit = word_limit(prompt)
    return 1.0 if words <= limit else limit / words
