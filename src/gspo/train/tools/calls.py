"""One tool call, run: its result as the text of a ``tool`` message, or an error message.

Everything that can go wrong with a call is the model's to learn from, so it is answered,
never raised: a call that could not be read (the parser's error), an unknown tool (the
answer lists the tools), arguments that do not fit the function's signature, an exception
inside the function, or a call that takes longer than the time limit. Each of these is
``ToolResult(error=True)``, counted by the environment (``tool_errors``).

Time limit: the call runs in a daemon thread and is abandoned after ``time_limit`` seconds
(Python cannot stop a thread: a runaway function keeps its thread until it returns, but the
episode goes on, answered ``error: ... took longer than N s``). ``async def`` tools run in
their own event loop in that thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gspo.train.tools.parsers import ToolCall

MAX_CHARS = 2000  # a result longer than this is cut (it is context the model pays for)


@dataclass(frozen=True)
class ToolResult:
    """The answer to one call: the ``tool`` message's ``content``, the tool's ``name``
    (None when the call named none), and whether it is an error."""

    content: str
    name: str | None
    error: bool


def as_text(value) -> str:
    """A tool's return value as message text: a str as it is, else JSON (else ``str``)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " ...(cut)"


def run_call(tools: dict[str, Callable], call: ToolCall, *, time_limit: float) -> ToolResult:
    """Run ``call`` against ``tools`` (``{name: function}``) within ``time_limit`` seconds
    (module docstring: what becomes an error)."""
    if call.error is not None:
        return ToolResult(f"error: {call.error}", call.name, True)
    fn = tools.get(call.name)
    if fn is None:
        return ToolResult(f"error: unknown tool {call.name!r}; the tools are "
                          f"{', '.join(tools)}", call.name, True)  # fmt: skip
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as err:
        return ToolResult(f"error: wrong arguments for {call.name}: {err}", call.name, True)
    outcome: dict = {}

    def target() -> None:
        try:
            value = fn(**call.arguments)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            outcome["value"] = value
        except Exception as err:  # noqa: BLE001 - the tool's failure is the model's answer
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"gspo-tool-{call.name}", daemon=True)
    thread.start()
    thread.join(time_limit)
    if thread.is_alive():
        return ToolResult(f"error: {call.name} took longer than {time_limit:g} s",
                          call.name, True)  # fmt: skip
    if "error" in outcome:
        err = outcome["error"]
        return ToolResult(f"error: {call.name} raised {type(err).__name__}: {err}", call.name,
                          True)  # fmt: skip
    return ToolResult(as_text(outcome["value"]), call.name, False)


async def _awaited(awaitable):
    return await awaitable
