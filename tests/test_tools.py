"""gspo.train.tools: schemas from typed, docstringed functions (transformers'
get_json_schema), the parser registry by model family, and calls whose every failure is an
error message, never a crash."""

from __future__ import annotations

import asyncio
import time

import pytest

from gspo.train.tools import ToolCall, get_parser, load_tools, method_schema, run_call, tool_schema
from gspo.train.tools.calls import MAX_CHARS


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


async def async_add(a: int, b: int) -> int:
    """Add two integers, asynchronously.

    Args:
        a: The first term.
        b: The second term.
    """
    await asyncio.sleep(0)
    return a + b


def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


def boom(x: int) -> int:
    """Fail.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"no {x}")


def no_doc(x: int) -> int:
    return x


def no_hint(x):
    """Untyped.

    Args:
        x: Anything.
    """
    return x


TOOLS = {"multiply": multiply, "async_add": async_add, "slow": slow, "boom": boom}


def test_schema_is_transformers_get_json_schema():
    from transformers.utils import get_json_schema

    schema = tool_schema(multiply)
    assert schema == get_json_schema(multiply)
    assert schema["function"]["name"] == "multiply"
    assert schema["function"]["parameters"]["required"] == ["a", "b"]
    assert schema["function"]["parameters"]["properties"]["a"] == \
        {"type": "integer", "description": "The first factor."}  # fmt: skip


@pytest.mark.parametrize("fn", [no_doc, no_hint])
def test_a_function_without_docstring_or_hints_is_refused_naming_it(fn):
    with pytest.raises(ValueError, match=rf"tool {fn.__name__}: no JSON schema .*type hint"):
        tool_schema(fn)


def test_load_tools_from_module_and_builtin():
    tools = load_tools("test_tools:multiply,async_add")
    assert tools == {"multiply": multiply, "async_add": async_add}
    assert list(load_tools("calculator")) == ["calculator"]
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_tools("test_tools:multiply,nope")
    with pytest.raises(ValueError, match="not a built-in tool"):
        load_tools("abacus")
    with pytest.raises(ValueError, match="no JSON schema"):
        load_tools("test_tools:no_doc")


def test_method_schema_drops_self_and_equals_the_function_schema():
    class Env:
        def reset(self, **kwargs):
            return None

        def multiply(self, a: int, b: int) -> int:
            """Multiply two integers.

            Args:
                a: The first factor.
                b: The second factor.
            """
            return a * b

    assert method_schema(Env, "multiply") == tool_schema(multiply)


# (reply, [(name, arguments, error?)]) per parser; a parser that stopped at the first call,
# dropped an unclosed call or crashed on bad JSON fails one of these.
HERMES = [
    ("Answer: 7", []),
    ('<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
     [("multiply", {"a": 2, "b": 3}, False)]),
    ('x <tool_call>{"name": "m", "arguments": {}}</tool_call> y <tool_call>{"name": "n", '
     '"arguments": "{\\"a\\": 1}"}</tool_call>', [("m", {}, False), ("n", {"a": 1}, False)]),
    ('<tool_call>{"name": "m", "arguments": {"a": 1}}', [("m", {"a": 1}, False)]),  # unclosed
    ("<tool_call>{oops}</tool_call>", [(None, None, True)]),
    ('<tool_call>{"arguments": {}}</tool_call>', [(None, None, True)]),
    ('<tool_call>{"name": "m", "arguments": [1]}</tool_call>', [("m", None, True)]),
]
LLAMA3 = [
    ("The answer is 6.", []),
    ('{"name": "multiply", "parameters": {"a": 2, "b": 3}}', [("multiply", {"a": 2, "b": 3},
                                                             False)]),  # fmt: skip
    ('<|python_tag|>{"name": "m", "arguments": {"a": 1}}; {"name": "n", "parameters": {}}',
     [("m", {"a": 1}, False), ("n", {}, False)]),
    ('{"name": "m", "parameters": {"a": ', [(None, None, True)]),
]
MISTRAL = [
    ("no call", []),
    ('[TOOL_CALLS][{"name": "m", "arguments": {"a": 1}}, {"name": "n", "arguments": {}}]',
     [("m", {"a": 1}, False), ("n", {}, False)]),
    ("[TOOL_CALLS][{bad", [(None, None, True)]),
]


@pytest.mark.parametrize("name, cases", [("hermes", HERMES), ("qwen", HERMES),
                                         ("llama3_json", LLAMA3), ("mistral", MISTRAL)])
def test_parsers(name, cases):
    parse = get_parser(name)
    for reply, expected in cases:
        got = [(c.name, c.arguments, c.error is not None) for c in parse(reply)]
        assert got == expected, reply


def test_an_unknown_parser_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"'gemma' is not a tool-call format; use one of "
                                         r"hermes, qwen, llama3_json, llama3, mistral"):
        get_parser("gemma")


def call(name, **arguments) -> ToolCall:
    return ToolCall(name, arguments, "")


def test_calls_answer_results_and_every_failure_as_a_message():
    run = lambda c: run_call(TOOLS, c, time_limit=2.0)  # noqa: E731
    assert (run(call("multiply", a=6, b=7)).content, run(call("multiply", a=6, b=7)).error) == \
        ("42", False)  # fmt: skip
    assert run(call("async_add", a=2, b=3)).content == "5"  # an async def tool
    unknown = run(call("divide", a=1, b=2))
    assert unknown.error and unknown.content == \
        "error: unknown tool 'divide'; the tools are multiply, async_add, slow, boom"
    wrong = run(call("multiply", a=1, c=2))
    assert wrong.error and wrong.content.startswith("error: wrong arguments for multiply:")
    raised = run(call("boom", x=3))
    assert raised.error and raised.content == "error: boom raised RuntimeError: no 3"
    malformed = run(ToolCall(None, None, "{", "malformed tool call: not JSON"))
    assert malformed.error and malformed.content == "error: malformed tool call: not JSON"


def test_a_call_over_the_time_limit_is_answered_not_waited_for():
    start = time.perf_counter()
    late = run_call(TOOLS, call("slow", seconds=5), time_limit=0.2)
    assert time.perf_counter() - start < 2
    assert late.error and late.content == "error: slow took longer than 0.2 s"
    assert run_call(TOOLS, call("slow", seconds=0), time_limit=2).content == "awake"


def test_results_are_text_json_or_cut():
    def listing(n: int) -> list:
        """A list.

        Args:
            n: Its length.
        """
        return list(range(n))

    tools = {"listing": listing}
    assert run_call(tools, call("listing", n=3), time_limit=2).content == "[0, 1, 2]"
    long = run_call(tools, call("listing", n=2000), time_limit=2).content
    assert len(long) == MAX_CHARS + len(" ...(cut)") and long.endswith("...(cut)")


def test_builtin_calculator_is_exact_and_its_errors_are_messages():
    tools = load_tools("calculator")
    assert run_call(tools, call("calculator", expression="0.1 + 0.2"), time_limit=2).content \
        == "0.3"  # fmt: skip
    assert run_call(tools, call("calculator", expression="1/3"), time_limit=2).content == "1/3"
    bad = run_call(tools, call("calculator", expression="2 ** x"), time_limit=2)
    assert bad.error and "CalcError" in bad.content
