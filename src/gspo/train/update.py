"""The policy update for one rollout batch: old log-probs once, then minibatch steps.

Per rollout batch (B sequences, groups of G contiguous rows):
1. advantages from the rewards over whole groups (spec step 1), once;
2. ``logp_old`` [B, T] under the policy that sampled (no grad), once; the same for the
   frozen reference when the KL penalty is on;
3. for each of ``minibatches`` slices: ``logp`` with grad -> ``gspo_loss(advantages=...)``
   (+ ``kl_coef`` x k3 KL) -> backward -> clip grad norm -> AdamW step -> scheduler step.
   From the second slice on the policy has moved, so the ratio leaves 1 and clipping acts.

Memory and precision: every forward in 2-3 can run in micro-batches of at most
``max_tokens_per_microbatch`` padded tokens, gradients accumulating (gspo.train.microbatch);
``dtype="bf16"`` computes in bf16 over fp32 parameters (CausalLMLogprobs' compute_dtype).

Data parallel: every rank holds whole groups. The loss divides by the *global* number of
sequences in the minibatch, and is multiplied by the world size because DDP and FSDP
average gradients over ranks; the sum over ranks then equals one process on the whole batch
(``tests/test_train_distributed.py`` checks this to 1e-5).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from gspo.loss import gspo_loss, k3
from gspo.masking import masked_mean
from gspo.objectives import registry
from gspo.train import correction
from gspo.train import microbatch as mb
from gspo.train.config import BatchConfig, LossConfig, OptimConfig, SamplingConfig
from gspo.train.rollout import Rollout, eval_mode


@dataclass(frozen=True)
class Concerns:
    """The config concerns the update reads: ``objective`` (LossConfig), ``sampling``
    (SamplingConfig: the temperature and top-p the log-probs are taken at), ``optim``
    (OptimConfig: minibatches, micro-batches, clipping, shared prefix) and ``batch``
    (BatchConfig: whether sequences may be kept out of the loss). Every ``config``
    parameter of this module takes one, or a TrainConfig, which has the same four
    attributes."""

    objective: LossConfig
    sampling: SamplingConfig
    optim: OptimConfig
    batch: BatchConfig

    @classmethod
    def of(cls, config) -> Concerns:
        """The four concerns of ``config`` (a TrainConfig, or Concerns)."""
        return cls(config.objective, config.sampling, config.optim, config.batch)


def response_logprobs(
    logprobs, rollout: Rollout, *, temperature: float, entropy: bool = False, top_p: float = 1.0,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """logp [B, T] of the response tokens (0 where masked), and the entropy [B, T] if asked.

    ``logprobs(input_ids, attention_mask)`` returns [B, L-1] with column t scoring token t+1,
    so the response (tokens P .. L-1) is columns P-1 .. L-2. Only those targets are scored
    (``target_mask``): the LM head never projects a prompt position. ``top_p`` < 1: under
    the nucleus the engines sample from (gspo.nucleus), so that trainer and sampler agree.
    ``shared_prefix``: the rows of a group run their prompt once (``prompt_len``,
    gspo.prefix).
    """
    start, target = _targets(rollout)
    out = logprobs(
        rollout.input_ids,
        rollout.attention_mask,
        temperature=temperature,
        return_entropy=entropy,
        target_mask=target,
        top_p=top_p,
        **({"prompt_len": rollout.prompt_len} if shared_prefix else {}),
    )
    logp, ent = out if entropy else (out, None)
    return logp[:, start:], (ent[:, start:] if ent is not None else None)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] per-sequence mean of k3 (gspo.loss.k3) with log r = ref_logp - logp: an estimate
    of KL(policy || reference) from the policy's own samples, >= 0."""
    return masked_mean(k3(torch.where(mask, ref_logp - logp, 0.0)), mask, dim=1)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak, then cosine decay to ``min_ratio`` x peak (per optimizer step)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def minibatch_loss(
    logprobs,
    batch: Rollout,
    *,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    config,
    world_size: int,
    num_sequences: int | None = None,
    keep: torch.Tensor | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate on this rank (already scaled for gradient averaging).

    ``num_sequences``: the divisor, the global sequence count of the whole minibatch when
    ``batch`` is one micro-batch of it; default ``len(batch) * world_size``. ``num_tokens``:
    CISPO's divisor, the minibatch's valid tokens over every micro-batch and rank
    (``global_tokens``); default this batch's alone.
    ``keep`` [b] bool: only these sequences are in the loss (gspo.train.sampling: tied
    groups, truncated completions); the others are indexed away after the forward, so their
    gradient is exactly 0, and ``num_sequences`` (``num_tokens``) then counts the kept ones.
    The forward still runs on every row, so that ranks and micro-batches keep their shapes.
    With no row kept the loss is an empty sum (0, zero gradient) and the metrics are NaN.
    """
    objective, sampling = config.objective, config.sampling
    mask = batch.response_mask
    if keep is not None:
        logp_old, mask, adv = logp_old[keep], mask[keep], adv[keep]
        ref_logp = None if ref_logp is None else ref_logp[keep]
    empty = keep is not None and not bool(keep.any())
    # the global count: every rank has equal slices
    num_sequences = num_sequences or len(batch) * world_size
    # CISPO averages over every token of the minibatch (MiniMax-M1's J_CISPO), the others
    # over its sequences
    divisor = ({"num_tokens": num_tokens or int(mask.sum())}
               if registry.get(objective.name).divisor == "tokens"
               else {"num_sequences": num_sequences})  # fmt: skip
    start, target = _targets(batch)

    def loss_fn(logp_all: torch.Tensor):  # [b, L-1] -> the loss of the kept response tokens
        logp = logp_all[:, start:]
        logp = logp if keep is None else logp[keep]
        if empty:
            metrics = dict.fromkeys(loss_metric_names(config), torch.tensor(math.nan))
            loss = logp.sum()  # 0, and a graph through every parameter (DDP reduces them all)
            metrics["loss"] = loss.detach()
            return loss * world_size, metrics
        loss, metrics = gspo_loss(logp, logp_old, mask, advantages=adv,
                                  **objective.gspo_loss_options(), **divisor)  # fmt: skip
        if ref_logp is not None and objective.kl_coef > 0:
            kl = k3_kl(logp, ref_logp, mask)
            loss = loss + objective.kl_coef * kl.sum() / num_sequences
            metrics["kl_ref"] = (kl.sum() / len(kl)).detach()
        metrics["loss"] = loss.detach()
        # DDP / FSDP divide the summed gradient by world_size; undo it so ranks *sum*.
        return loss * world_size, metrics

    shared = {"prompt_len": batch.prompt_len} if config.optim.shared_prefix else {}
    if config.optim.fused_loss:  # the loss inside the forward (CausalLMLogprobs' loss_fn)
        loss, metrics, full_logp, ent = logprobs(
            batch.input_ids, batch.attention_mask, temperature=sampling.temperature,
            return_entropy=True, target_mask=target, top_p=sampling.top_p, loss_fn=loss_fn,
            **shared,
        )  # fmt: skip
        full_logp, ent = full_logp[:, start:], ent[:, start:]
    else:
        full_logp, ent = response_logprobs(logprobs, batch, temperature=sampling.temperature,
                                           entropy=True, top_p=sampling.top_p,
                                           shared_prefix=config.optim.shared_prefix)  # fmt: skip
        pad = full_logp.new_zeros(len(batch), start)
        loss, metrics = loss_fn(torch.cat([pad, full_logp], dim=1))
    if not empty:
        metrics["entropy"] = masked_mean(ent if keep is None else ent[keep], mask).detach()
    metrics["logp"] = full_logp.detach()  # [b, T], for the mismatch when logp_old is the sampler's
    return loss, metrics


def _targets(rollout: Rollout) -> tuple[int, torch.Tensor]:
    """(P-1, target_mask [B, L-1]): the response tokens are columns P-1 .. L-2 of the
    log-prob module's output (column t scores token t+1)."""
    start = rollout.prompt_len - 1
    mask = rollout.response_mask
    return start, torch.cat([mask.new_zeros(mask.shape[0], start), mask], dim=1)


def update(
    logprobs,
    ref_logprobs,
    optimizer,
    scheduler,
    rollout: Rollout,
    adv: torch.Tensor,
    *,
    config,
    world_size: int = 1,
    keep: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """All minibatch steps for one rollout batch; returns one metrics dict per step.

    ``keep`` [B] bool: the sequences in the loss (gspo.train.sampling; None = all). With
    --dynamic-sampling or --mask-truncated each minibatch's loss is divided by the number of
    its sequences in the loss over all ranks (``kept_counts``), so the loss equals gspo_loss
    over the kept sequences alone; a minibatch with none anywhere makes no optimizer step.

    With ``--max-tokens-per-microbatch`` each forward (old log-probs, and each
    minibatch's forward + backward) runs on micro-batches of at most that many padded
    tokens, gradients accumulating to the whole-minibatch gradient (gspo.train.microbatch).

    ``config``: the Concerns it reads (``Concerns.of(train_config)``), or a TrainConfig.
    """
    config = Concerns.of(config)  # a TrainConfig's other concerns are none of the update's
    budget, optim = config.optim.max_tokens_per_microbatch, config.optim
    size = len(rollout) // optim.minibatches
    divisors = kept_counts(keep, config, size, world_size, len(rollout))
    start = time.perf_counter()
    with torch.no_grad():
        logp_old, mismatch, adv = old_logprobs(logprobs, rollout, adv, config, budget, world_size)
        ref_logp = None
        if ref_logprobs is not None:
            ref_logp = trainer_logprobs(ref_logprobs, rollout, config, budget, world_size)
    seconds_old = time.perf_counter() - start  # old (and reference) log-probs
    # The optimizer's own list: under FSDP2, module.parameters() can return the root group's
    # temporary unsharded tensors (after a forward), whose .grad is None, and clipping would
    # then silently skip the embeddings.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    for k in range(optim.minibatches):
        part = slice(k * size, (k + 1) * size)
        optimizer.zero_grad(set_to_none=True)
        if divisors is not None and divisors[k] == 0:
            # No sequence of this minibatch is in the loss on any rank: no step at all
            # (AdamW would still move the weights on its momentum); the schedule advances
            # (torch warns when that comes before any optimizer step: here it is meant).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                scheduler.step()
            # No loss and no gradient norm (NaN, not 0): the step's means are over the
            # minibatches that stepped (report.step_metrics); skipped_minibatch_frac says
            # what share did not.
            history.append({**dict.fromkeys(loss_metric_names(config), math.nan),
                            "loss": math.nan, "grad_norm": math.nan, **(mismatch or {}),
                            "time_old_logprobs": seconds_old, "skipped_minibatch_frac": 1.0})
            continue
        metrics = accumulate_gradients(
            logprobs,
            rollout.select(part),
            logp_old=logp_old[part],
            adv=adv[part],
            ref_logp=None if ref_logp is None else ref_logp[part],
            config=config,
            world_size=world_size,
            budget=budget,
            keep=None if divisors is None else _kept(keep, part, size, adv.device),
            num_sequences=None if divisors is None else divisors[k],
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        metrics["grad_norm"] = grad_norm.detach()
        if mismatch is None:  # --old-logprobs sampler: the first slice is still on-policy
            mask = rollout.response_mask[part]
            mismatch = correction.mismatch(metrics["logp"], logp_old[part], mask)
        del metrics["logp"]
        history.append({**to_host(metrics), **mismatch, "time_old_logprobs": seconds_old,
                        **({} if divisors is None else {"skipped_minibatch_frac": 0.0})})
    return history


def to_host(metrics: dict) -> dict[str, float]:
    """The metrics as floats, the tensors among them in one device-to-host transfer (one
    ``float()`` each would synchronise host and device once per metric)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    # FSDP2's grad norm is a DTensor: its full value (float() of it did the same)
    full = [getattr(metrics[k], "full_tensor", lambda k=k: metrics[k])() for k in keys]
    values = torch.stack([v.detach().reshape(()).double() for v in full]) if keys else []
    found = dict(zip(keys, values.tolist() if keys else [], strict=True))
    return {k: found[k] if k in found else float(v) for k, v in metrics.items()}


def trainer_logprobs(logprobs, rollout: Rollout, config, budget, world_size: int) -> torch.Tensor:
    """logp [B, T] under ``logprobs`` (no grad), one micro-batch of ``budget`` tokens at a time."""
    sampling, shared = config.sampling, config.optim.shared_prefix
    if not budget:
        return response_logprobs(logprobs, rollout, temperature=sampling.temperature,
                                 top_p=sampling.top_p, shared_prefix=shared)[0]  # fmt: skip
    pieces = []
    for part in mb.plan_everywhere(rollout, budget, world_size, shared=shared):
        piece, width = mb.trim(rollout.select(part))
        logp, _ = response_logprobs(logprobs, piece, temperature=sampling.temperature,
                                    top_p=sampling.top_p, shared_prefix=shared)  # fmt: skip
        pieces.append(mb.padded(logp, rollout.response_mask.shape[1]))
    return torch.cat(pieces)


def kept_counts(keep, config, size: int, world_size: int, rows: int) -> list[int] | None:
    """Per minibatch of ``size`` rows: its sequences in the loss over all ranks (None when
    the config keeps every sequence). Decided by the config, so that every rank joins the
    all-reduce even where its own ``keep`` is None."""
    if not (config.batch.dynamic_sampling or config.batch.mask_truncated):
        return None
    keep = torch.ones(rows, dtype=torch.bool) if keep is None else keep.cpu()
    counts = keep.view(-1, size).sum(dim=1).to(torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        counts = counts.to(device)
        dist.all_reduce(counts)
    return [int(c) for c in counts.tolist()]


def _kept(keep, part: slice, size: int, device) -> torch.Tensor:
    return torch.ones(size, dtype=torch.bool, device=device) if keep is None else keep[part]


def loss_metric_names(config) -> list[str]:
    """The names of minibatch_loss's metrics (less loss and logp), for a minibatch with no
    sequence in the loss, whose values are NaN."""
    one = torch.zeros(1, 1)
    _, metrics = gspo_loss(one, one, torch.ones(1, 1, dtype=torch.bool), advantages=torch.zeros(1),
                           **config.objective.gspo_loss_options())  # fmt: skip
    names = [*metrics, "entropy"]
    return names + (["kl_ref"] if config.objective.kl_coef > 0 else [])


def accumulate_gradients(
    logprobs, batch: Rollout, *, logp_old, adv, ref_logp, config, world_size: int, budget,
    keep: torch.Tensor | None = None, num_sequences: int | None = None,
) -> dict[str, torch.Tensor]:
    """Backward of one minibatch's loss, micro-batch by micro-batch; returns its metrics.
    ``keep`` [b] and ``num_sequences``: see minibatch_loss (the count is the minibatch's)."""
    shared = config.optim.shared_prefix
    parts = (mb.plan_everywhere(batch, budget, world_size, shared=shared) if budget
             else [slice(0, len(batch))])  # fmt: skip
    num_sequences = num_sequences or len(batch) * world_size
    kept_mask = batch.response_mask if keep is None else \
        torch.where(keep[:, None], batch.response_mask, False)  # fmt: skip
    num_tokens = global_tokens(kept_mask, world_size)
    pieces, logps = [], []
    for j, part in enumerate(parts):
        piece, width = mb.trim(batch.select(part)) if budget else (batch.select(part), None)
        cols = slice(0, width)
        mine = None if keep is None else keep[part]
        with mb.no_sync(logprobs, last=j == len(parts) - 1):
            loss, metrics = minibatch_loss(
                logprobs,
                piece,
                logp_old=logp_old[part, cols],
                adv=adv[part] if adv.dim() == 1 else adv[part, cols],  # [b] or [b, T] (token-tis)
                ref_logp=None if ref_logp is None else ref_logp[part, cols],
                config=config,
                world_size=world_size,
                num_sequences=num_sequences,
                keep=mine,
                num_tokens=num_tokens,
            )
            loss.backward()
        logps.append(mb.padded(metrics.pop("logp"), batch.response_mask.shape[1]))
        kept = piece.response_mask if mine is None else piece.response_mask[mine]
        pieces.append((metrics, len(kept), int(kept.sum())))
    # a piece with no sequence in the loss has NaN metrics and weighs nothing
    counted = [p for p in pieces if p[1] > 0] or pieces[:1]
    total_loss = sum(p[0]["loss"] for p in pieces)  # each is already over the whole divisor
    metrics = mb.merge_metrics(counted, registry.get(config.objective.name).token_metrics)
    metrics["loss"] = total_loss
    metrics["logp"] = torch.cat(logps)  # [b, T] for the sampler mismatch (update())
    if len(counted) > 1:  # these three are not means of their pieces: take them whole
        metrics.update(advantage_metrics(adv, batch.response_mask, keep))
    return metrics


def advantage_metrics(adv: torch.Tensor, mask: torch.Tensor,
                      keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """adv_mean, adv_std (population) and zero_adv_frac of a minibatch's kept sequences
    (``keep`` [b], None = all), as gspo_loss reports them: over sequences for advantages
    [b], over response tokens for per-token advantages [b, T] (token-tis), whose padded
    slots hold the unweighted advantage and may hold anything (``mask`` [b, T], True = a
    response token)."""
    if keep is not None:
        adv, mask = (adv[keep], mask) if adv.dim() == 1 else \
            (adv, torch.where(keep[:, None], mask, False))  # fmt: skip
    if adv.dim() == 1:
        return {"adv_mean": adv.mean(), "adv_std": adv.std(unbiased=False),
                "zero_adv_frac": (adv == 0).float().mean()}  # fmt: skip
    mean = masked_mean(adv, mask)
    return {"adv_mean": mean, "adv_std": masked_mean((adv - mean).square(), mask).sqrt(),
            "zero_adv_frac": masked_mean((adv == 0).to(adv.dtype), mask)}  # fmt: skip


def global_tokens(mask: torch.Tensor, world_size: int) -> int:
    """The valid tokens of ``mask`` [B, T] summed over data-parallel ranks."""
    count = mask.sum()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(count)
    return int(count)


def old_logprobs(
    logprobs, rollout: Rollout, adv: torch.Tensor, config, budget=None, world_size: int = 1
):
    """``logp_old`` [B, T] (the trainer's forward in eval mode, or the sampler's own), the
    sampler-vs-trainer mismatch metrics (None: measure them on the first minibatch), and
    the advantages weighted by ``--rollout-correction``."""
    objective, logp_sampler = config.objective, rollout.logp_sampler
    if objective.old_logprobs == "sampler":
        if logp_sampler is None:
            raise ValueError("--old-logprobs sampler: this engine returned no log-probs")
        return logp_sampler, None, adv
    with eval_mode(logprobs):  # dropout off: the sampler ran without it
        logp_old = trainer_logprobs(logprobs, rollout, config, budget, world_size)
    if logp_sampler is None:
        return logp_old, {}, adv
    mask = rollout.response_mask
    w, frac = correction.weights(objective.rollout_correction, logp_old, logp_sampler, mask,
                                 low=objective.correction_low, high=objective.correction_high,
                                 cap=objective.correction_cap)  # fmt: skip
    found = {**correction.mismatch(logp_old, logp_sampler, mask), "correction_frac": frac}
    return logp_old, found, correction.weigh(adv, w)
