"""Episodes: prompts -> a Rollout -> its rewards, one interface whether or not ``--env`` is
given, so that the loop and `gspo eval` have no branch for it.

    episodes = build(config.data, config.sampling, sampler, tokenizer, model, reward_fn)
    rollout = episodes.rollout(prompts, group_size=G, greedy=False)
    rewards = episodes.score(rollout)          # rewards.Scores, [B]
    record.update(episodes.metrics(rollout))   # {} for single-turn runs

``SingleTurn``: one prompt, one completion (the engine's ``sample``: its ``continue_ids``),
scored by the reward function. ``MultiTurn``: the model writes, the environment
(gspo.train.envs) answers, the model writes again, until the environment's ``step``
returns None or ``--max-turns`` replies were written; the environment's ``reward()`` scores
the episode.

Token ids end to end (docs/environments.md): an episode's ids start as its first message
rendered exactly as a prompt is (rollout.encode_prompts); each turn appends the model's
sampled ids as they came from the engine (never decoded and re-encoded), then the ids of
the text the template puts after the model's turn: its end of that turn (minus the EOS the
model already wrote), the environment's message as a user turn (tool results as the
template renders them), and the template's opening of the next assistant turn: all that
follows a sentinel standing for the last reply in the template's rendering of the
conversation with the new message, so that how a template re-renders past replies (Qwen3's
drop their think blocks) does not matter; tokenized in its context (``Turns.env_ids``).
Without a chat template the environment's message is appended as ``PLAIN_SEPARATOR +
message + PLAIN_SEPARATOR``.

In the Rollout, the response is everything after the first message: ``response_mask``
[B, T] is True on the model's tokens only (the loss, its ``T_i``, the KL, the old and
the sampler's log-probs see nothing else), ``attention_mask`` is 1 on every real token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gspo.train.envs.base import EnvError, call, check_message, check_reward
from gspo.train.envs.select import declared_system_prompt, resolve, tools_shown
from gspo.train.rewards import Scores, score
from gspo.train.rollout import Rollout, encode_prompts, eos_ids, own_specials

PLAIN_SEPARATOR = "\n"  # around an environment's message when the model has no chat template
SENTINEL = "\ue000gspo-reply\ue000"  # stands for the model's last reply while rendering


class SingleTurn:
    """One prompt, one completion, the reward function's score: today's runs, unchanged."""

    def __init__(self, sampler, reward_fn) -> None:
        self.sampler, self.reward_fn = sampler, reward_fn

    def rollout(self, prompts: Sequence[dict], *, group_size: int, greedy: bool,
                seed: int | None = None) -> Rollout:  # fmt: skip
        """``seed``: the batch drawn from its own seed (the engine's ``continue_ids``)."""
        if seed is None:
            return self.sampler.sample(prompts, group_size=group_size, greedy=greedy)
        return self.sampler.sample(prompts, group_size=group_size, greedy=greedy, seed=seed)

    def score(self, rollout: Rollout) -> Scores:
        return score(self.reward_fn, rollout.prompts, rollout.completions)

    def metrics(self, rollout: Rollout) -> dict[str, float]:
        return {}


class Turns:
    """How an environment's message becomes token ids after the model's reply (module
    docstring). ``system_prompt``: put first, as rollout.render_prompt does. ``tools``: the
    JSON schemas of function tools (gspo.train.envs.tools), given to the template as
    ``tools=`` in every rendering; none = no tools."""

    def __init__(self, tokenizer, system_prompt: str | None, eos: Sequence[int],
                 tools: list[dict] | None = None) -> None:  # fmt: skip
        self.tokenizer, self.system_prompt, self.eos = tokenizer, system_prompt, set(eos)
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.tools = tools or None

    def first_ids(self, messages: Sequence[str | list]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, [{"prompt": m} for m in messages],
                              self.system_prompt, self.tools)  # fmt: skip

    def _history(self, first: str | list, later: Sequence[dict]) -> list[dict]:
        messages = [{"role": "user", "content": first}] if isinstance(first, str) else \
            list(first)  # fmt: skip
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages + list(later)

    def env_text(self, first, later: Sequence[dict], reply_ids: Sequence[int],
                 message: str | list[dict]) -> str:  # fmt: skip
        """The text that follows the model's reply ``reply_ids`` (its tokens) when the
        environment answers ``message`` (a user turn's text, or messages: a function tool's
        ``tool`` messages); ``first``/``later``: the conversation so far, the reply last."""
        return self._render(first, later, reply_ids, message)[1]

    def _render(self, first, later, reply_ids, message) -> tuple[str, str]:
        """(context, text): ``env_text`` and the text it follows. With a chat template, the
        template's rendering of the conversation with the new message, the model's reply a
        sentinel: ``text`` is all that follows the sentinel (the template's end of the
        model's turn, minus the EOS the model wrote, then the message as the template
        renders it after that turn, then the opening of the next assistant turn), and the
        context all before it. Only the rendering *after* the model's turn is read, so a
        template that re-renders earlier turns (Qwen3's drops past think blocks and puts
        an empty one before a final assistant turn) does not matter: the episode keeps
        the model's tokens as sampled. Without a template: the reply's text, then
        ``PLAIN_SEPARATOR + message + PLAIN_SEPARATOR``."""
        new = [{"role": "user", "content": message}] if isinstance(message, str) else \
            list(message)  # fmt: skip
        if not self.templated:
            text = "\n".join(m["content"] for m in new)
            reply = self.tokenizer.decode(list(reply_ids), skip_special_tokens=False)
            return reply, f"{PLAIN_SEPARATOR}{text}{PLAIN_SEPARATOR}"
        history = self._history(first, later[:-1]) + [{"role": "assistant", "content": SENTINEL}]
        try:
            after = self.tokenizer.apply_chat_template(history + new, tools=self.tools,
                                                       tokenize=False,
                                                       add_generation_prompt=True)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - the template is code from the model's files
            reason = " ".join(str(err).split())[:200]
            raise ValueError(f"--env: the tokenizer's chat template fails on a conversation "
                             f"of user and assistant turns ({type(err).__name__}: {reason}); "
                             "use a model whose template renders one (--model)") from None
        if after.count(SENTINEL) != 1:
            raise ValueError(
                "--env: the tokenizer's chat template does not render the model's last reply "
                "once, as written, before the environment's message (so the message's text "
                "after the reply is unknown); use a model whose template does (--model)"
            )
        cut = after.index(SENTINEL) + len(SENTINEL)
        text = after[cut:]  # the template's end of turn, the message, the next opening
        if reply_ids and reply_ids[-1] in self.eos:  # the model wrote that marker itself
            written = self.tokenizer.decode([reply_ids[-1]], skip_special_tokens=False)
            text = text.removeprefix(written)
        return after[: len(after) - len(text)], text

    def env_ids(self, first, later, reply_ids, message: str | list[dict]) -> list[int]:
        """The ids of ``env_text``, tokenized in its context: the ids the tokenizer gives the
        text where the template's rendering has it, after the reply, not alone (alone, a
        SentencePiece-style tokenizer, Metaspace with prepend_scheme "first", starts the
        text with a word boundary "▁" the rendering does not have). Taken as the ids of
        context + text past those of the context; where the two do not share the context's
        ids (the text's first characters merge into the context's last token), the
        text's own ids."""
        context, text = self._render(first, later, reply_ids, message)
        def encode(s: str) -> list[int]:
            return self.tokenizer(s, add_special_tokens=False)["input_ids"]
        head, whole = encode(context), encode(context + text)
        if context and whole[: len(head)] == head:
            return whole[len(head) :]
        return encode(text)

    def check(self) -> None:
        """Fail at start, not mid-run, if the template cannot take turns (with tools: tool
        messages, and a rendering that shows the tools to the model)."""
        message = "1 + 1 = 2" if self.tools is None else \
            [{"role": "tool", "name": "calculator", "content": "2"}]  # fmt: skip
        self.env_ids("1 + 1?", [{"role": "assistant", "content": "<calc>1 + 1</calc>"}],
                     sorted(self.eos)[:1], message)  # fmt: skip
        if self.tools is not None:
            tools_shown(self.tokenizer, self.tools, self.system_prompt)


class MultiTurn:
    """Episodes with an environment class ``env_class`` (module docstring)."""

    def __init__(self, sampler, tokenizer, env_class: type, *, max_turns: int,
                 system_prompt: str | None, eos: Sequence[int], max_new_tokens: int,
                 max_len: int | None = None,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.device = device
        self.sampler, self.tokenizer, self.env_class = sampler, tokenizer, env_class
        self.max_turns, self.max_new_tokens, self.max_len = max_turns, max_new_tokens, max_len
        self.eos = list(eos)
        self.strip = set(own_specials(tokenizer, eos))
        self.turns = Turns(tokenizer, system_prompt, eos,
                           tools=getattr(env_class, "tool_schemas", None))  # fmt: skip
        # several TRL-shaped classes (envs.trl.Routed): each episode sees its class's tools
        self.routes = {name: Turns(tokenizer, system_prompt if system_prompt is not None
                                   else getattr(c, "system_prompt", None), eos,
                                   tools=c.tool_schemas)
                       for name, c in getattr(env_class, "routes", {}).items()}  # fmt: skip
        for turns in [*self.routes.values()] or [self.turns]:
            turns.check()

    def reply_text(self, ids: Sequence[int]) -> str:
        """The reply as the environment reads it: the rule of Rollout.completions."""
        return self.tokenizer.decode([i for i in ids if i not in self.strip],
                                     skip_special_tokens=False)  # fmt: skip

    def rollout(self, prompts: Sequence[dict], *, group_size: int, greedy: bool,
                seed: int | None = None) -> Rollout:  # fmt: skip
        """``group_size`` episodes per prompt (contiguous rows). ``seed``: each turn drawn
        from its own seed (``seed``, turn), whatever else drew from the RNG (the sampler
        thread of --async-rollouts)."""
        rows = [p for p in prompts for _ in range(group_size)]
        envs: list = []
        try:
            firsts = []
            for i, row in enumerate(rows):
                env, first = start(self.env_class, row, i)
                envs.append(env)
                firsts.append(first)
            return self._episodes(rows, envs, firsts, greedy=greedy, seed=seed)
        except BaseException:
            close_all(envs)  # a server's sessions (envs.openenv) end with the batch
            raise

    def _episodes(self, rows, envs, firsts, *, greedy: bool, seed: int | None) -> Rollout:
        """``rollout`` once every episode has started (``envs``, their ``firsts``)."""
        turns_of = [self.routes.get(getattr(e, "route", None), self.turns) for e in envs]
        prompt_ids = [t.first_ids([f])[0] for t, f in zip(turns_of, firsts, strict=True)] \
            if self.routes else self.turns.first_ids(firsts)  # fmt: skip
        self._check_room(rows, prompt_ids)
        ids = [list(p) for p in prompt_ids]
        # per row: [(token ids, the model's?, sampler log-probs or None)]
        segments: list[list[tuple]] = [[] for _ in rows]
        later: list[list[dict]] = [[] for _ in rows]  # the conversation after the first message
        calls = [0] * len(rows)  # environment answers the model saw
        replies: list[list[tuple]] = [[] for _ in rows]  # (start, end, stop) in the response
        ends = ["done"] * len(rows)  # why each episode ended (rollout.ENDS)
        last_reply: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for turn in range(1, self.max_turns + 1):
            # every rank of a tensor-parallel engine calls it, with or without episodes left
            outs = self.sampler.continue_ids([ids[i] for i in live], n=1, greedy=greedy,
                                             seed=None if seed is None else seed * 1009 + turn)
            still = []
            for i, out in zip(live, outs, strict=True):
                tokens, logps = out.ids, out.logp
                at = len(ids[i]) - len(prompt_ids[i])
                replies[i].append((at, at + len(tokens), out.stop))
                segments[i].append((tokens, True, logps))
                ids[i] += tokens
                last_reply[i] = tokens
                reply = self.reply_text(tokens)
                later[i].append({"role": "assistant", "content": reply})
                where = {"episode": i, "turn": turn, "prompt": rows[i].get("prompt", rows[i])}
                message = check_message(envs[i], call(envs[i], "step", reply, **where), "step",
                                        **where)  # fmt: skip
                if message is None:
                    continue  # the episode ends
                extra = [] if turn == self.max_turns else \
                    turns_of[i].env_ids(firsts[i], later[i], tokens, message)  # fmt: skip
                room = self.max_len is None or \
                    len(ids[i]) + len(extra) + self.max_new_tokens <= self.max_len  # fmt: skip
                if turn == self.max_turns or not room:
                    # cut: the model never sees this answer (so it is no tool call either)
                    ends[i] = "max_turns" if turn == self.max_turns else "positions"
                    continue
                calls[i] += 1
                segments[i].append((extra, False, None))
                ids[i] += extra
                later[i] += [{"role": "user", "content": message}] if isinstance(message, str) \
                    else message  # fmt: skip
                still.append(i)
            live = still
            if not self.sampler.more(bool(live)):
                break
        rewards = []
        for i, env in enumerate(envs):
            turns = sum(m["role"] == "assistant" for m in later[i])
            where = {"episode": i, "turn": turns, "prompt": rows[i].get("prompt", rows[i])}
            rewards.append(check_reward(env, call(env, "reward", **where), **where))
        # function tools count their calls and errors (envs.tools: ``counts``)
        episodes = [{"turns": _first_turns(self.turns, firsts[i]) + later[i],
                     "reward": rewards[i], "truncated": is_truncated(replies[i], ends[i]),
                     "end": ends[i], "tool_calls": calls[i], **getattr(envs[i], "counts", {}),
                     **({"environment": envs[i].route} if self.routes else {})}
                    for i in range(len(rows))]  # fmt: skip
        completions = [self.reply_text(r) for r in last_reply]
        rollout = lay_out(rows, prompt_ids, segments, completions, episodes,
                          pad=self.tokenizer.pad_token_id, greedy=greedy,
                          device=self.device)  # fmt: skip
        rollout.replies, rollout.ends = replies, ends
        return rollout

    def _check_room(self, rows: Sequence[dict], prompt_ids: Sequence[list[int]]) -> None:
        """An EnvError (checkpoint, exit 3), not the engine's, for a first message that
        leaves no room for a reply: data.fit checked every row's at start, so only an
        environment whose reset() writes something else now gets here."""
        for i, ids in enumerate(prompt_ids):
            if self.max_len is not None and len(ids) + self.max_new_tokens > self.max_len:
                raise EnvError(f"environment {self.env_class.__qualname__}.reset() wrote a "
                               f"first message of {len(ids)} tokens in episode {i} (fields "
                               f"{clip_repr(rows[i])}): with --max-new-tokens "
                               f"{self.max_new_tokens} it exceeds the {self.max_len} positions "
                               "the engine holds, though at start it fit; make reset() "
                               "write the same message for the same row")  # fmt: skip

    def score(self, rollout: Rollout) -> Scores:
        return Scores([e["reward"] for e in rollout.episodes])

    def metrics(self, rollout: Rollout) -> dict[str, float]:
        """Means over this rank's episodes (``episode_metrics``, and per class of several
        ``route_metrics``); ``truncated_frac`` comes from gspo.train.sampling, for every
        run, with the same meaning."""
        return {**episode_metrics(rollout.episodes), **route_metrics(rollout.episodes, self.routes)}


def start(env_class: type, row: dict, i: int, *, where: str = "episode"):
    """(the environment of ``row``, its first message): ``env_class(**row)``, then
    ``reset()`` (a str or chat messages); any exception is an EnvError naming the class,
    ``where`` and ``i`` (the row in the batch), the row's fields and turn 0."""
    try:
        env = env_class(**row)
    except Exception as err:  # noqa: BLE001 - user code: stop the run with context
        raise EnvError(f"environment {env_class.__qualname__}() raised "
                       f"{type(err).__name__}: {err} in {where} {i} (fields {clip_repr(row)}), "
                       "turn 0; fix the environment or the row's fields") from err  # fmt: skip
    context = {"episode": i, "turn": 0, "prompt": row.get("prompt", row)}
    first = check_message(env, call(env, "reset", **context), "reset", **context)
    return env, first


def first_messages(env_class: type, rows: Sequence[dict], label: str) -> list[str | list]:
    """Each row's first message, as ``reset()`` writes it (``start``), for the checks at
    start (gspo.train.data.fit): a ValueError (exit 2) naming the environment and the row
    (``label`` and its index) when the constructor or ``reset()`` fails or returns no
    message. One instance per row, then closed (its ``close()``, where it has one: a session
    such as OpenEnv's) and dropped: the contract's rule, one per episode."""
    out = []
    for i, row in enumerate(rows):
        try:
            env, first = start(env_class, row, i, where=label)
        except EnvError as err:
            raise ValueError(f"{err} (at start, reading the first message of {label} {i})") \
                from None  # fmt: skip
        out.append(first)
        if callable(getattr(env, "close", None)):
            env.close()
    return out


def close_all(envs) -> None:
    """``close()`` every environment that has one (the contract's optional method: a
    server session's end), ignoring their errors: the batch is failing already."""
    for env in envs:
        if callable(getattr(env, "close", None)):
            try:
                env.close()
            except Exception:  # noqa: BLE001 - the error that stops the run is raised
                pass


def clip_repr(value, width: int = 80) -> str:
    """``repr(value)`` cut to ``width`` characters, for errors that name a row."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def is_truncated(replies: Sequence[tuple[int, int, str]], end: str) -> bool:
    """The rule of --mask-truncated and ``truncated_frac`` (docs/batch-hygiene.md), for one
    reply or many: the episode was cut, i.e. its last reply stopped without an EOS
    (--max-new-tokens or the model's positions: DAPO's truncated response), or the episode
    ended by a limit (--max-turns, positions) while the environment was still answering.
    Earlier replies cut by --max-new-tokens do not count: the environment answered them,
    and the episode went on to an end that the reward judges."""
    return not replies or replies[-1][2] != "eos" or end != "done"


def episode_metrics(episodes: Sequence[dict]) -> dict[str, float]:
    """Means over ``episodes``: model replies per episode (``turns_per_episode``), the share
    whose model saw at least one environment answer (``tool_call_rate``; a call on the last
    allowed turn is never answered), the share ended by --max-turns or the model's positions
    (``cut_frac``). With function tools also
    ``tool_calls`` and ``tool_errors``: calls made, and calls answered with an error, per
    episode."""
    n = max(len(episodes), 1)
    out = {
        "turns_per_episode": sum(sum(t["role"] == "assistant" for t in e["turns"])
                                 for e in episodes) / n,  # fmt: skip
        "tool_call_rate": sum(e["tool_calls"] > 0 for e in episodes) / n,
        "cut_frac": sum(e["end"] != "done" for e in episodes) / n,
    }
    if episodes and "tool_errors" in episodes[0]:
        out["tool_calls"] = sum(e["tool_calls"] for e in episodes) / n
        out["tool_errors"] = sum(e["tool_errors"] for e in episodes) / n
    return out


def route_metrics(episodes: Sequence[dict], routes) -> dict[str, float]:
    """Per class of several (``routes``' names, the same keys on every rank):
    ``episodes_NAME``, its share of the episodes, and ``reward_NAME``, their mean reward (0
    when the batch has none: read it with the share)."""
    out = {}
    for name in routes:
        rewards = [e["reward"] for e in episodes if e.get("environment") == name]
        out[f"episodes_{name}"] = len(rewards) / max(len(episodes), 1)
        out[f"reward_{name}"] = sum(rewards) / len(rewards) if rewards else 0.0
    return out


def _first_turns(turns: Turns, first) -> list[dict]:
    return [{"role": "user", "content": first}] if isinstance(first, str) else \
        [m for m in first if m["role"] != "system"]  # fmt: skip


def lay_out(rows, prompt_ids, segments, completions, episodes, *, pad: int, greedy: bool,
            device: torch.device | str = "cpu") -> Rollout:  # fmt: skip
    """Episodes as a Rollout: first messages left-padded to P, the rest (the model's tokens
    and the environment's) right-padded to T; ``response_mask`` True on the model's tokens,
    ``logp_sampler`` their sampler log-probs (None when greedy), 0 elsewhere."""
    B, P = len(rows), max(len(p) for p in prompt_ids)
    T = max(1, max(sum(len(s[0]) for s in segs) for segs in segments))
    input_ids = torch.full((B, P + T), pad, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    logp = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, segs) in enumerate(zip(prompt_ids, segments, strict=True)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p) : P] = 1
        t = 0
        for tokens, model, logps in segs:
            n = len(tokens)
            if n:
                input_ids[i, P + t : P + t + n] = torch.tensor(tokens, dtype=torch.long)
                attention[i, P + t : P + t + n] = 1
                mask[i, t : t + n] = model
                if model and logps is not None:
                    logp[i, t : t + n] = torch.tensor(logps, dtype=torch.float32)
            t += n
    return Rollout(prompts=list(rows), input_ids=input_ids.to(device),
                   attention_mask=attention.to(device), response_mask=mask.to(device),
                   prompt_len=P, completions=list(completions),
                   logp_sampler=None if greedy else logp.to(device),
                   episodes=list(episodes))  # fmt: skip


def build(task, sampling, sampler, tokenizer, model, reward_fn) -> SingleTurn | MultiTurn:
    """The episodes of a run or an evaluation: ``task`` (TaskConfig: --env, --max-turns),
    ``sampling`` (SamplingConfig: the system prompt and the length of a turn)."""
    env_class = resolve(task, reward_fn)  # --env, a TRL-shaped --env, or --tools
    if env_class is None:
        return SingleTurn(sampler, reward_fn)
    return MultiTurn(sampler, tokenizer, env_class, max_turns=task.max_turns,
                     system_prompt=system_prompt(task, sampling), eos=eos_ids(model, tokenizer),
                     max_new_tokens=sampling.max_new_tokens,
                     max_len=getattr(sampler, "max_len", None),
                     device=next(model.parameters()).device)  # fmt: skip


def system_prompt(task, sampling) -> str | None:
    """The system message of a run's episodes: --system-prompt, else the environment's own
    (its class attribute ``system_prompt``), else none."""
    if sampling.system_prompt is not None or task.env is None:
        return sampling.system_prompt
    return declared_system_prompt(task.env)
