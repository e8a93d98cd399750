"""Forward + backward of gspo_loss against the eager spec code, and the memory-bandwidth floor.

Run: python bench/loss.py [--repeats N]

For each B x T, in one process: the eager baseline of tests/eager_reference.py
(what peers write from the spec), gspo_loss on the padded batch (its fused
path), gspo_loss on the same sequences packed, and the floor: the bytes
that must move (read logp, logp_old, mask; read the mask and write the gradient
in the backward) divided by the copy bandwidth measured in this run. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))

from common import median_ms, print_table  # noqa: E402
from eager_reference import eager_gspo_loss  # noqa: E402
from gspo import gspo_loss  # noqa: E402

SIZES = [(64, 1024), (512, 4096)]
GROUP, EPS = 8, 0.2


def make_inputs(b: int, t: int):
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(b, t, generator=g)
    logp_old = logp + 0.02 * torch.randn(b, t, generator=g)
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    rewards = torch.rand(b, generator=g)
    return logp.requires_grad_(True), logp_old, mask, rewards


def fwd_bwd(loss_fn, logp):
    def step():
        logp.grad = None
        loss_fn().backward()

    return step


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), beyond any cache."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=15)
    return 2 * src.numel() * 4 / (ms / 1e3)


def measure(b: int, t: int, repeats: int, bandwidth: float) -> dict:
    """One row: eager spec code, gspo_loss padded and packed, and the floor, at B x T."""
    logp, logp_old, mask, rewards = make_inputs(b, t)
    packed, packed_old, lens = (
        logp.detach()[mask].requires_grad_(True),
        logp_old[mask],
        mask.sum(-1),
    )
    kw = dict(rewards=rewards, group_size=GROUP, eps_low=EPS)
    eager_ms = median_ms(
        fwd_bwd(lambda: eager_gspo_loss(logp, logp_old, mask, rewards, GROUP, EPS, EPS), logp),
        repeats=repeats,
    )
    ours_ms = median_ms(
        fwd_bwd(lambda: gspo_loss(logp, logp_old, mask, **kw)[0], logp), repeats=repeats
    )
    packed_ms = median_ms(
        fwd_bwd(lambda: gspo_loss(packed, packed_old, seq_lens=lens, **kw)[0], packed),
        repeats=repeats,
    )
    # forward reads logp, logp_old (4 B each) and mask (1 B); backward reads the
    # mask and writes the float32 gradient.
    floor_ms = (4 + 4 + 1 + 1 + 4) * b * t / bandwidth * 1e3
    return {
        "B x T": f"{b} x {t}",
        "eager spec (ms)": eager_ms,
        "gspo_loss (ms)": ours_ms,
        "speed-up": eager_ms / ours_ms,
        "gspo packed (ms)": packed_ms,
        "floor (ms)": floor_ms,
        "gspo / floor": ours_ms / floor_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per case")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = copy_bandwidth()
    rows = [measure(b, t, args.repeats, bandwidth) for b, t in SIZES]
    print(f"float32 forward+backward, median of {args.repeats}, {torch.get_num_threads()} threads, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}")  # fmt: skip
    print_table(rows, name="loss", extra={"copy_GBps": bandwidth / 1e9})


if __name__ == "__main__":
    main()
