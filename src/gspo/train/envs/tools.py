"""Function tools as an environment of the contract (docs/environments.md, docs/tools.md):
the model calls tools in its family's format, each call's result goes back as a ``tool``
message through the chat template, and the episode ends at the first reply without a call,
scored by the run's reward function on that last reply.

    gspo train --tools calculator --tool-parser hermes --task wordproblems \\
               --chat-template examples/chatml-tools.jinja --model smollm2

``function_tools(tools, parser=..., reward_fn=...)`` makes the class a run uses (one
instance per episode, as for every environment); its class attribute ``tool_schemas`` is
what the episodes pass to the chat template as ``tools=`` (gspo.train.episodes.Turns).
Per episode ``counts`` holds ``tool_calls`` (calls made) and ``tool_errors`` (calls answered
with an error: gspo.train.tools.calls); the episodes copy them into metrics and samples.
"""

from __future__ import annotations

from collections.abc import Callable

from gspo.train.rewards import score
from gspo.train.tools.calls import run_call
from gspo.train.tools.parsers import Parser, get_parser
from gspo.train.tools.schema import tool_schema

TIME_LIMIT = 10.0  # seconds a tool call may take before it is answered with an error


class ToolEnv:
    """An episode with function tools (module docstring). Subclasses set the class
    attributes; ``functions()`` gives the tools by name (an instance's own, for a TRL-shaped
    environment: gspo.train.envs.trl)."""

    tools: dict[str, Callable] = {}
    tool_schemas: list[dict] = []
    parser: Parser = staticmethod(get_parser("hermes"))
    time_limit: float = TIME_LIMIT
    reward_fn = None

    def __init__(self, **fields) -> None:
        self.row = fields
        self.counts = {"tool_calls": 0, "tool_errors": 0}
        self.last_reply = ""

    def functions(self) -> dict[str, Callable]:
        return self.tools

    def reset(self):
        if "prompt" not in self.row:
            raise ValueError(f"the row has no 'prompt' (keys: {sorted(self.row)})")
        return self.row["prompt"]

    def step(self, reply: str) -> list[dict] | None:
        """The reply's calls answered, one ``tool`` message each; None (the episode ends)
        when it makes no call."""
        self.last_reply = reply
        calls = self.parser(reply)
        if not calls:
            return None
        results = [run_call(self.functions(), c, time_limit=self.time_limit) for c in calls]
        self.counts["tool_calls"] += len(results)
        self.counts["tool_errors"] += sum(r.error for r in results)
        return [{"role": "tool", "name": r.name or "unknown", "content": r.content}
                for r in results]  # fmt: skip

    def reward(self) -> float:
        """The run's reward function (the task's, or ``--reward``) on the last reply."""
        return score(self.reward_fn, [self.row], [self.last_reply])[0]


def function_tools(tools: dict[str, Callable], *, parser: str, reward_fn,
                   time_limit: float = TIME_LIMIT) -> type:  # fmt: skip
    """The environment class of a ``--tools`` run: ``tools`` ({name: function},
    gspo.train.tools.load_tools), the ``--tool-parser`` name (ValueError naming the choices
    if unknown), the run's reward function."""
    return type("FunctionTools", (ToolEnv,), {
        "tools": dict(tools), "tool_schemas": [tool_schema(fn) for fn in tools.values()],
        "parser": staticmethod(get_parser(parser)), "time_limit": time_limit,
        "reward_fn": staticmethod(reward_fn) if callable(reward_fn) else reward_fn,
    })  # fmt: skip
