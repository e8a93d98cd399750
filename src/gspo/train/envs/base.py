"""The environment contract and its loader.

An environment is any class with this shape (one instance per episode)::

    class MyEnv:
        def __init__(self, **fields): ...        # the prompt row's fields (prompt, answer, ...)
        def reset(self) -> str: ...              # the first user message
        def step(self, reply: str) -> str | None: ...   # the model's reply -> the next message, or
                                                        # None: the episode ends
        def reward(self) -> float: ...           # called once, after the episode ends

Optional: a class attribute ``system_prompt`` (str), used when ``--system-prompt`` is not
given; a method ``close()``, called on the instances made for the checks at start and on
every episode of a batch that stops on an error (a server session's end: envs/openenv.py).
``reset`` may also return chat messages ``[{"role", "content"}]`` (rendered as a prompt is,
gspo.train.rollout.render_prompt).

Any exception raised by the environment (its constructor, ``reset``, ``step`` or
``reward``), or a reward that is not a finite float, is an :class:`EnvError` naming the
class, the episode and the turn; the trainer saves the state the step began from and
exits with code 3, as for a failing reward function.
"""

from __future__ import annotations

from gspo.train.envs.registry import ENVS
from gspo.train.rewards import RewardError, finite, import_user


class EnvError(RewardError):
    """An environment failed; the message names its class, the episode and the turn.
    A RewardError, so that every path that stops on a failing reward (checkpoint first,
    exit 3) stops on it too."""


def load_env(spec: str) -> type:
    """The class ``--env`` names: a built-in name (registry.ENVS) or ``module:Class``,
    imported from the current directory or the Python path (as ``--reward`` is)."""
    path = ENVS.get(spec, spec)
    module_name, colon, attr = path.partition(":")
    if not colon or not attr:
        raise ValueError(f"--env {spec!r}: use a built-in environment ({', '.join(ENVS)}) "
                         "or 'module:Class'")  # fmt: skip
    cls = import_user("--env", path)
    if not isinstance(cls, type):
        raise ValueError(f"--env {spec!r}: module {module_name!r} has no class {attr!r}")
    missing = [m for m in ("reset", "step", "reward") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"--env {spec!r}: class {attr} lacks {', '.join(missing)}; an "
                         "environment has reset() -> str, step(reply) -> str | None and "
                         "reward() -> float (docs/environments.md)")  # fmt: skip
    system = getattr(cls, "system_prompt", None)
    if system is not None and not isinstance(system, str):
        raise ValueError(f"--env {spec!r}: {attr}.system_prompt is "
                         f"{type(system).__name__}; make it a str or remove it")  # fmt: skip
    return cls


def _clip(value, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def call(env, method: str, *args, episode: int, turn: int, prompt=None):
    """``env.method(*args)``; any exception becomes an EnvError naming the class, the
    method, the episode (its row in this rank's batch and its prompt) and the turn."""
    try:
        return getattr(env, method)(*args)
    except Exception as err:  # noqa: BLE001 - user code: stop the run with context
        raise EnvError(
            f"environment {type(env).__qualname__}.{method}() raised {type(err).__name__}: "
            f"{err} in episode {episode} (prompt {_clip(prompt)}), turn {turn}; fix the "
            "environment"
        ) from err


def check_message(env, message, method: str, *, episode: int, turn: int, prompt=None):
    """A message from ``reset``/``step`` must be a str (``step``: or None)."""
    if message is None and method == "step":
        return None
    # reset: chat messages; step: messages too (a function tool's ``tool`` messages)
    ok = isinstance(message, str) or (isinstance(message, list) and bool(message) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in message))
    if not ok:
        raise EnvError(
            f"environment {type(env).__qualname__}.{method}() returned "
            f"{type(message).__name__} in episode {episode} (prompt {_clip(prompt)}), turn "
            f"{turn}; return a str{' or None' if method == 'step' else ''}"
        )
    return message


def check_reward(env, value, *, episode: int, turn: int, prompt=None) -> float:
    out = finite(value)
    if out is None:
        raise EnvError(
            f"environment {type(env).__qualname__}.reward() returned {_clip(value)} in episode "
            f"{episode} (prompt {_clip(prompt)}), after turn {turn}; rewards must be finite "
            "floats"
        )
    return out
