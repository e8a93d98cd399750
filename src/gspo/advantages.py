"""Group-standardised advantages for a batch of many groups (docs/spec.md step 1).

A batch of B sequences holds several groups (one per prompt). Groups are given
either as a contiguous ``group_size`` G (rows ``[k*G, (k+1)*G)`` form group k) or
as ``group_ids [B]`` (any integers, any order).

Normalisations (``norm``):
    "population"  (r - mean) / population std   -- the spec and the GSPO paper (default)
    "sample"      (r - mean) / sample std (n-1) -- TRL, verl, OpenRLHF (without their epsilon)
    "center"      r - mean                      -- Dr. GRPO style, no scaling
    "loo"         r - mean of the *other* rewards of the group (RLOO) = G/(G-1) (r - mean)
    "maxrl"       (r - mean) / mean  -- MaxRL (arXiv 2602.02710, prime-rl); 0 where mean <= 0

A group whose rewards are all equal gets exactly 0 under every normalisation.
Equality is decided on the rewards themselves, not on a computed std, because
``mean([0.1] * 3) != 0.1`` in floating point: a std of ~1e-17 would otherwise
turn rounding noise into advantages of +-1.
"""

from __future__ import annotations

import numbers
import sys
import types
from collections.abc import Sequence

import torch
from torch import Tensor

NORMS = ("population", "sample", "center", "loo", "maxrl")


def advantages(
    rewards: Tensor | Sequence[float],
    group_size: int | None = None,
    group_ids: Tensor | Sequence[int] | None = None,
    norm: str = "population",
) -> Tensor:
    """Advantages [B] standardised within each group.

    Args:
        rewards: [B] finite rewards (any real dtype), or a sequence of numbers
            (``torch.as_tensor``: float32 for Python floats, as ``torch.tensor`` gives).
        group_size: G, with B divisible by G; groups are contiguous rows.
        group_ids: [B] integer group labels (a tensor or a sequence of ints), instead
            of group_size.
        norm: one of "population" (default, the spec), "sample", "center", "loo", "maxrl".

    Returns:
        [B] float64 if rewards are float64, else float32.

    Example (one group, population std):
        >>> advantages(torch.tensor([0.9, 0.7]), group_size=2)
        tensor([ 1., -1.])
    """
    rewards = _check_rewards(as_tensor("rewards", rewards))
    inverse, num_groups = group_index(rewards.shape[0], group_size, group_ids, rewards.device)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    # float64 for the statistics: B is small, and it keeps float32 callers exact to ~1e-7.
    r = rewards.to(torch.float64)
    count = _group_sum(torch.ones_like(r), inverse, num_groups)
    mean = _group_sum(r, inverse, num_groups) / count
    centred = r - mean[inverse]
    if norm == "center":
        adv = centred
    elif norm == "loo":
        size = count[inverse]
        adv = torch.where(size > 1, centred * size / (size - 1).clamp(min=1), 0.0)
    elif norm == "maxrl":
        # MaxRL: the mean (the group's pass rate for 0/1 rewards) as the scale, so a prompt
        # solved with probability p weighs ~1/p; a group with mean <= 0 carries no signal
        scale = mean[inverse]
        adv = torch.where(scale > 0, centred / torch.where(scale > 0, scale, 1.0), 0.0)
    else:
        # Scale-free: divide by the group's largest deviation before squaring, so tiny
        # (1e-200) or huge (1e200) rewards neither underflow nor overflow.
        scale = _group_max(centred.abs(), inverse, num_groups)[inverse]
        dev = centred / torch.where(scale > 0, scale, 1.0)
        ddof = 1 if norm == "sample" else 0
        var = _group_sum(dev.square(), inverse, num_groups) / (count - ddof).clamp(min=1)
        std = var.sqrt()[inverse]
        adv = dev / torch.where(std > 0, std, 1.0)
    tied = _group_max(r, inverse, num_groups) == _group_min(r, inverse, num_groups)
    return torch.where(tied[inverse], 0.0, adv).to(out_dtype)


def group_index(
    batch: int,
    group_size: int | None,
    group_ids: Tensor | None,
    device: torch.device,
) -> tuple[Tensor, int]:
    """Map each of the B sequences to a group number in [0, num_groups).

    Returns:
        (inverse [B] int64, num_groups).
    """
    if (group_size is None) == (group_ids is None):
        raise ValueError(
            "give exactly one of group_size (contiguous groups) or group_ids [B]; "
            f"got group_size={group_size!r} and group_ids="
            f"{'None' if group_ids is None else 'a tensor'}"
            " (for a single group pass group_size=B)"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the batch of {batch} sequences"
            )
        return torch.arange(batch, device=device) // group_size, batch // group_size
    group_ids = as_tensor("group_ids", group_ids, device)
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape [B]=({batch},), got {tuple(group_ids.shape)}")
    if (
        group_ids.dtype.is_floating_point
        or group_ids.dtype.is_complex
        or group_ids.dtype == torch.bool
    ):
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device} but rewards are on {device}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def as_tensor(name: str, value, device: torch.device | None = None):
    """``value`` as a tensor if it is a sequence of numbers (or a NumPy array); tensors and
    None pass through. A TypeError names the first element that is not a number."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for i, item in enumerate(value):
            if not isinstance(item, numbers.Number):
                kind = type(item).__name__
                raise TypeError(f"{name}[{i}] is {item!r} ({kind}), not a number; {name} "
                                "must be a tensor or a sequence of numbers")  # fmt: skip
    elif not hasattr(value, "__array__"):
        kind = "a string" if isinstance(value, str | bytes) else type(value).__name__
        raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {kind}")
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name}: cannot make a tensor of it ({err})") from None


def _check_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape [B] with B >= 1, got {tuple(rewards.shape)}")
    if rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise ValueError(f"rewards must be real numbers, got {rewards.dtype}")
    rewards = rewards.detach()
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)  # integer rewards give float32 advantages
    bad = ~torch.isfinite(rewards)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"rewards[{i}] is {rewards[i].item()}; rewards must be finite")
    return rewards


def _group_sum(x: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return x.new_zeros(num_groups).index_add_(0, inverse, x)


def _group_max(x: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return x.new_full((num_groups,), -torch.inf).scatter_reduce_(0, inverse, x, "amax")


def _group_min(x: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return x.new_full((num_groups,), torch.inf).scatter_reduce_(0, inverse, x, "amin")


class _CallableModule(types.ModuleType):
    """``gspo.advantages`` names both this module and its function: importing the submodule
    makes it the package attribute, so the module calls the function (``gspo.advantages(r,
    group_size=G)`` works whichever was looked up first)."""

    def __call__(self, *args, **kwargs) -> Tensor:
        return advantages(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
