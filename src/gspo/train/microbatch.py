"""Micro-batches by token budget: split a batch of sequences so each forward (+backward)
holds at most ``max_tokens`` padded tokens, and merge the pieces back.

A micro-batch is a contiguous run of rows, trimmed to the columns its rows use: the prompt
from its longest prompt's first token (prompts are left-padded), the response up to its
longest response. Its cost is rows x trimmed length, which is what the forward allocates.
Trimming left padding does not move any token: position_ids come from the attention mask.

The loss of each sequence is divided by the minibatch's (global) sequence count, whatever
micro-batch it lands in, so the accumulated gradient is the whole-minibatch gradient
(``tests/test_train_update.py`` checks parameters after a step to 1e-6 in float64).

With the shared-prefix forward (``shared=True``, gspo.prefix) a micro-batch is packed: one
row per group, its prompt's real tokens once and every response's real tokens, rows padded
at the tail to the longest. Its cost is then groups x longest packed row, which is what that
forward allocates; the planner counts exactly that.

Shapes: B sequences, P prompt tokens, T response tokens.
"""

from __future__ import annotations

import contextlib

import torch

from gspo.prefix import groups, packed_lengths
from gspo.train.rollout import Rollout


def row_spans(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: left padding of its prompt [B], and its response length [B]: its real
    tokens after the prompt (a multi-turn episode's environment tokens included; for a
    single-turn rollout the same as the response mask's count)."""
    p = rollout.prompt_len
    pad = (rollout.attention_mask[:, :p] == 0).sum(dim=1)
    return pad, (rollout.attention_mask[:, p:] != 0).sum(dim=1)


def plan(
    rollout: Rollout, max_tokens: int | None, *, count: int | None = None, shared: bool = False
) -> list[slice]:
    """Contiguous row slices with rows x trimmed length <= ``max_tokens`` (greedy, in order).

    A single sequence longer than the budget gets a micro-batch of its own (a sequence is
    never split: the sequence ratio couples all its tokens). ``count`` asks for at least
    that many slices (split further, largest cost first) so that data-parallel ranks run
    the same number of forwards; it must not exceed the number of rows. ``shared``: costs
    are the packed forward's (module docstring).
    """
    b = len(rollout)
    if not max_tokens:
        parts = [slice(0, b)]
    elif shared:
        parts = _plan_packed(rollout, max_tokens)
    else:
        pad, length = (x.tolist() for x in row_spans(rollout))
        p = rollout.prompt_len
        parts, start, lo, hi = [], 0, p, 0
        for i in range(b):
            new_lo, new_hi = min(lo, pad[i]), max(hi, length[i])
            if i > start and (i - start + 1) * (p - new_lo + new_hi) > max_tokens:
                parts.append(slice(start, i))
                start, new_lo, new_hi = i, pad[i], length[i]
            lo, hi = new_lo, new_hi
        parts.append(slice(start, b))
    return _split_to(parts, count or len(parts), rollout, shared)


def _plan_packed(rollout: Rollout, max_tokens: int) -> list[slice]:
    """Greedy contiguous slices whose packed cost (groups x longest packed row) fits."""
    p = rollout.prompt_len
    prompt_tokens = rollout.attention_mask[:, :p].sum(dim=1).tolist()
    response_tokens = rollout.response_mask.sum(dim=1).tolist()
    starts = {g.start for g in groups(rollout.input_ids, rollout.attention_mask, p)}
    parts, start = [], 0
    closed, n_groups, current = 0, 0, 0  # longest closed row, groups, the open row's length
    for i in range(len(rollout)):
        new_group = i in starts or i == start
        row = (prompt_tokens[i] if new_group else current) + response_tokens[i]
        longest = max(closed, current if new_group else 0, row)
        if i > start and (n_groups + new_group) * longest > max_tokens:
            parts.append(slice(start, i))
            start, closed, n_groups = i, 0, 1
            current = prompt_tokens[i] + response_tokens[i]
            continue
        if new_group:
            closed, n_groups = max(closed, current), n_groups + 1
        current = row
    parts.append(slice(start, len(rollout)))
    return parts


def _split_to(parts: list[slice], count: int, rollout: Rollout, shared: bool) -> list[slice]:
    if count > len(rollout):
        raise ValueError(f"count: {count} micro-batches asked of {len(rollout)} rows")
    while len(parts) < count:
        k = max((i for i, s in enumerate(parts) if s.stop - s.start > 1),
                key=lambda i: cost(rollout.select(parts[i]), shared))  # fmt: skip
        s = parts[k]
        mid = (s.start + s.stop) // 2
        parts[k : k + 1] = [slice(s.start, mid), slice(mid, s.stop)]
    return parts


def cost(rollout: Rollout, shared: bool = False) -> int:
    """Tokens the forward runs on: rows x (prompt span + response span) for the trimmed
    padded batch; groups x longest packed row when ``shared``."""
    if shared:
        lengths = packed_lengths(rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
        return len(lengths) * max(lengths)
    pad, length = row_spans(rollout)
    return len(rollout) * (rollout.prompt_len - int(pad.min()) + int(length.max()))


def trim(rollout: Rollout) -> tuple[Rollout, int]:
    """The rows with all-padding columns removed, and T' (its response columns)."""
    pad, length = row_spans(rollout)
    lo = min(int(pad.min()), rollout.prompt_len - 1)  # keep >= 1 prompt column
    t = max(int(length.max()), 1)
    end = rollout.prompt_len + t
    return Rollout(
        prompts=rollout.prompts,
        input_ids=rollout.input_ids[:, lo:end],
        attention_mask=rollout.attention_mask[:, lo:end],
        response_mask=rollout.response_mask[:, :t],
        prompt_len=rollout.prompt_len - lo,
        completions=rollout.completions,
    ), t


def plan_everywhere(
    rollout: Rollout, max_tokens: int | None, world_size: int, *, shared: bool = False
) -> list[slice]:
    """``plan`` with the same number of slices on every rank (the largest any rank needs):
    under FSDP every forward and backward is a collective, so ranks must run as many."""
    parts = plan(rollout, max_tokens, shared=shared)
    if world_size > 1 and max_tokens:
        import torch.distributed as dist

        n = torch.tensor([len(parts)], device=rollout.input_ids.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        parts = plan(rollout, max_tokens, count=int(n.item()), shared=shared)
    return parts


def padded(values: torch.Tensor, width: int) -> torch.Tensor:
    """[b, T'] -> [b, T] with zeros in the columns the trimmed micro-batch did not have."""
    extra = width - values.shape[1]
    return values if extra == 0 else torch.nn.functional.pad(values, (0, extra))


def no_sync(engine, last: bool):
    """DDP: skip the gradient all-reduce for all but the last micro-batch (the last one
    reduces the accumulated sum). FSDP2 reduce-scatters every micro-batch, which keeps
    gradients sharded; the sum is the same."""
    if last or not hasattr(engine, "no_sync"):
        return contextlib.nullcontext()
    return engine.no_sync()


def merge_metrics(pieces: list[tuple[dict, int, int]], token_metrics=frozenset()) -> dict:
    """Metrics of a minibatch from its micro-batches' (metrics, sequences, tokens).

    Sums for the loss (each piece is already divided by the minibatch's count), extremes for
    ratio_min / ratio_max, and weighted means for the rest: by tokens for token-level means
    (entropy, approx_kl, and the objective's ``token_metrics``, gspo.objectives.registry),
    by sequences otherwise.
    """
    if len(pieces) == 1:
        return pieces[0][0]
    token_keys = {"entropy", "approx_kl", *token_metrics}
    seqs = [s for _, s, _ in pieces]
    toks = [t for _, _, t in pieces]
    out = {}
    for key in pieces[0][0]:
        values = [m[key] for m, _, _ in pieces]
        if key == "loss":
            out[key] = sum(values)
        elif key == "ratio_min":
            out[key] = min(values)
        elif key == "ratio_max":
            out[key] = max(values)
        else:
            weights = toks if key in token_keys else seqs
            total = sum(v * w for v, w in zip(values, weights, strict=True))
            out[key] = total / max(sum(weights), 1)
    return out
