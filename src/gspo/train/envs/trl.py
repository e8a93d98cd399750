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

Several classes in one run (``--env module:Wordle,Catch`` or ``--env a:Wordle,b:Catch``):
each row names its class by name in its ``environment`` field (``routed_env``); each
episode sees its own class's tools; rows are checked at start (``check_routes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from gspo.train.envs.tools import TIME_LIMIT, ToolEnv
from gspo.train.rewards import RewardFn
from gspo.train.tools.parsers import get_parser
from gspo.train.tools.schema import method_schema

RESERVED = ("reset", "get_reward")  # methods that are not tools (TRL's rule)
ROUTE = "environment"  # the row field naming its class when --env gives several


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
    route: str = ""  # the class's name: what a row's ``environment`` field gives
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
        return with_observation(prompt, observation)

    def step(self, reply: str):
        answer = super().step(reply)
        self.conversation += [{"role": "assistant", "content": reply}, *(answer or [])]
        return answer

    def reward(self) -> float:
        prompt = self.row.get("prompt")
        # TRL's completions: text for a text prompt, the turns after it for chat messages
        completion = self.last_reply if not isinstance(prompt, list) else self.conversation
        columns = {k: [v] for k, v in self.row.items() if k != "prompt"}
        total, scored = 0.0, False
        for fn, weight in zip(self.reward_fns, self.weights, strict=True):
            values = list(fn(prompts=[prompt], completions=[completion],
                             environments=[self.environment], **columns))  # fmt: skip
            if len(values) != 1:
                raise ValueError(f"reward function {fn.__qualname__} returned {len(values)} "
                                 "values for 1 completion")  # fmt: skip
            if values[0] is not None:  # None: not this function's episode (TRL's rule)
                total, scored = total + weight * float(values[0]), True
        if callable(getattr(self.environment, "get_reward", None)):
            total, scored = total + float(self.environment.get_reward()), True
        if not scored:
            raise ValueError(f"every --reward function returned None for this episode and "
                             f"{self.route} has no get_reward(); return a number for "
                             "it")  # fmt: skip
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
        "trl_class": cls, "route": cls.__name__, "tools": dict.fromkeys(names),
        "tool_schemas": [method_schema(cls, name) for name in names],
        "parser": staticmethod(get_parser(parser)), "time_limit": time_limit,
        "reward_fns": tuple(reward_fns),
        "weights": tuple(float(w) for w in weights) or (1.0,) * len(reward_fns),
        "system_prompt": getattr(cls, "system_prompt", None),
    })  # fmt: skip


def with_observation(prompt: str | list | None, observation: str) -> str | list:
    """The first message: the row's prompt with ``reset()``'s observation appended to its
    text (a str, or the last chat message's content), or the observation alone without a
    prompt (TRL's rule)."""
    if prompt is None:
        return observation
    if isinstance(prompt, str):
        return prompt + observation
    last = prompt[-1]
    return [*prompt[:-1], {**last, "content": last["content"] + observation}]


def env_paths(spec: str) -> list[str]:
    """``module:A,B`` or ``m1:A,m2:B`` as ``["module:A", "module:B"]`` (a bare name takes
    the module before it)."""
    paths, module = [], ""
    for item in (part.strip() for part in spec.split(",")):
        module, _, name = item.rpartition(":") if ":" in item else (module, ":", item)
        if not module or not name:
            raise ValueError(f"--env {spec!r}: give the classes as 'module:A,B' or "
                             "'a:A,b:B'")  # fmt: skip
        paths.append(f"{module}:{name}")
    return paths


class Routed:
    """Several TRL-shaped classes in one run: constructing it with a row makes the adapted
    class (``trl_env``) that the row's ``environment`` field names. ``routes`` ({class
    name: adapted class}) and ``tool_schemas`` (every class's tools, for prompt lengths)
    are set per run by ``routed_env``."""

    routes: dict[str, type] = {}
    tool_schemas: list[dict] = []

    def __new__(cls, **row):
        check_routes([row], cls.routes)
        return cls.routes[row[ROUTE]](**row)


def routed_env(adapted: Sequence[type]) -> type:
    """The class of a run whose rows choose among ``adapted`` (``trl_env`` classes) by
    name. ValueError when two classes share a name."""
    routes = {c.route: c for c in adapted}
    if len(routes) != len(adapted):
        names = [c.route for c in adapted]
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--env: two classes are named {twice!r}; a row's {ROUTE!r} field "
                         "names its class, so the names must differ")  # fmt: skip
    schemas = {s["function"]["name"]: s for c in adapted for s in c.tool_schemas}
    return type("Routed", (Routed,), {"routes": routes, "tool_schemas": list(schemas.values())})


def check_routes(rows: Sequence[dict], routes: dict[str, type]) -> None:
    """ValueError naming the first row whose ``environment`` field names no class of
    ``routes`` (or is missing), and the classes there are."""
    for row in rows:
        name = row.get(ROUTE)
        if name not in routes:
            what = f"names {name!r}" if ROUTE in row else f"has no {ROUTE!r} field"
            raise ValueError(f"--env gives {len(routes)} classes and the prompt row "
                             f"{str(row.get('prompt'))[:60]!r} {what}; set its {ROUTE!r} "
                             f"to one of {', '.join(routes)}")  # fmt: skip
