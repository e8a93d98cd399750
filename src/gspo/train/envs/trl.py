"""TRL-shaped environments (``GRPOTrainer(environment_factory=Class)``) through
``--env module:Class`` unchanged (docs/tools.md).

What such a class looks like, as TRL documents and runs it (trl/trainer/grpo_trainer.py)::

    class IncrementEnv:
        def __init__(self): ...                  # optional, takes no arguments
        def reset(self, **kwargs) -> str | None: # the row's columns as keywords
        def get_reward(self) -> float: ...       # optional: the environment scores itself
        def increment(self, step: int) -> int:   # every other public method is a tool
            \"\"\"Increment the counter.

            Args:
                step: Value to add.
            \"\"\"

    def reward_func(environments, **kwargs) -> list[float]:   # --reward module:reward_func
        return [env.counter for env in environments]

How it runs here: one instance per episode; ``reset(**row)`` (the whole row, ``prompt``
included, as TRL passes it); a str it returns is appended to the row's prompt (to the last
message's content for chat messages), as TRL does, and is the prompt when the row has none;
the public methods are function tools (gspo.train.envs.tools: schemas from their
signatures and docstrings, calls parsed by ``--tool-parser``, errors answered as messages);
the episode ends at the first reply without a call. The reward is the sum of each
``--reward`` function (times ``--reward-weights``), called with keywords as TRL calls it
(``prompts``, ``completions``, ``environments`` = [this episode's instance], and each other
column as a list), and ``get_reward()`` when the class has one. A class with ``reset``,
``step`` and ``reward`` is one of docs/environments.md's contract instead, and runs as such.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from gspo.train.envs.tools import TIME_LIMIT, ToolEnv
from gspo.train.rewards import RewardFn
from gspo.train.tools.parsers import get_parser
from gspo.train.tools.schema import method_schema

RESERVED = ("reset", "get_reward")  # methods that are not tools (TRL's rule)


def is_trl_shaped(target) -> bool:
    """A class with ``reset`` that lacks the contract's ``step`` or ``reward``."""
    return isinstance(target, type) and callable(getattr(target, "reset", None)) and not (
        callable(getattr(target, "step", None)) and callable(getattr(target, "reward", None)))


def tool_names(cls: type) -> list[str]:
    """The tools of a TRL-shaped class: its public methods but reset and get_reward."""
    return [name for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in RESERVED]  # fmt: skip


class TRLEnv(ToolEnv):
    """The adapter (module docstring); ``trl_class``, ``reward_fns`` and ``weights`` are set
    per run by ``trl_env``."""

    trl_class: type = object
    reward_fns: tuple[RewardFn, ...] = ()
    weights: tuple[float, ...] = ()

    def __init__(self, **fields) -> None:
        super().__init__(**fields)
        self.environment = self.trl_class()
        self.conversation: list[dict] = []  # the model's replies and the tools' answers

    def functions(self) -> dict:
        return {name: getattr(self.environment, name) for name in self.tools}

    def reset(self):
        observation = self.environment.reset(**self.row)
        prompt = self.row.get("prompt")
        if observation is None:
            return super().reset()
        if not isinstance(observation, str):
            raise TypeError(f"reset() returned {type(observation).__name__}; return a str or "
                            "None (TRL's rule)")  # fmt: skip
        if prompt is None:
            return observation
        if isinstance(prompt, str):
            return prompt + observation
        last = prompt[-1]
        return [*prompt[:-1], {**last, "content": last["content"] + observation}]

    def step(self, reply: str):
        answer = super().step(reply)
        self.conversation += [{"role": "assistant", "content": reply}, *(answer or [])]
        return answer

    def reward(self) -> float:
        prompt = self.row.get("prompt")
        # TRL's completions: text for a text prompt, the turns after it for chat messages
        completion = self.last_reply if not isinstance(prompt, list) else self.conversation
        columns = {k: [v] for k, v in self.row.items() if k != "prompt"}
        total = 0.0
        for fn, weight in zip(self.reward_fns, self.weights, strict=True):
            values = list(fn(prompts=[prompt], completions=[completion],
                             environments=[self.environment], **columns))  # fmt: skip
            if len(values) != 1:
                raise ValueError(f"reward function {fn.__qualname__} returned {len(values)} "
                                 "values for 1 completion")  # fmt: skip
            total += weight * float(values[0])
        if callable(getattr(self.environment, "get_reward", None)):
            total += float(self.environment.get_reward())
        return total


def trl_env(cls: type, *, parser: str, reward_fns: Sequence[RewardFn] = (),
            weights: Sequence[float] = (), time_limit: float = TIME_LIMIT) -> type:  # fmt: skip
    """The contract class that runs TRL-shaped ``cls``. ValueError when the episode would
    have no reward (neither ``--reward`` nor ``get_reward``), a tool has no schema, or the
    parser name is unknown."""
    if not reward_fns and not callable(getattr(cls, "get_reward", None)):
        raise ValueError(f"--env {cls.__qualname__}: a TRL-shaped environment is scored by "
                         "--reward module:function (called with environments=) or by its "
                         "get_reward() method; give one")  # fmt: skip
    init = inspect.signature(cls).parameters.values()
    if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in init):  # fmt: skip
        raise ValueError(f"--env {cls.__qualname__}: a TRL-shaped environment is constructed "
                         "without arguments; read the row's columns in reset(**kwargs)")
    names = tool_names(cls)
    return type(f"TRL{cls.__name__}", (TRLEnv,), {
        "trl_class": cls, "tools": dict.fromkeys(names),
        "tool_schemas": [method_schema(cls, name) for name in names],
        "parser": staticmethod(get_parser(parser)), "time_limit": time_limit,
        "reward_fns": tuple(reward_fns),
        "weights": tuple(float(w) for w in weights) or (1.0,) * len(reward_fns),
        "system_prompt": getattr(cls, "system_prompt", None),
    })  # fmt: skip
