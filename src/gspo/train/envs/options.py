"""The start-time checks of the episode options of TaskConfig (``--env``, ``--max-turns``,
``--tools``, ``--tool-parser``, ``--tool-time-limit``): each names the flag and the fix
(exit 2). What needs the user's class imported is checked when the episodes are built
(envs/select.py)."""

from __future__ import annotations

from gspo.config import check
from gspo.train.envs.openenv import check_url, is_server
from gspo.train.envs.registry import names
from gspo.train.tools.parsers import parser_names


def check_episode_options(task) -> None:
    """Check ``task`` (a TaskConfig) and set ``max_turns`` to 4 where episodes run and it
    is not given."""
    env, turns, tools = task.env, task.max_turns, task.tools
    check(env is None or env in names() or ":" in env, "env", env,
          f"use a built-in environment ({', '.join(names())}), your class as "
          "'module:Class', or an OpenEnv server as 'openenv:http://HOST:PORT'")  # fmt: skip
    if is_server(env):
        _check_server(task)
    check(turns is None or env is not None or tools is not None, "max_turns", turns,
          "it bounds the episodes of an environment: add --env NAME")  # fmt: skip
    check(turns is None or turns >= 1, "max_turns", turns, "use a positive integer")
    # --reward with a module:Class --env: only a TRL-shaped class takes it (checked once the
    # class is imported, envs/select.py); a built-in environment scores its episodes itself
    check(env not in names() or not task.reward, "reward", task.reward,
          "with --env the environment's reward() scores each episode: drop --reward")
    check(tools is None or env is None, "tools", tools,
          "--env brings its own tools (a TRL-shaped class: its public methods); drop one")
    check(task.tool_parser is None or task.tool_parser in parser_names(), "tool_parser",
          task.tool_parser, f"use one of {', '.join(parser_names())}")  # fmt: skip
    check(task.tool_parser is None or tools is not None or env is not None, "tool_parser",
          task.tool_parser, "it reads tool calls: add --tools")  # fmt: skip
    check(task.tool_time_limit > 0, "tool_time_limit", task.tool_time_limit,
          "use a positive number of seconds")  # fmt: skip
    if (env is not None or tools is not None) and turns is None:
        object.__setattr__(task, "max_turns", 4)


def _check_server(task) -> None:
    """``--env openenv:URL``: a well-formed URL; the server's rewards score the episodes
    and the replies go to it whole, so --reward and --tool-parser have nothing to do."""
    fix = check_url(task.env)
    check(fix is None, "env", task.env, fix or "")
    check(not task.reward, "reward", task.reward, "with --env openenv:URL the server's "
          "rewards score each episode: drop --reward")  # fmt: skip
    check(task.tool_parser is None, "tool_parser", task.tool_parser, "with --env "
          "openenv:URL each reply goes to the server whole, as its action: drop "
          "--tool-parser")  # fmt: skip
