"""Tool-call parsers by model family: a reply's text -> the calls it makes, behind
``--tool-parser NAME``.

A model calls tools in the format its family was trained on; the parser must be that one:

* ``hermes`` (also ``qwen``): Qwen2.5/Qwen3, Hermes and every ChatML template with tools
  (examples/chatml-tools.jinja for SmolLM2): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; several may follow each
  other. A ``<tool_call>`` that the reply leaves open is read to the reply's end.
* ``llama3_json`` (also ``llama3``): Llama 3.1 / 3.2 / 3.3's JSON tool calling: the reply
  is a JSON object ``{"name": ..., "parameters": {...}}`` (``arguments`` is read too),
  optionally after ``<|python_tag|>``; several are separated by ``;``. A reply that does not
  start with ``{`` (after the tag) makes no call.
* ``mistral``: ``[TOOL_CALLS]`` followed by a JSON list of ``{"name", "arguments"}``.

A reply that makes no call ends the episode (as TRL's loop does). A call that cannot be read
(bad JSON, no ``name``, ``arguments`` not an object) is a ToolCall with ``error`` set: the
environment answers it with that error, so the model learns from it; it is never a crash.
``register(name, fn)`` adds a parser (``fn(reply) -> list[ToolCall]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: ``name`` and ``arguments``, or ``error`` (why the call
    could not be read; then name and arguments may be None). ``text``: the call as written."""

    name: str | None
    arguments: dict | None
    text: str
    error: str | None = None


Parser = Callable[[str], list[ToolCall]]


def from_json(text: str, *, arguments_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    """A call from its JSON text ``{"name": str, <arguments key>: object}``; an
    ``arguments`` given as a JSON string of an object is read too (some models write it so)."""
    text = text.strip()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        return ToolCall(None, None, text, f"malformed tool call: not JSON ({err.msg} at "
                                          f"character {err.pos})")  # fmt: skip
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return ToolCall(None, None, text, 'malformed tool call: write {"name": "<tool>", '
                                          f'"{arguments_keys[0]}": {{...}}}}')  # fmt: skip
    key = next((k for k in arguments_keys if k in body), None)
    args = {} if key is None else body[key]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(body["name"], None, text, f"malformed tool call: \"{key}\" must be a "
                                                  "JSON object of argument names and values")
    return ToolCall(body["name"], args, text)


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def hermes(reply: str) -> list[ToolCall]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them."""
    return [from_json(body) for body in _HERMES.findall(reply)]


def llama3_json(reply: str) -> list[ToolCall]:
    """``{"name": ..., "parameters": {...}}`` (after an optional ``<|python_tag|>``), several
    separated by ``;``; a reply that does not start with ``{`` makes no call."""
    text = reply.strip().removeprefix("<|python_tag|>").strip()
    if not text.startswith("{"):
        return []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the rest is one malformed call
            calls.append(from_json(text[pos:], arguments_keys=("parameters", "arguments")))
            break
        calls.append(from_json(text[pos:end], arguments_keys=("parameters", "arguments")))
        rest = text[end:].lstrip()
        if not rest.startswith(";"):
            break  # text after the calls is not another call
        pos = len(text) - len(rest[1:].lstrip())
    return calls


def mistral(reply: str) -> list[ToolCall]:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""
    head, marker, rest = reply.partition("[TOOL_CALLS]")
    if not marker:
        return []
    rest = rest.strip()
    try:
        items, _ = json.JSONDecoder().raw_decode(rest)
    except json.JSONDecodeError as err:
        return [ToolCall(None, None, rest, f"malformed tool call: not JSON ({err.msg})")]
    items = items if isinstance(items, list) else [items]
    return [from_json(json.dumps(item)) for item in items]


PARSERS: dict[str, Parser] = {"hermes": hermes, "qwen": hermes, "llama3_json": llama3_json,
                              "llama3": llama3_json, "mistral": mistral}  # fmt: skip


def register(name: str, parser: Parser) -> None:
    """Make ``parser`` a choice of ``--tool-parser``."""
    PARSERS[name] = parser


def parser_names() -> tuple[str, ...]:
    return tuple(PARSERS)


def get_parser(name: str) -> Parser:
    """The parser ``--tool-parser name`` means; ValueError naming the choices."""
    if name not in PARSERS:
        raise ValueError(f"--tool-parser {name!r} is not a tool-call format; use one of "
                         f"{', '.join(PARSERS)} (the format the model's family was trained "
                         "on: Qwen and Hermes hermes, Llama 3.x llama3_json)")  # fmt: skip
    return PARSERS[name]
