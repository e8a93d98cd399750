"""Function tools as the ecosystem writes them (docs/tools.md): plain typed, docstringed
Python functions, their JSON schemas for the chat template's ``tools=``, the model's calls
parsed in its family's format, and each call run with its failures answered as messages.

    schema.py    ``--tools module:fn1,fn2`` imported; schemas by transformers' get_json_schema
    parsers.py   the parser registry behind ``--tool-parser`` (hermes / qwen, llama3_json,
                 mistral): a reply -> its tool calls
    calls.py     one call run: unknown tool, wrong arguments, an exception or the time limit
                 become an error message to the model, never a crash
    builtin.py   built-in tools by name (``--tools calculator``)

The environment that runs them in an episode is gspo.train.envs.tools (the contract of
docs/environments.md); a TRL-shaped class is adapted by gspo.train.envs.trl.
"""

from __future__ import annotations

from gspo.train.tools.calls import ToolResult, run_call
from gspo.train.tools.parsers import PARSERS, ToolCall, get_parser, parser_names
from gspo.train.tools.schema import load_tools, method_schema, tool_schema

__all__ = ["PARSERS", "ToolCall", "ToolResult", "get_parser", "load_tools", "method_schema",
           "parser_names", "run_call", "tool_schema"]  # fmt: skip
