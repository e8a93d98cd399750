"""Checks on the data before the first step: prompts that fit the model, and warnings for
settings that do not mean what they seem to.

Prompt lengths are counted as the model sees them (chat template and ``--system-prompt``
included). Too-long prompts are *dropped*, not truncated from the left: a cut prompt asks
another question than the one its reward fields (``answer``, tests, ...) were written for,
and left-truncation would cut the chat template's opening and the system message first.
"""

from __future__ import annotations

from collections.abc import Sequence

from gspo.train import episodes
from gspo.train.config import warn
from gspo.train.envs.select import check_rows, resolve, tool_schemas
from gspo.train.models import position_limit
from gspo.train.rollout import encode_prompts
from gspo.train.tasks.base import Prompt


def prompt_lengths(tokenizer, prompts: Sequence[Prompt], system_prompt: str | None,
                   tools: list[dict] | None = None) -> list[int]:  # fmt: skip
    """Tokens of each prompt as the rollout engines feed it (rollout.encode_prompts; with
    function tools, their schemas as the template renders them)."""
    if not prompts:
        return []
    return [len(ids) for ids in encode_prompts(tokenizer, prompts, system_prompt, tools)]


def fit_prompts(
    pool: list[Prompt], held_out: list[Prompt], tokenizer, model, config
) -> tuple[list[Prompt], list[Prompt], int, int]:
    """(pool, held_out, number dropped, longest prompt in tokens): prompts over
    ``--max-prompt-tokens`` are dropped; every prompt left, plus ``--max-new-tokens``, must
    fit the model's positions, else a ValueError names the longest prompt and the fixes
    (``fit``). ``config``: a TrainConfig or an EvalConfig (their task and sampling
    concerns). The rollout engine is built for the longest prompt (``sequence_len``)."""
    (pool, held_out), dropped, longest = fit([pool, held_out], tokenizer, model, config)
    if not pool or not held_out:
        raise ValueError(
            f"--max-prompt-tokens {config.data.max_prompt_tokens} drops {dropped} prompts and "
            f"leaves {len(pool)} to train on and {len(held_out)} held out; raise it (or "
            "shorten them)"
        )
    return pool, held_out, dropped, longest


def fit(parts: list[list[Prompt]], tokenizer, model, config,
        labels: Sequence[str] = ("training row", "held-out row"),
        ) -> tuple[list[list[Prompt]], int, int]:  # fmt: skip
    """Each list of prompts without those over ``--max-prompt-tokens``, how many were
    dropped, and the longest one left (tokens); a ValueError if it, plus
    ``--max-new-tokens``, does not fit the model's positions (the one rule of `gspo train`
    and `gspo eval`; the engines are sized by the same numbers, ``sequence_len``). With an
    environment (--env, --tools) a row's prompt is its first message: what the
    environment's ``reset()`` writes, after its system prompt (``first_lengths``; ``labels``
    name each part's rows in its errors)."""
    limit = position_limit(model)
    cap, sampling = config.data.max_prompt_tokens, config.sampling
    kept, dropped, longest = [], 0, (0, ("", ""))
    for k, part in enumerate(parts):
        label = labels[k] if k < len(labels) else "row"
        check_rows(config.data, part)  # several --env classes: each row names one
        lengths, names = first_lengths(tokenizer, part, config, label)
        keep = [p for p, n in zip(part, lengths, strict=True) if cap is None or n <= cap]
        dropped += len(part) - len(keep)
        kept.append(keep)
        for name, n in zip(names, lengths, strict=True):
            if (cap is None or n <= cap) and n > longest[0]:
                longest = (n, name)
    env_class = resolve(config.data, None)
    if callable(getattr(env_class, "check_episodes_at_once", None)):  # a server's sessions
        env_class.check_episodes_at_once(*episodes_at_once(config, [len(p) for p in parts]))
    if limit is not None and longest[0] + sampling.max_new_tokens > limit:
        room = limit - sampling.max_new_tokens
        fix = (f"--max-prompt-tokens {room} drops longer prompts, or shorten the prompts, or "
               "lower --max-new-tokens" if room > 0 else
               f"lower --max-new-tokens below {limit}")  # fmt: skip
        raise ValueError(
            f"{longest[1][0]} of {longest[0]} tokens {longest[1][1]} plus --max-new-tokens "
            f"{sampling.max_new_tokens} exceeds the model's {limit} positions; {fix}"
        )
    return kept, dropped, longest[0]


def first_lengths(tokenizer, rows: Sequence[Prompt], config,
                  label: str) -> tuple[list[int], list[tuple[str, str]]]:  # fmt: skip
    """(tokens of each row's first message as the engines are fed it, what to call each in
    the error of ``fit``: the words before and after its length). Without an environment:
    the prompt (rollout.encode_prompts, after --system-prompt). With one
    (envs.select.resolve): the message its ``reset()`` writes for the row, after the
    episodes' system prompt (--system-prompt or the environment's own) and with its tools,
    exactly as episodes.MultiTurn renders it; a failing constructor or ``reset()`` is a
    ValueError naming the row (exit 2)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    env_class = resolve(config.data, None)  # the reward is not needed to read the rows
    if env_class is None:  # function tools (--tools) without an environment: their schemas
        tools = tool_schemas(config.data) if templated else None
        lengths = prompt_lengths(tokenizer, rows, config.sampling.system_prompt, tools)
        return lengths, [("a prompt", f"({episodes.clip_repr(p['prompt'])})") for p in rows]
    name = env_class.__qualname__
    firsts = episodes.first_messages(env_class, rows, label)
    tools = getattr(env_class, "tool_schemas", None) or None
    system = episodes.system_prompt(config.data, config.sampling)
    lengths = prompt_lengths(tokenizer, [{"prompt": m} for m in firsts], system,
                             tools if templated else None)  # fmt: skip
    return lengths, [("the first message", f"(environment {name}'s reset() for {label} {i}, "
                      f"after the system prompt; the row's fields {episodes.clip_repr(row)})")
                     for i, row in enumerate(rows)]  # fmt: skip


def episodes_at_once(config, sizes: Sequence[int]) -> tuple[int, str]:
    """(the most episodes a run keeps open at once, the settings that make it), for an
    environment that holds a server session per episode (envs.openenv), which checks at
    start that the server allows as many; each episode is open from its reset to its
    reward. ``sizes``: the rows of each part ``fit`` checks. `gspo train`: a step's
    episodes, all ranks together, or the held-out rows (the last part), evaluated in one
    batch; `gspo eval`: a call's questions times its samples per question."""
    run = getattr(config, "run", None)
    if run is not None:
        step, held = run.prompts_per_step * run.group_size, sizes[-1]
        return max(step, held), (f"--prompts-per-step {run.prompts_per_step} x --group-size "
                                 f"{run.group_size}, or {held} held-out prompts "
                                 "(--eval-prompts)")  # fmt: skip
    per_call = min(max(sizes), max(1, config.sequences_per_call // (1 + config.n)))
    return per_call * max(1, config.n), (f"{per_call} questions a call "
                                         f"(--generation-batch-size) x --n {config.n}")


def sequence_len(model, prompt_tokens: int | None, max_new_tokens: int) -> int:
    """The longest sequence a rollout engine must hold: the longest prompt ``fit`` accepted
    (``prompt_tokens``) plus ``max_new_tokens``, which ``fit`` has held within the model's
    positions. vLLM's ``max_model_len`` is this: larger would make its KV cache hold one
    sequence of the model's full positions (tens of thousands of tokens: a start-up failure
    on a small cache), smaller cuts responses (or refuses prompts) that `--rollout hf` gives
    whole. ``prompt_tokens`` None (an engine built outside `gspo train`/`gspo eval`): the
    model's positions. A ValueError if neither is known, or if they do not fit."""
    limit = position_limit(model)
    if prompt_tokens is None:
        if limit is None:
            raise ValueError("the model's config gives no position limit: tell the engine the "
                             "longest prompt (prompt_tokens=, data.fit returns it)")  # fmt: skip
        return limit
    need = prompt_tokens + max_new_tokens
    if limit is not None and need > limit:
        raise ValueError(f"a prompt of {prompt_tokens} tokens plus --max-new-tokens "
                         f"{max_new_tokens} exceeds the model's {limit} positions; lower "
                         "--max-new-tokens or --max-prompt-tokens")  # fmt: skip
    return need


def engine_prompt_tokens(config, longest: int) -> int | None:
    """What a rollout engine is told of the prompts (``prompt_tokens``): the longest one
    ``fit`` accepted, or None (the model's positions) under ``--env``, whose later turns
    carry the earlier ones; episodes.MultiTurn ends an episode at the engine's ``max_len``,
    so vLLM and hf (the model's positions) then cut episodes alike."""
    multi = getattr(config.data, "env", None) or getattr(config.data, "tools", None)
    return None if multi else longest  # --tools episodes have later turns too


def start_warnings(config, pool_size: int, dropped: int = 0) -> None:
    """Settings that run but do not do what their names suggest, and the prompts dropped by
    --max-prompt-tokens (rank 0 calls this, so a run warns once)."""
    run, optim = config.run, config.optim
    if dropped:
        warn(f"--max-prompt-tokens {config.data.max_prompt_tokens}: dropped {dropped} longer "
             f"prompts ({pool_size} left to train on)")  # fmt: skip
    if pool_size < run.prompts_per_step:
        warn(f"only {pool_size} training prompts for --prompts-per-step "
             f"{run.prompts_per_step}: the same prompt appears more than once in a step "
             "(as separate groups); lower --prompts-per-step or add prompts")  # fmt: skip
    if run.steps < optim.warmup_steps:
        peak = optim.lr * run.steps / optim.warmup_steps
        warn(f"--steps {run.steps} < --warmup-steps {optim.warmup_steps}: the learning "
             f"rate stops at {peak:.3g} and never reaches --lr {optim.lr:g}; lower "
             "--warmup-steps")  # fmt: skip
