"""The built-in ``copy`` task: ``"copy abc:"`` asks for ``"abc"``; the reward is the fraction
of positions right."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from gspo.train.tasks.base import Prompt, Task


def copy_prompts(n: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)  # 8^3 words: held-out ones differ by their seed alone
    words = ["".join(rng.choices(string.ascii_lowercase[:8], k=3)) for _ in range(n)]
    return [{"prompt": f"copy {w}:", "answer": w} for w in words]


def copy_reward(prompts: Sequence[str], completions: Sequence[str], answer) -> list[float]:
    out = []
    for text, goal in zip(completions, answer, strict=True):
        hits = sum(a == b for a, b in zip(text, goal, strict=False))
        out.append(hits / max(len(goal), len(text), 1))
    return out


class Copy(Task):
    name = "copy"
    max_new_tokens = 6  # a 3-letter word and EOS, as `gspo train` samples them

    def prompts(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        return copy_prompts(n, seed)

    def reward(self, prompts, completions, **fields) -> list[float]:
        return copy_reward(prompts, completions, **fields)
