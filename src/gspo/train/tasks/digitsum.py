"""The built-in ``digitsum`` task: the prompt ``"sum 17:"`` asks for digits whose sum is 17
(``"98"``).

The reward is dense in the distance, ``f * (0.9 * max(0, 1 - |sum - target| / 10) + 0.1)``
with ``f`` the fraction of the completion's characters that are digits, so a random model
already gets signal and a small model reaches 1.0 within minutes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gspo.train.tasks.base import Prompt, Task

DIGITSUM_TARGETS = range(1, 28)  # up to three nines fit in the default 6 new tokens
DIGITSUM_SCALE = 10.0


def digitsum_prompts(n: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    return [_digitsum(rng.choice(DIGITSUM_TARGETS)) for _ in range(n)]


def _digitsum(target: int) -> Prompt:
    # Fixed width ("sum 07:") so every prompt has the same token length: no left padding,
    # hence identical positions in generate() and in the log-prob forward.
    return {"prompt": f"sum {target:02d}:", "target": target}


def digitsum_reward(prompts: Sequence[str], completions: Sequence[str], target) -> list[float]:
    out = []
    for text, goal in zip(completions, target, strict=True):
        digits = [int(c) for c in text if c.isdigit()]
        if not digits:
            out.append(0.0)
            continue
        # Partial credit for partly-digit answers keeps the signal dense from a random start.
        digit_frac = len(digits) / len(text)
        closeness = max(0.0, 1.0 - abs(sum(digits) - goal) / DIGITSUM_SCALE)
        out.append(digit_frac * (0.9 * closeness + 0.1))
    return out


class DigitSum(Task):
    # 27 targets: held-out prompts differ from the pool's only by their seed.
    name = "digitsum"
    max_new_tokens = 6  # a few digits and EOS, as `gspo train` samples them

    def prompts(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        return digitsum_prompts(n, seed)

    def reward(self, prompts, completions, **fields) -> list[float]:
        return digitsum_reward(prompts, completions, **fields)
