"""A step's batch: prompts -> rollouts -> rewards, and which sequences reach the loss.

``collect`` is the one call the loop makes for "the step's prompts -> rollout + rewards".
Without any of the options below it samples ``prompts_per_step`` prompts once, exactly as
before. With them (gspo.train.config.BatchConfig, DAPO arXiv 2503.14476):

* ``--overlong-penalty BUFFER`` (DAPO 3.4, soft overlong punishment, eq. 13): the reward
  gets ``overlong_penalty(length, limit, BUFFER)`` added, ``limit`` = --max-new-tokens and
  ``length`` the tokens of the longest reply (its EOS included; single-turn: the one
  completion; ``reply_length``). Added before the advantages; ``--dynamic-sampling``
  judges ties before it (below).
* ``--dynamic-sampling`` (DAPO 3.2): a group whose G rewards are all equal has advantage 0
  under every normalisation, so it only dilutes the batch. Ties are judged on the task's own
  score, before the overlong penalty (DAPO's and verl's filter): a group whose answers are
  all wrong is uninformative even when the penalty, by their lengths, unties it.
  ``--dynamic-sampling-on shaped`` judges the rewards after the penalty instead. Rounds of
  ``prompts_per_step`` fresh prompts are sampled until every rank holds its
  ``prompts_per_step / world`` groups whose rewards differ (the first ones, in stream
  order), or ``--max-sampling-rounds`` rounds were sampled; then a short rank fills its
  remaining slots with tied groups that are kept out of the loss (``keep`` False), and the
  step says so (a warning and ``informative_groups`` < prompts_per_step). Extra informative
  groups are dropped, as DAPO drops them.
* ``--mask-truncated`` (DAPO 3.4, overlong filtering): a truncated row (``truncated``: its
  last reply has no EOS, or its episode was cut by --max-turns or the positions) gets
  ``keep`` False: no loss, no gradient, not in the divisor (gspo.train.update). Its reward
  still counts in its group's advantages. ``truncated_frac`` is that share, logged always.

Data parallel: every rank samples its share of every round (ranks sample the same number
of rounds: FSDP's synced ``generate`` is a collective, and one data position must describe
all ranks), and each fills its own quota from its own groups, so every rank ends with
``prompts_per_step / world * G`` sequences: the batch shape of a step without dynamic
sampling, and the same on every rank (the minibatch slices of gspo.train.update and the
micro-batch plan need it). A rank that is full keeps sampling (and dropping) while others
are not. Gathering informative groups across ranks would waste less sampling but move
token tensors between ranks; filling per rank moves four numbers per round.

Every prompt sampled counts as consumed: the step advances the data position by
``rounds x prompts_per_step``, so a resumed run samples what a straight run samples.

Shapes: B = this rank's sequences (prompts x G), T response tokens.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gspo.train import distributed as dd
from gspo.train.config import TrainWarning
from gspo.train.episodes import is_truncated
from gspo.train.rewards import Scores
from gspo.train.rollout import Rollout, concat
from gspo.train.tasks import prompts_at


@dataclass
class Batch:
    """What a step trains on: ``rollout`` [B] (groups of G contiguous rows), ``rewards``
    [B] (the overlong penalty included), ``keep`` [B] bool (True = the sequence is in the
    loss; None = all are), ``consumed`` (prompts taken from the data stream, all ranks
    together) and ``metrics`` (the step's sampling statistics, already reduced over ranks)."""

    rollout: Rollout
    rewards: Scores
    keep: torch.Tensor | None
    consumed: int
    metrics: dict = field(default_factory=dict)


def overlong_penalty(length: torch.Tensor, limit: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, section 3.4, eq. 13) of each
    completion's ``length`` [B] (tokens): with L = ``limit`` and C = ``buffer``,

        0                    if length <= L - C
        ((L - C) - length)/C if L - C < length <= L      (-1 at length = L)
        -1                   if length > L

    Returns [B] float32. ``buffer`` >= 1."""
    if buffer < 1:
        raise ValueError(f"overlong_penalty: buffer {buffer} must be >= 1 (0 = no penalty)")
    start = limit - buffer
    inside = (start - length.to(torch.float32)) / buffer
    return torch.where(length <= start, 0.0, torch.where(length > limit, -1.0, inside))


def truncated(rollout: Rollout, eos: Sequence[int]) -> torch.Tensor:
    """[B] bool: the rows --mask-truncated keeps out of the loss, by the per-reply facts of
    the rollout (episodes.is_truncated): the last reply stopped without an EOS, or the
    episode was cut by --max-turns or the model's positions. A single-turn row is one reply:
    True when its completion ran to --max-new-tokens (DAPO's truncated response).
    A Rollout built without facts (``replies`` None) is read as single-turn: its last masked
    token is the EOS of a completion that has one."""
    if rollout.replies is None or rollout.ends is None:
        length = rollout.response_mask.sum(dim=1)
        response = rollout.input_ids[:, rollout.prompt_len :]
        rows = torch.arange(len(rollout), device=response.device)
        last = response[rows, (length - 1).clamp(min=0)]
        ids = torch.tensor(list(eos), dtype=last.dtype, device=last.device)
        return ~(torch.isin(last, ids) & (length > 0))
    cut = [is_truncated(r, e) for r, e in zip(rollout.replies, rollout.ends, strict=True)]
    return torch.tensor(cut, dtype=torch.bool, device=rollout.response_mask.device)


def reply_length(rollout: Rollout) -> torch.Tensor:
    """[B] long: the tokens of each row's longest reply, the length --overlong-penalty
    compares with --max-new-tokens (the limit of one reply: each reply of an episode has
    it, so the longest one is the reply that came closest to being cut). Single-turn: the
    completion's tokens (its EOS included)."""
    if rollout.replies is None:
        return rollout.response_mask.sum(dim=1)
    longest = [max((end - start for start, end, _ in r), default=0) for r in rollout.replies]
    return torch.tensor(longest, dtype=torch.long, device=rollout.response_mask.device)


def tied_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group: True when its G rewards are all equal (exactly: gspo.advantages decides
    ties on the values too, so such a group's advantages are exactly 0)."""
    return [len(set(rewards[k : k + group_size])) == 1 for k in range(0, len(rewards), group_size)]


def _groups(rollout: Rollout, rewards: Scores, group_size: int) -> list[tuple[Rollout, Scores]]:
    out = []
    for k in range(0, len(rollout), group_size):
        rows = slice(k, k + group_size)
        parts = {name: values[rows] for name, values in rewards.parts.items()}
        out.append((rollout.select(rows), Scores(rewards[rows], parts)))
    return out


def _join(groups: list[tuple[Rollout, Scores]], pad_id: int) -> tuple[Rollout, Scores]:
    rollout = concat([g for g, _ in groups], pad_id)
    values = [v for _, s in groups for v in s]
    parts = {name: [v for _, s in groups for v in s.parts[name]] for name in groups[0][1].parts}
    return rollout, Scores(values, parts)


def collect(
    sample: Callable[..., Rollout],
    pool: Sequence[dict],
    *,
    position: int,
    run,
    batch,
    max_new_tokens: int,
    world: dd.World,
    score: Callable[[Rollout], list[float]],
    eos: Sequence[int],
    pad_id: int,
    step: int = 0,
) -> Batch:
    """The step's batch, from data position ``position`` (module docstring).

    The concerns it reads (``concerns(config)`` gives them from a TrainConfig): ``run``
    (RunConfig: prompts a step, G, the data seed), ``batch`` (BatchConfig: the options
    above) and ``max_new_tokens`` (the overlong penalty's limit).
    ``sample(prompts, group_size=, greedy=)`` samples this rank's prompts (one completion
    each, or an environment's episodes: gspo.train.episodes); ``score(rollout)`` scores them
    (the loop's: it checkpoints and stops the run on a reward or environment error); ``eos``:
    the ids that end a response; ``pad_id``: the tokenizer's pad (rounds are joined with it);
    ``step``: named in the warning."""
    group_size, per_step = run.group_size, run.prompts_per_step
    penalty = functools.partial(_with_penalty, buffer=batch.overlong_penalty,
                                limit=max_new_tokens)  # fmt: skip
    finish = functools.partial(_finish, run=run, batch=batch, limit=max_new_tokens, world=world,
                               eos=eos)  # fmt: skip
    quota = per_step // world.size  # this rank's groups
    informative, tied = [], []  # (rollout, rewards) of single groups, in stream order
    counts = {"groups": 0, "tied": 0, "reward_sum": 0.0, "sequences": 0, "informative": 0}
    rounds = 0
    for rounds in range(1, batch.rounds + 1):
        prompts = prompts_at(pool, run.seed, position + (rounds - 1) * per_step, per_step)
        rollout = sample(dd.shard(prompts, world), group_size=group_size, greedy=False)
        scores = score(rollout)
        rewards = penalty(scores, rollout)
        if not batch.dynamic_sampling:
            return finish(rollout, rewards, rounds=1, counts=None)
        flags = tied_groups(scores if batch.dynamic_sampling_on == "task" else rewards,
                            group_size)  # fmt: skip
        for group, is_tied in zip(_groups(rollout, rewards, group_size), flags, strict=True):
            (tied if is_tied else informative).append(group)
        counts["groups"] += len(flags)
        counts["tied"] += sum(flags)
        counts["reward_sum"] += sum(rewards)
        counts["sequences"] += len(rewards)
        if not dd.any_rank(len(informative) < quota, world):  # every rank is full
            break
    short = max(0, quota - len(informative))
    counts["informative"] = quota - short  # in the batch
    groups = informative[:quota] + tied[:short]
    rollout, rewards = _join(groups, pad_id)
    keep = torch.tensor([k < quota - short for k in range(quota) for _ in range(group_size)],
                        device=rollout.response_mask.device)  # fmt: skip
    out = finish(rollout, rewards, rounds=rounds, counts=counts, keep=keep)
    found = int(out.metrics["informative_groups"])
    if found < per_step and world.main:
        warnings.warn(f"step {step}: {found} of {per_step} groups have rewards that differ after "
                      f"{rounds} sampling rounds (--max-sampling-rounds); training on those "
                      f"{found}, the {per_step - found} tied groups stay out of the loss",
                      TrainWarning, stacklevel=2)  # fmt: skip
    return out


def concerns(config) -> dict:
    """The concerns of a TrainConfig that ``collect`` reads, as its keyword arguments."""
    return {"run": config.run, "batch": config.batch,
            "max_new_tokens": config.sampling.max_new_tokens}  # fmt: skip


def _with_penalty(rewards: list[float], rollout: Rollout, *, buffer: int, limit: int) -> Scores:
    parts = getattr(rewards, "parts", {})
    if not buffer:
        return rewards if isinstance(rewards, Scores) else Scores(rewards, parts)
    length = reply_length(rollout).cpu()
    penalty = overlong_penalty(length, limit, buffer).tolist()
    values = [r + p for r, p in zip(rewards, penalty, strict=True)]
    return Scores(values, {**parts, "overlong_penalty": penalty} if parts else {})


def _finish(rollout, rewards, *, run, batch, limit, world, eos, rounds, counts,
            keep=None) -> Batch:  # fmt: skip
    """The batch with ``keep`` narrowed by --mask-truncated, and its sampling metrics."""
    cut = truncated(rollout, eos)
    if batch.mask_truncated:
        keep = ~cut if keep is None else keep & ~cut
    metrics = {}
    names = ["truncated", "rows"]
    local = [float(cut.sum()), float(len(rollout))]
    if batch.overlong_penalty:
        penalty = overlong_penalty(reply_length(rollout), limit, batch.overlong_penalty)
        names.append("penalty")
        local.append(float(penalty.sum()))
    if keep is not None:
        names.append("kept")
        local.append(float(keep.sum()))
    if counts is not None:
        names += list(counts)
        local += [float(v) for v in counts.values()]
    total = dict(zip(names, dd.all_sum(local, world), strict=True))
    metrics["truncated_frac"] = total["truncated"] / total["rows"]
    if "penalty" in total:
        metrics["overlong_penalty"] = total["penalty"] / total["rows"]
    if "kept" in total:
        metrics["loss_frac"] = total["kept"] / total["rows"]
    if counts is not None:
        metrics.update(sampling_rounds=rounds, prompts_consumed=rounds * run.prompts_per_step,
                       tied_frac=total["tied"] / total["groups"],
                       informative_groups=int(total["informative"]),
                       reward_all_mean=total["reward_sum"] / total["sequences"])  # fmt: skip
    return Batch(rollout, rewards, keep, rounds * run.prompts_per_step, metrics)
