"""Which environment class a run's episodes use: ``--env`` (a class of the contract, or a
TRL-shaped class adapted by envs/trl.py) or ``--tools`` (envs/tools.py); and the checks a
tools run needs from the chat template."""

from __future__ import annotations

from gspo.train.envs import openenv
from gspo.train.envs.base import load_env
from gspo.train.envs.registry import ENVS
from gspo.train.envs.tools import function_tools
from gspo.train.envs.trl import (
    ROUTE,
    check_routes,
    env_paths,
    is_trl_shaped,
    routed_env,
    tool_names,
    trl_env,
)
from gspo.train.rewards import import_reward, import_user
from gspo.train.tools.schema import load_tools, method_schema, tool_schema

DEFAULT_PARSER = "hermes"  # Qwen / Hermes / ChatML with tools (examples/chatml-tools.jinja)


def _target(spec: str):
    if openenv.is_server(spec):  # a URL, nothing to import
        return None
    path = ENVS.get(spec, spec)
    return import_user("--env", path) if ":" in path else None


def several(spec: str | None) -> bool:
    """``--env`` gives several classes, routed by each row's ``environment`` field."""
    return spec is not None and "," in spec and not openenv.is_server(spec)


def _classes(spec: str) -> list[type]:
    """The TRL-shaped classes of ``--env module:A,B``; ValueError for a name that is not a
    class there, or a class of docs/environments.md's contract (which is not routed)."""
    out = []
    for path in env_paths(spec):
        target = import_user("--env", path)
        if not is_trl_shaped(target):
            raise ValueError(f"--env {spec!r}: {path} is not a TRL-shaped class (one with "
                             "reset(**row) and tools as methods, without the contract's step "
                             "and reward); rows are routed by their "
                             f"{ROUTE!r} field to TRL-shaped classes only")  # fmt: skip
        out.append(target)
    return out


def _routed(task, parser: str) -> type:
    rewards = [import_reward(s) for s in task.reward]
    limit, weights = task.tool_time_limit, task.reward_weights
    adapted = [trl_env(c, parser=parser, reward_fns=rewards, weights=weights, time_limit=limit)
               for c in _classes(task.env)]  # fmt: skip
    return routed_env(adapted)


def check_rows(task, rows) -> None:
    """With several ``--env`` classes, ValueError (exit 2, at start) for a row whose
    ``environment`` field names none of them."""
    if several(task.env):
        check_routes(rows, {c.__name__: c for c in _classes(task.env)})


def resolve(task, reward_fn) -> type | None:
    """The environment class of ``task`` (TaskConfig: env, tools, tool_parser,
    tool_time_limit, reward, reward_weights), None for single-turn runs; ``reward_fn``:
    the run's reward (the task's or --reward), which scores a --tools episode's last reply.
    ValueError (exit 2) for what cannot run, naming the flag."""
    parser = task.tool_parser or DEFAULT_PARSER
    if task.tools is not None:
        return function_tools(load_tools(task.tools), parser=parser, reward_fn=reward_fn,
                              time_limit=task.tool_time_limit)  # fmt: skip
    if task.env is None:
        return None
    if several(task.env):
        return _routed(task, parser)
    if openenv.is_server(task.env):  # --reward, --tool-parser refused by its options' check
        return openenv.server_env(task.env, time_limit=task.tool_time_limit)
    target = _target(task.env)
    if is_trl_shaped(target):
        return trl_env(target, parser=parser, reward_fns=[import_reward(s) for s in task.reward],
                       weights=task.reward_weights, time_limit=task.tool_time_limit)
    if task.reward:
        raise ValueError(f"--reward {list(task.reward)}: with --env {task.env} the "
                         "environment's reward() scores each episode; drop --reward (it "
                         "scores TRL-shaped environments and --tools runs)")  # fmt: skip
    if task.tool_parser is not None:
        raise ValueError(f"--tool-parser {task.tool_parser}: --env {task.env} reads the "
                         "replies itself; the parser is for --tools and TRL-shaped "
                         "environments")  # fmt: skip
    return load_env(task.env)


def tool_schemas(task) -> list[dict] | None:
    """The JSON schemas the chat template renders in every prompt of ``task``'s episodes
    (--tools, or a TRL-shaped --env's methods), else None: prompt lengths count them."""
    if task.tools is not None:
        return [tool_schema(fn) for fn in load_tools(task.tools).values()]
    if several(task.env):  # every class's tools: an upper bound on each prompt's length
        return _routed(task, task.tool_parser or DEFAULT_PARSER).tool_schemas or None
    target = None if task.env is None else _target(task.env)
    if is_trl_shaped(target):
        return [method_schema(target, name) for name in tool_names(target)] or None
    return None


def declared_system_prompt(spec: str) -> str | None:
    """The class attribute ``system_prompt`` of ``--env spec`` (either shape), else None;
    with several classes, each episode's class's own (episodes.MultiTurn)."""
    if several(spec) or openenv.is_server(spec):
        return None
    target = _target(spec)
    if is_trl_shaped(target):
        return getattr(target, "system_prompt", None)
    return getattr(load_env(spec), "system_prompt", None)


def tools_shown(tokenizer, tools: list[dict], system_prompt: str | None) -> None:
    """ValueError unless the chat template shows ``tools`` to the model (SmolLM2's ignores
    ``tools=``: the model would be asked to call tools it is never told of)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--tools: the model has no chat template to show the tools and take "
                         "tool messages; give one with --chat-template FILE, e.g. "
                         "examples/chatml-tools.jinja")  # fmt: skip
    messages = [{"role": "user", "content": "hi"}]
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    name = tools[0]["function"]["name"]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text == plain or name not in text:
        raise ValueError("--tools: the model's chat template does not show tools to the model "
                         "(it ignores tools=); give one that does with --chat-template FILE, "
                         "e.g. examples/chatml-tools.jinja for ChatML models such as "
                         "SmolLM2")  # fmt: skip
