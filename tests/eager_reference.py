"""A straightforward eager PyTorch GSPO loss, written from docs/spec.md the way peers write it.

It multiplies by the mask (so it needs clean padding) and does no validation.
Tests check that gspo_loss equals it on clean input; bench/loss.py times it as
the baseline.
"""

import torch


def eager_gspo_loss(logp, logp_old, mask, rewards, group_size, eps_low, eps_high):
    """logp, logp_old [B,T]; mask [B,T] bool; rewards [B] in contiguous groups of group_size."""
    m = mask.to(logp.dtype)
    r = rewards.view(-1, group_size)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = ((r - r.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0)).view(-1)
    log_ratio = ((logp - logp_old) * m).sum(dim=1) / m.sum(dim=1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.minimum(ratio * adv, clipped * adv).mean()
