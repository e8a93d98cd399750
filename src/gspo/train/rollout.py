"""Rollouts: what every engine's samples become before rewards and the update.

An engine (``gspo.train.engines``) returns, per sequence, the prompt's token ids, the sampled
token ids and the sampler's log-prob of each sampled token; ``assemble`` lays them out as
tensors the same way for every engine, and decodes the completions for the reward.

Shapes (one letter key): B = prompts x G sequences, P prompt tokens (left-padded),
T response tokens, L = P + T. ``response_mask`` [B, T] is True for the response tokens up to
and including the first EOS; anything generated after EOS is padding and is masked out.

What the reward reads (``Rollout.completions``): the text of every token the model wrote
before its first EOS, special tokens the user added included (a ``</answer>`` declared as an
added special token is in the text, so a reward can check for it), with the tokenizer's own
BOS, EOS, pad and UNK tokens and every EOS id of the model removed. An added token that is
also an EOS id therefore ends the response and is not in the text. (Decoding with
``skip_special_tokens=True``, as before, removed every special token, added ones too: a
reward that looked for one scored 0 on every sample without a word.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gspo.train.tasks.base import Prompt


@dataclass
class Rollout:
    prompts: list[Prompt]  # [B] the prompt dict of every sequence (each repeated G times)
    input_ids: torch.Tensor  # [B, L] prompt + response
    attention_mask: torch.Tensor  # [B, L] 1 = real token (prompt or response up to EOS)
    response_mask: torch.Tensor  # [B, T] bool, True = a token the policy chose
    prompt_len: int  # P
    completions: list[str]  # [B] decoded responses (module docstring: which tokens)
    # [B, T] float32: the sampler's log-prob of each sampled token, under the distribution it
    # sampled from (after temperature and top-p); 0 where response_mask is False.
    logp_sampler: torch.Tensor | None = None
    # Multi-turn episodes (gspo.train.episodes), else None. The response then holds the
    # model's turns *and* the environment's tokens between them: attention_mask is 1 on
    # all of them, response_mask only on the model's. Per row: {"turns": [{"role",
    # "content"}, ...], "reward", "truncated" (episodes.is_truncated), "end" (``ends``),
    # "tool_calls" (environment answers the model saw)}.
    episodes: list[dict] | None = None
    # Per row, each reply of the model: (start, end, stop), its columns [start, end) of the
    # response and why it stopped (``STOPS``); a single-turn row has one reply.
    replies: list[list[tuple[int, int, str]]] | None = None
    # Per row, why its episode ended (``ENDS``): "done" (one reply written, or the
    # environment had no more to say), "max_turns" (--max-turns replies and the
    # environment still answering) or "positions" (no room left for another turn).
    ends: list[str] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice) -> Rollout:
        return Rollout(
            prompts=self.prompts[index],
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_len=self.prompt_len,
            completions=self.completions[index],
            logp_sampler=None if self.logp_sampler is None else self.logp_sampler[index],
            episodes=None if self.episodes is None else self.episodes[index],
            replies=None if self.replies is None else self.replies[index],
            ends=None if self.ends is None else self.ends[index],
        )


STOPS = ("eos", "max_new_tokens", "positions")  # why a continuation stopped
ENDS = ("done", "max_turns", "positions")  # why an episode ended (Rollout.ends)


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation of a token-id sequence: what every engine's
    ``continue_ids`` returns per sample (gspo.train.engines).

    ``ids``: the sampled ids, up to and including the EOS that stopped it (nothing after);
    ``logp``: the sampler's log-prob of each (under temperature and top-p), None when greedy;
    ``stop``: ``"eos"`` (an EOS id of the model), ``"max_new_tokens"`` (--max-new-tokens
    sampled, no EOS) or ``"positions"`` (the model's positions ran out first)."""

    ids: list[int]
    logp: list[float] | None
    stop: str


def stop_reason(prompt_len: int, ids: Sequence[int], *, eos: Sequence[int],
                max_new_tokens: int, max_len: int | None) -> str:  # fmt: skip
    """Why a continuation of a ``prompt_len``-token sequence by ``ids`` stopped (one of
    ``STOPS``): an EOS last, else --max-new-tokens reached, else the model's positions."""
    if ids and ids[-1] in eos:
        return "eos"
    if len(ids) >= max_new_tokens or max_len is None or prompt_len + len(ids) < max_len:
        return "max_new_tokens"
    return "positions"


def trim(prompt_len: int, row: Sequence[int], logp: Sequence[float] | None, *,
         eos: Sequence[int], max_new_tokens: int, max_len: int | None) -> Continuation:  # fmt: skip
    """A generated row (padding after its first EOS allowed) as a Continuation."""
    stop_at = set(eos)
    n = next((t + 1 for t, tok in enumerate(row) if tok in stop_at), len(row))
    ids = list(row[:n])
    return Continuation(ids, None if logp is None else list(logp[:n]),
                        stop_reason(prompt_len, ids, eos=stop_at,
                                    max_new_tokens=max_new_tokens, max_len=max_len))  # fmt: skip


def sample_prompts(engine, tokenizer, prompts: Sequence[Prompt], *, group_size: int,
                   greedy: bool, seed: int | None, system_prompt: str | None,
                   eos: Sequence[int], device: torch.device | str = "cpu") -> Rollout:  # fmt: skip
    """A single-turn rollout through ``engine.continue_ids``: each prompt rendered
    (``encode_prompts``), continued ``group_size`` times (groups contiguous), laid out by
    ``assemble``. Every engine's ``sample`` is this."""
    ids = encode_prompts(tokenizer, prompts, system_prompt)
    outs = engine.continue_ids(ids, n=group_size, greedy=greedy, seed=seed)
    rows = [p for p in prompts for _ in range(group_size)]
    prompt_ids = [p for p in ids for _ in range(group_size)]
    return assemble(tokenizer, rows, prompt_ids, [c.ids for c in outs],
                    None if greedy else [c.logp for c in outs], eos=eos,
                    device=device, stops=[c.stop for c in outs])  # fmt: skip


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off inside; afterwards every submodule's own mode back (module.train(flag)
    would set them all alike, e.g. turn on the dropout of a model that trains in eval mode
    inside a wrapper left in train mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def render_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None,
                  tools: list[dict] | None = None) -> str:
    """The text the model sees: a text prompt is the user message of the tokenizer's chat
    template when it has one (after ``system_prompt``, if given; none leaves the template's
    own default), else the text itself. Chat messages ``[{"role", "content"}]`` go through the
    template as they are (``system_prompt`` is put first if they bring no system message);
    messages that end with an assistant message are a prefill: the model continues that
    message (``continue_final_message``, as TRL's conversational format means), no new turn
    is opened after it. ``tools``: JSON schemas the template renders (``apply_chat_template
    (tools=)``, gspo.train.envs.tools); none = the template's rendering without tools.

    A template that fails (Gemma's refuses a system message, Llama 2's wants user and
    assistant to alternate) is a one-line ValueError naming the prompt and what to change."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not has_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        if not has_template:
            raise ValueError("the prompts are chat messages, but the tokenizer has no chat "
                             "template to render them; give text prompts or a tokenizer with "
                             "a chat_template")  # fmt: skip
        messages = list(prompt)
    added_system = system_prompt is not None and messages[0]["role"] != "system"
    if added_system:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    prefill = messages[-1]["role"] == "assistant"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                             add_generation_prompt=not prefill,
                                             continue_final_message=prefill)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the template is code from the model's files
        text = repr(prompt)
        text = text if len(text) <= 80 else text[:77] + "..."
        reason = " ".join(str(err).split())  # jinja's messages may span lines
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        if added_system:  # the prompt alone: its own error if it fails too, else the flag's
            render_prompt(tokenizer, prompt)
            fix = (
                "drop --system-prompt (the prompt renders without its system message; put "
                "the instruction in the prompts instead)"
            )
        elif isinstance(prompt, str):
            fix = "use a model whose chat template renders a user message (--model)"
        elif prefill:
            fix = (
                "end the prompt's messages with a user message (this template cannot "
                "continue an assistant message), or use a model whose template can"
            )
        else:
            fix = (
                "change the prompt's messages to roles and an order the template accepts "
                "(--prompts / --dataset), or use a model whose template takes them"
            )
        raise ValueError(
            f"the tokenizer's chat template fails on prompt {text}: "
            f"{type(err).__name__}: {reason}; {fix}"
        ) from None


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], system_prompt: str | None = None,
    tools: list[dict] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, as the model saw such text in training: the chat template
    when there is one (it writes its own special tokens), else the tokenizer's own special
    tokens (a BOS for Llama-style tokenizers; nothing for the built-in one)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts = [render_prompt(tokenizer, p["prompt"], system_prompt, tools) for p in prompts]
    return tokenizer(texts, add_special_tokens=not templated)["input_ids"]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's (its config and
    generation config may list several, e.g. <|im_end|> and <|endoftext|>)."""
    found = [tokenizer.eos_token_id]
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        found += value if isinstance(value, list) else [value]
    return sorted({int(i) for i in found if i is not None})


def response_mask_after_eos(response: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """[B, T] bool: True up to and including the first EOS of each row (all True if none).

    A cumulative count of EOS tokens *before* position t is 0 exactly for the tokens we keep.
    """
    ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id))
    is_eos = torch.isin(response, ids.to(response.device)).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return eos_before == 0


def assemble(
    tokenizer,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logps: Sequence[Sequence[float]] | None,
    *,
    eos: Sequence[int],
    device: torch.device | str = "cpu",
    stops: Sequence[str] | None = None,
) -> Rollout:
    """Lay out B sequences as a Rollout: prompts left-padded to P, responses right-padded to
    T = the longest response, everything after a row's first EOS masked and set to pad.
    ``stops``: why each response stopped (``STOPS``, the engine's); None: "eos" where the
    kept response ends in an EOS, else "max_new_tokens". Each row is a one-reply episode
    (``Rollout.replies``, ``Rollout.ends`` "done")."""
    pad = tokenizer.pad_token_id
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in responses))
    prompt = torch.full((B, P), pad, dtype=torch.long)
    prompt_attn = torch.zeros((B, P), dtype=torch.long)
    response = torch.full((B, T), pad, dtype=torch.long)
    sampled = torch.zeros((B, T), dtype=torch.bool)
    logp = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        prompt[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_attn[i, P - len(p) :] = 1
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        sampled[i, : len(r)] = True
        if logps is not None:
            logp[i, : len(r)] = torch.tensor(logps[i], dtype=torch.float32)
    mask = response_mask_after_eos(response, eos) & sampled
    response = torch.where(mask, response, torch.full_like(response, pad))
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    # The model's own markers go; the user's added special tokens stay (module docstring).
    strip = torch.tensor(own_specials(tokenizer, eos), dtype=torch.long)
    keep = mask & ~torch.isin(response, strip)
    completions = [tokenizer.decode(r[m].tolist(), skip_special_tokens=False)
                   for r, m in zip(response, keep, strict=True)]  # fmt: skip
    lengths = mask.sum(dim=1).tolist()
    if stops is None:
        ends_eos = torch.isin(response[torch.arange(B), (mask.sum(dim=1) - 1).clamp(min=0)],
                              torch.tensor(list(eos), dtype=torch.long))  # fmt: skip
        stops = ["eos" if e and n else "max_new_tokens"
                 for e, n in zip(ends_eos.tolist(), lengths, strict=True)]  # fmt: skip
    return Rollout(
        prompts=list(prompts),
        input_ids=torch.cat([prompt, response], dim=1).to(device),
        attention_mask=torch.cat([prompt_attn, mask.long()], dim=1).to(device),
        response_mask=mask.to(device),
        prompt_len=P,
        completions=completions,
        logp_sampler=None if logps is None else logp.to(device),
        replies=[[(0, n, stop)] for n, stop in zip(lengths, stops, strict=True)],
        ends=["done"] * B,
    )


def own_specials(tokenizer, eos: Sequence[int]) -> list[int]:
    """The ids a completion's text leaves out (module docstring): every EOS id and the
    tokenizer's own BOS, EOS, pad and UNK."""
    own = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
           tokenizer.unk_token_id)  # fmt: skip
    return sorted({*eos, *(i for i in own if i is not None)})


def concat(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One Rollout of several, rows in order: prompts left-padded to the longest P,
    responses right-padded to the longest T (as ``assemble`` lays out one)."""
    P = max(r.prompt_len for r in parts)
    T = max(r.response_mask.shape[1] for r in parts)
    pad = torch.nn.functional.pad

    def widen(x: torch.Tensor, p: int, left: int, right: int, value) -> torch.Tensor:
        return torch.cat([pad(x[:, :p], (left, 0), value=value),
                          pad(x[:, p:], (0, right), value=value)], dim=1)  # fmt: skip

    ids, attn, mask, logp = [], [], [], []
    for r in parts:
        left, right = P - r.prompt_len, T - r.response_mask.shape[1]
        ids.append(widen(r.input_ids, r.prompt_len, left, right, pad_id))
        attn.append(widen(r.attention_mask, r.prompt_len, left, right, 0))
        mask.append(pad(r.response_mask, (0, right), value=False))
        if r.logp_sampler is not None:
            logp.append(pad(r.logp_sampler, (0, right), value=0.0))
    return Rollout(
        prompts=[p for r in parts for p in r.prompts],
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(attn),
        response_mask=torch.cat(mask),
        prompt_len=P,
        completions=[c for r in parts for c in r.completions],
        logp_sampler=torch.cat(logp) if len(logp) == len(parts) else None,
        episodes=None if any(r.episodes is None for r in parts) else
        [e for r in parts for e in r.episodes],  # fmt: skip
        replies=None if any(r.replies is None for r in parts) else
        [e for r in parts for e in r.replies],  # fmt: skip
        ends=None if any(r.ends is None for r in parts) else [e for r in parts for e in r.ends],
    )
