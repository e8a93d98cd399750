"""The warm start: supervised fine-tuning on worked episodes before the first GSPO step.

An RL run learns only what its samples already do now and then. SmolLM2-135M-Instruct, told
how to call the calculator (gspo.train.envs.calculator), called it in 4 of 512 episodes
sampled at temperature 0.7 and never answered right after a call, so GSPO had nothing to
reinforce and taught it to stop calling (docs/environments.md). A few worked episodes fix
that: the cold start of DeepSeek-R1 (arXiv 2501.12948, section 2.3.1) and of most tool-use
RL recipes.

    --warm-start FILE        JSONL, one episode per line: {"messages": [{"role", "content"}, ...]}

Each episode is rendered into token ids the way a rollout is (gspo.train.episodes.Turns):
its first user message as a prompt (the run's system prompt first unless the episode has
its own), each assistant message as the model's tokens plus the end-of-turn token the model
writes itself, each later user message (the environment's), or run of ``tool`` messages
(function tools' answers, with the run's tool schemas in the template), as the template's
new text. The
loss is the mean negative log-likelihood of the assistant tokens only (cross-entropy,
temperature 1), AdamW at a constant ``--warm-start-lr``, ``--warm-start-epochs`` passes in
batches of ``BATCH`` episodes per rank, shuffled by the run's seed. It runs once, on a new
run (never on resume: the checkpoints hold its result), before the sampler is built, so the
first rollout samples the warm-started policy.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from gspo.config import check, option

# torch and the trainer's modules are imported where used: gspo.train.config imports this
# module's WarmStartConfig, and `gspo train --help` does not import torch.

BATCH = 8  # episodes per rank per optimizer step
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
    """Supervised steps on worked episodes before GSPO (module docstring)."""

    warm_start: str | None = option(
        None, "JSONL of worked episodes ({'messages': [...]} each): before step 1 of a new "
        "run the policy learns their assistant turns by cross-entropy (a cold start)",
        metavar="FILE")  # fmt: skip
    warm_start_epochs: int = option(2, "passes over --warm-start's episodes")
    warm_start_lr: float = option(1e-5, "constant AdamW learning rate of the warm start")

    def __post_init__(self) -> None:
        check(self.warm_start_epochs >= 1, "warm_start_epochs", self.warm_start_epochs,
              "use at least 1 pass")  # fmt: skip
        check(self.warm_start_lr > 0, "warm_start_lr", self.warm_start_lr, "use a positive lr")
        for name in ("warm_start_epochs", "warm_start_lr"):
            value, default = getattr(self, name), self.__dataclass_fields__[name].default
            check(self.warm_start is not None or value == default, name, value,
                  "it sets the warm start: add --warm-start FILE, or drop it")  # fmt: skip
        if self.warm_start is not None:  # "./demos.jsonl" and "demos.jsonl" are one setting
            object.__setattr__(self, "warm_start", os.path.normpath(self.warm_start))


def load(path: str) -> list[tuple[int, list[dict]]]:
    """The episodes of a ``--warm-start`` file, each with its line number. ValueError names
    the line and what is wrong: not UTF-8 or not JSON, no ``messages`` list, a message
    without a known ``role`` or a string ``content``, a system message anywhere but first,
    or roles out of turn (user first; after the first assistant message, assistant and user
    alternate and the assistant has the last word: an environment's messages are user
    turns, as in a rollout, or ``tool`` messages for function tools, a run of them being
    one turn)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--warm-start {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"--warm-start {path}: not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); write the file as UTF-8 JSONL") from None  # fmt: skip
    episodes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            episodes.append((number, _episode(line, f"--warm-start {path}, line {number}")))
    if not episodes:
        raise ValueError(f"--warm-start {path}: the file has no episodes")
    return episodes


def _episode(line: str, where: str) -> list[dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: needs {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise ValueError(f"{where}: each message needs a role ({', '.join(ROLES)}) "
                             f"and a string content, got {message!r:.80}")  # fmt: skip
    roles = [m["role"] for m in messages]
    # a run of tool messages (function tools' answers to one reply) is one environment turn
    merged = [r for i, r in enumerate(roles) if r != "tool" or i == 0 or roles[i - 1] != "tool"]
    turns = ["user" if r == "tool" and i else r for i, r in enumerate(
        merged[1:] if merged[0] == "system" else merged)]  # fmt: skip
    later = turns[turns.index("assistant") :] if "assistant" in turns else []
    answers = all(r != "tool" or (i and roles[i - 1] in ("assistant", "tool"))
                  for i, r in enumerate(roles))  # tool messages answer a reply  # fmt: skip
    if (not later or not answers or turns[0] != "user" or "system" in turns
            or later[-1] != "assistant"
            or any(a == b for a, b in zip(later, later[1:], strict=False))):  # fmt: skip
        raise ValueError(f"{where}: an episode is an optional system message, user messages, "
                         "then assistant and user (the environment's) messages in turn, "
                         f"ending with an assistant message; got roles {roles}")  # fmt: skip
    return messages


def encode(episode: list[dict], turns, end_of_turn: int) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one episode as a rollout renders it (module docstring); ``mask`` is
    True on the assistant tokens, ``end_of_turn`` included."""
    split = next(i for i, m in enumerate(episode) if m["role"] not in ("system", "user"))
    first, later = episode[:split], episode[split:]
    first = first[0]["content"] if len(first) == 1 else first  # a plain first message
    ids = turns.first_ids([first])[0]
    mask = [False] * len(ids)
    tokenize = turns.tokenizer
    for k, message in enumerate(later):
        if message["role"] == "tool" and later[k - 1]["role"] == "tool":
            continue  # answered with the first of its run
        if message["role"] == "assistant":
            new = tokenize(message["content"], add_special_tokens=False)["input_ids"]
            new = new + [end_of_turn]
            ids, mask = ids + new, mask + [True] * len(new)
            reply_ids = new
        else:
            run = message["content"]
            if message["role"] == "tool":  # the run of tool messages, as a rollout appends it
                end = next((j for j in range(k, len(later)) if later[j]["role"] != "tool"),
                           len(later))  # fmt: skip
                run = later[k:end]
            new = turns.env_ids(first, later[:k], reply_ids, run)
            ids, mask = ids + new, mask + [False] * len(new)
    return ids, mask


def end_of_turn_id(turns, eos: list[int]) -> int:
    """The token the model writes to end its turn: the first token the chat template puts
    after an assistant message when that token ends a response, else the first EOS id."""
    if turns.templated:
        text = turns.env_text("1 + 1?", [{"role": "assistant", "content": "2"}], [], "ok")
        first = turns.tokenizer(text, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in eos:
            return first[0]
    return eos[0]


def run(logprobs, encoded: list[tuple[list[int], list[bool]]], config: WarmStartConfig, *,
        world, seed: int, max_grad_norm: float, pad_id: int, shared_prefix: bool = True,
        log=print) -> list[float]:  # fmt: skip
    """Fine-tune ``logprobs`` (the trainer's log-prob module, DDP/FSDP2-wrapped or not) on
    the encoded episodes; returns each epoch's mean loss (nats per assistant token, over
    all ranks). Under torchrun each rank takes a contiguous share (episodes beyond a
    multiple of the world size are left out, so that every rank takes the same number of
    steps). ``shared_prefix`` (the run's ``--shared-prefix``) runs the ids a batch's
    episodes all begin with (the system prompt, the tools' schemas) once per batch, as a
    rollout group's prompt is (gspo.prefix): the same loss and gradients, fewer tokens."""
    import torch

    per_rank = len(encoded) // world.size
    if per_rank == 0:
        raise ValueError(f"--warm-start: {len(encoded)} episodes for {world.size} ranks; "
                         "give at least one episode per rank")  # fmt: skip
    mine = encoded[world.rank * per_rank : (world.rank + 1) * per_rank]
    params = [p for p in logprobs.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.warm_start_lr, betas=(0.9, 0.99))
    order = random.Random(seed)
    losses = []
    for epoch in range(1, config.warm_start_epochs + 1):
        order.shuffle(mine)
        total = count = 0.0
        for at in range(0, per_rank, BATCH):
            loss, tokens = _batch_loss(logprobs, mine[at : at + BATCH], pad_id, world.device,
                                       shared_prefix=shared_prefix)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total, count = total + float(loss.detach()) * tokens, count + tokens
        if world.distributed:
            sums = torch.tensor([total, count], dtype=torch.float64, device=world.device)
            torch.distributed.all_reduce(sums)
            total, count = sums.tolist()
        losses.append(total / count)
        log(f"warm start: epoch {epoch}/{config.warm_start_epochs}, loss {losses[-1]:.4f} "
            "nats per assistant token")  # fmt: skip
    return losses


def common_prefix(sequences: list[list[int]]) -> int:
    """How many leading ids every sequence shares."""
    first, n = sequences[0], min(len(s) for s in sequences)
    return next((i for i in range(n) if any(s[i] != first[i] for s in sequences)), n)


def _batch_loss(logprobs, batch, pad_id: int, device, *, shared_prefix: bool = True):
    """(mean NLL of the batch's assistant tokens, their count); right-padded, the padding
    masked. With ``shared_prefix``, the ids all episodes begin with go to the forward as
    ``prompt_len`` (CausalLMLogprobs packs them once where that is exact and cheaper)."""
    import torch

    from gspo.masking import masked_mean

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for row, (seq, mask) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        target[row, : len(seq) - 1] = torch.tensor(mask[1:])
    ids, attention, target = ids.to(device), attention.to(device), target.to(device)
    # No target may sit in the shared part (packing scores responses only), and one column
    # past it must remain: prompt_len is in [1, L).
    first_target = min(mask[1:].index(True) if True in mask[1:] else len(mask)
                       for _, mask in batch)  # fmt: skip
    shared = min(common_prefix([seq for seq, _ in batch]), first_target + 1, width - 1)
    # (a batch of one packs into no fewer tokens: CausalLMLogprobs then runs the plain forward)
    prompt_len = shared if shared_prefix and shared >= 1 else None
    logp = logprobs(ids, attention, target_mask=target, prompt_len=prompt_len)
    return -masked_mean(logp, target), int(target.sum())


def warm_start(config, policy, logprobs, world, *, limit: int | None,
               log=print) -> list[float]:  # fmt: skip
    """The warm start of a new run (module docstring): ``config`` the TrainConfig, ``policy``
    its models.Policy, ``logprobs`` the trainer's (wrapped) log-prob module, ``limit`` the
    model's positions (models.position_limit; None = unbounded). Returns each epoch's mean
    loss."""
    from gspo.train import episodes
    from gspo.train.envs.select import tool_schemas
    from gspo.train.rollout import eos_ids

    path = config.warm.warm_start
    system = episodes.system_prompt(config.data, config.sampling)
    eos = eos_ids(policy.hf_model, policy.tokenizer)
    tools = tool_schemas(config.data) if getattr(policy.tokenizer, "chat_template", None) \
        else None  # fmt: skip
    turns = episodes.Turns(policy.tokenizer, system, eos, tools=tools)
    end = end_of_turn_id(turns, eos)
    encoded = []
    for number, episode in load(path):
        try:
            ids, mask = encode(episode, turns, end)
        except ValueError as err:  # e.g. several first messages for a model without template
            raise ValueError(f"--warm-start {path}, line {number}: {err}") from None
        if limit is not None and len(ids) > limit:
            raise ValueError(f"--warm-start {path}, line {number}: the episode is {len(ids)} "
                             f"tokens, past the model's {limit} positions; shorten it")  # fmt: skip
        encoded.append((ids, mask))
    return run(logprobs, encoded, config.warm, world=world, seed=config.run.seed,
               max_grad_norm=config.optim.max_grad_norm,
               pad_id=policy.tokenizer.pad_token_id, shared_prefix=config.optim.shared_prefix,
               log=log if world.main else _quiet)  # fmt: skip


def _quiet(*_args) -> None:
    pass
