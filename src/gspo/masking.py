"""Per-sequence sums, counts and broadcasts over padded or packed token layouts.

Two layouts hold the same B ragged sequences:

* padded: values [B, T] with ``mask [B, T]`` bool, True = a real token of the
  sequence, False = padding (or a prompt token) that must not count;
* packed: values [N] holding the sequences back to back, with ``seq_lens [B]``
  or ``cu_seqlens [B+1]`` (cumulative offsets, ``cu_seqlens[0] == 0``).

Masked slots may hold anything, +-inf and NaN included. Values are therefore
*selected* with ``torch.where`` before any arithmetic, never multiplied by the
mask: ``NaN * 0`` is NaN, and ``exp(inf) * 0`` is NaN in the backward too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The integer type whose bits a float's bits are ANDed with.
SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class Layout:
    """Where the valid tokens of B sequences sit in a padded [B,T] or packed [N] tensor.

    Attributes:
        mask: [B,T] bool (padded) or None (packed: every slot is a valid token).
        seq_lens: [B] int64 tokens per packed sequence, or None (padded).
        count: [B] number of valid tokens per sequence, in the compute dtype.
        bits: [B,T] buffer of the compute dtype whose bits are all ones on valid
            tokens and zero elsewhere (padded only; see ``mask_bits``). The fused
            GSPO path consumes it: its backward writes the gradient over it.
    """

    mask: Tensor | None
    seq_lens: Tensor | None
    count: Tensor
    bits: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.count.shape[0]

    def select(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """x with every invalid slot replaced by ``fill`` (garbage can never leak)."""
        return x if self.mask is None else torch.where(self.mask, x, fill)

    def seq_sum(self, x: Tensor) -> Tensor:
        """[B] sum of an already-selected per-token tensor over each sequence."""
        if self.mask is not None:
            return x.sum(dim=-1)
        # segment_reduce: a quarter of index_add_'s time on CPU, and its backward
        # is a broadcast rather than an index_select (profiled at 512 x 4096).
        return torch.segment_reduce(x, "sum", lengths=self.seq_lens)

    def seq_mean(self, x: Tensor) -> Tensor:
        """[B] mean of an already-selected per-token tensor over each sequence."""
        return self.seq_sum(x) / self.count

    def expand(self, per_seq: Tensor) -> Tensor:
        """Broadcast a [B] per-sequence tensor to the token layout ([B,1] or [N])."""
        if self.mask is not None:
            return per_seq[:, None]
        return torch.repeat_interleave(per_seq, self.seq_lens, dim=0, output_size=self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.numel() if self.mask is not None else self.count.sum().item())

    def token_mean(self, x: Tensor) -> Tensor:
        """Mean of an already-selected per-token tensor over every valid token of the batch."""
        return x.sum() / self.count.sum()

    def token_min(self, x: Tensor) -> Tensor:
        return self.select(x, torch.inf).min()

    def token_max(self, x: Tensor) -> Tensor:
        return self.select(x, -torch.inf).max()


def padded_layout(mask: Tensor, dtype: torch.dtype) -> Layout:
    """Layout of a padded batch; ``mask [B,T]`` bool, True = valid token."""
    bits = mask_bits(mask, dtype)
    # Counting from the bits (-1 per valid token) in their own integer type: summing
    # bools, or bytes into int32, makes a converted [B,T] copy first (profiled).
    ints = bits.view(SAME_WIDTH_INT[dtype])
    count = ints.sum(dim=-1, dtype=ints.dtype).neg_().to(dtype)
    return Layout(mask=mask, seq_lens=None, count=count, bits=bits)


def mask_bits(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A [B,T] ``dtype`` buffer whose bits are all ones on valid tokens, zero elsewhere.

    ANDed with a float's bits it keeps the float or makes it +0.0, whatever the
    float held, NaN and inf included (``gspo.fused.keep_valid_``).
    """
    buf = torch.empty(mask.shape, dtype=dtype, device=mask.device)
    buf.view(SAME_WIDTH_INT[dtype]).copy_(mask).neg_()  # True -> 1 -> -1: every bit set
    return buf


def packed_layout(seq_lens: Tensor, dtype: torch.dtype) -> Layout:
    """Layout of a packed batch; ``seq_lens [B]`` >= 1 tokens per sequence, back to back."""
    return Layout(mask=None, seq_lens=seq_lens, count=seq_lens.to(dtype))
