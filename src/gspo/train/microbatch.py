"""Micro-batches by token budget: split a batch of sequences so each forward (+backward)
holds at most ``max_tokens`` padded tokens, and merge the pieces back.

A micro-batch is a contiguous run of rows, trimmed to the columns its rows use: the prompt
from its longest prompt's first token (prompts are left-padded), the response up to its
longest response. Its cost is rows x trimmed length, which is what the forward allocates.
Trimming left padding does not move any token: position_ids come from the attention mask.

The loss of each sequence is divided by the minibatch's (global) sequence count, whatever
micro-batch it lands in, so the accumulated gradient is the whole-minibatch gradient
(``tests/test_train_update.py`` checks parameters after a step to 1e-6 in float64).

Shapes: B sequences, P prompt tokens, T response tokens.
"""

from __future__ import annotations

import contextlib

import torch

from gspo.train.rollout import Rollout


def row_spans(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: left padding of its prompt [B], and its response length [B]: its real
    tokens after the prompt (a multi-turn episode's environment tokens included; for a
    single-turn rollout the same as the response mask's count)."""
    p = rollout.prompt_len
    pad = (rollout.attention_mask[:, :p] == 0).sum(dim=1)
    return pad, (rollout.attention_mask[:, p:] != 0).sum(dim=1)


def plan(rollout: Rollout, max_tokens: int | None, *, count: int | None = None) -> list[slice]:
    """Contiguous row slices with rows x trimmed length <= ``max_tokens`` (greedy, in order).

    A single sequence longer than the budget gets a micro-batch of its own (a sequence is
    never split: the sequence ratio couples all its tokens). ``count`` asks for at least
    that many slices (split further, largest cost first) so that data-parallel ranks run
    the same number of forwards; it must not exceed the number of rows.
    """
    b = len(rollout)
    if not max_tokens:
        parts = [slice(0, b)]
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
    return _split_to(parts, count or len(parts), rollout)


def _split_to(parts: list[slice], count: int, rollout: Rollout) -> list[slice]:
    if count > len(rollout):
        raise ValueError(f"count: {count} micro-batches asked of {len(rollout)} rows")
    while len(parts) < count:
        k = max((i for i, s in enumerate(parts) if s.stop - s.start > 1),
                key=lambda i: cost(rollout.select(parts[i])))  # fmt: skip
        s = parts[k]
        mid = (s.start + s.stop) // 2
        parts[k : k + 1] = [slice(s.start, mid), slice(mid, s.stop)]
    return parts


def cost(rollout: Rollout) -> int:
    """Padded tokens of the trimmed micro-batch: rows x (prompt span + response span)."""
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


def plan_everywhere(rollout: Rollout, max_tokens: int | None, world_size: int) -> list[slice]:
    """``plan`` with the same number of slices on every rank (the largest any rank needs):
    under FSDP every forward and backward is a collective, so ranks must run as many."""
    parts = plan(rollout, max_tokens)
    if world_size > 1 and max_tokens:
        import torch.distributed as dist

        n = torch.tensor([len(parts)], device=rollout.input_ids.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        parts = plan(rollout, max_tokens, count=int(n.item()))
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


def merge_metrics(pieces: list[tuple[dict, int, int]], sequence_level: bool) -> dict:
    """Metrics of a minibatch from its micro-batches' (metrics, sequences, tokens).

    Sums for the loss (each piece is already divided by the minibatch's count), extremes for
    ratio_min / ratio_max, and weighted means for the rest: by tokens for token-level means
    (entropy, approx_kl, and the clip and ratio statistics of token-level variants), by
    sequences otherwise.
    """
    if len(pieces) == 1:
        return pieces[0][0]
    token_keys = {"entropy", "approx_kl"}
    if not sequence_level:
        token_keys |= {"clip_frac_low", "clip_frac_high", "ratio_mean", "gate_weight_mean",
                       "gate_weight_low_frac", "bound_frac_high", "bound_frac_low"}
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
