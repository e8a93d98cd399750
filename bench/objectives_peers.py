"""SAPO, CISPO and GMPO: gspo_loss against each peer's own code on identical inputs.

Run: .venv/bin/python bench/objectives_peers.py --peer-python /work/peers-venv/bin/python

One child process per peer case runs in PYTHON (a venv that holds trl, liger-kernel and
verl, so that their dependencies never enter ours), on the same inputs rebuilt from the
same seed: a padded float64 batch of B sequences in groups of 8 with ragged lengths,
per-token log-ratios spread (sd 0.3 plus a per-sequence shift) so that SAPO's gate, the
CISPO cap and GMPO's clip all act, one group of tied rewards, advantages by docs/spec.md
step 1. The child saves the peer's loss and gradient in logp; this process computes
gspo_loss(variant=...) on the same input and prints max |loss diff| and max |grad diff|.

Each peer is called with the settings that express our objective in its convention (the
"mapping" column; docs/objectives.md explains each), and, where a peer's own default or
convention differs, once more with the same numbers passed as-is ("as-is" rows): those
rows are meant to disagree and show by how much. A last column says whether the peer's
loss stays finite with NaN in padded slots (ours does, tests/test_objectives.py).

The peers, as they are called:
* TRL: ``GRPOTrainer._compute_loss`` (loss_type "sapo" / "cispo", importance sampling
  per token) and ``trl.experimental.gmpo.GMPOTrainer._compute_loss``, the model call
  replaced by returning the log-probs, one process, no accumulation;
* Liger-Kernel: ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` (the per-chunk loss of its
  fused linear GRPO loss) with loss_type "sapo" / "cispo", beta 0;
* verl: ``core_algos.compute_policy_loss_sapo`` / ``_cispo`` / ``_geo_mean`` (GMPO)
  with advantages as a [B,T] view, dp size 1.

Prints a table and one JSON line; about a minute on 2 cores (each child imports its peer).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

B, T, GROUP = 64, 128, 8
CAP = 0.28  # CISPO eps_high here: a cap of 1.28, which the spread of ratios reaches

# (objective, peer, gspo_loss keywords, the peer's settings, how ours maps to them)
CASES = [
    ("sapo", "trl", {}, {"tau_pos": 1.0, "tau_neg": 1.05}, "same parameters"),
    ("sapo", "liger", {}, {"tau_pos": 1.0, "tau_neg": 1.05}, "same parameters"),
    ("sapo", "verl", {}, {"tau_pos": 1.0, "tau_neg": 1.05}, "same parameters"),
    ("cispo", "trl", {"eps_high": CAP}, {"epsilon_high": 1 + CAP},
     "epsilon_high = 1 + eps_high (TRL's is the cap itself)"),
    ("cispo", "trl", {"eps_high": CAP}, {"epsilon_high": CAP}, "as-is: epsilon_high = eps_high"),
    ("cispo", "liger", {"eps_high": CAP}, {"epsilon_high": 1 + CAP},
     "epsilon_high = 1 + eps_high (Liger's is the cap itself)"),
    ("cispo", "verl", {"eps_high": CAP}, {"clip_ratio_high": CAP, "clip_ratio_low": 1.0},
     "clip_ratio_low = 1 (verl always floors at 1 - clip_ratio_low)"),
    ("cispo", "verl", {"eps_high": CAP}, {"clip_ratio_high": CAP, "clip_ratio_low": 0.2},
     "as-is: verl's default floor 1 - 0.2"),
    ("cispo", "verl", {"eps_high": CAP, "eps_low": 0.2},
     {"clip_ratio_high": CAP, "clip_ratio_low": 0.2}, "eps_low = clip_ratio_low = 0.2"),
    ("gmpo", "trl", {}, {"epsilon_low": 0.4, "epsilon_high": 0.4}, "same parameters"),
    ("gmpo", "verl", {}, {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
     "clip_ratio_low = clip_ratio_high = 0.4 (log space)"),
    ("gmpo", "verl", {}, {}, "as-is: verl's default clip range 0.2"),
]  # fmt: skip


def make_inputs(fill: float = 0.0) -> dict:
    """logp [B,T] float64 (requires grad), logp_old, mask, adv [B]; padding holds ``fill``."""
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    shift = 0.4 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.2
    logp_old = logp - shift - 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lens = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    rewards = torch.rand(B, generator=g, dtype=torch.float64)
    rewards[:GROUP] = 0.5  # one tied group: A = 0 exactly
    r = rewards.view(-1, GROUP)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = ((r - r.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0)).view(-1)
    logp, logp_old = torch.where(mask, logp, fill), torch.where(mask, logp_old, fill)
    return dict(logp=logp.requires_grad_(True), logp_old=logp_old, mask=mask, adv=adv)


def ours(objective: str, kwargs: dict) -> tuple[float, torch.Tensor]:
    from gspo import gspo_loss

    x = make_inputs()
    loss, _ = gspo_loss(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"],
                        variant=objective, **kwargs)  # fmt: skip
    loss.backward()
    return loss.item(), x["logp"].grad


# ----------------------------------------------------------------- peers (child process)


def peer_loss(objective: str, peer: str, settings: dict, x: dict) -> torch.Tensor:
    """The peer's loss (to minimise) on x, in the peer's own code."""
    logp, logp_old, adv = x["logp"], x["logp_old"], x["adv"]
    maskf = x["mask"].to(logp.dtype)  # peers take float masks
    if peer == "liger":
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

        extra = ({"sapo_temperature_pos": settings["tau_pos"],
                  "sapo_temperature_neg": settings["tau_neg"]} if objective == "sapo"
                 else {"epsilon_high": settings["epsilon_high"]})  # fmt: skip
        loss, _ = LigerFusedLinearGRPOFunction.ppo_loss_fn(
            logp, maskf, adv, maskf, old_per_token_logps=logp_old, beta=0.0,
            loss_type=objective, importance_sampling_level="token", **extra,
        )  # fmt: skip
        return loss
    if peer == "verl":
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig

        fn = {"sapo": core_algos.compute_policy_loss_sapo,
              "cispo": core_algos.compute_policy_loss_cispo,
              "gmpo": core_algos.compute_policy_loss_geo_mean}[objective]  # fmt: skip
        config = ActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=8,
                             **settings)  # fmt: skip
        loss, _ = fn(logp_old, logp, adv[:, None].expand_as(logp), maskf,
                     loss_agg_mode="token-mean", config=config)  # fmt: skip
        return loss
    if peer == "trl":
        return _trl_loss(objective, settings, logp, logp_old, maskf, adv)
    raise ValueError(f"peer: unknown {peer!r}")


def _trl_loss(objective, settings, logp, logp_old, maskf, adv):
    """TRL's _compute_loss on an object holding only what it reads (one process)."""
    from collections import defaultdict
    from types import SimpleNamespace

    if objective == "gmpo":
        from trl.experimental.gmpo.gmpo_trainer import GMPOTrainer as Trainer
    else:
        from trl.trainer.grpo_trainer import GRPOTrainer as Trainer
    b, t = logp.shape
    eps = {"epsilon_low": 0.2, "epsilon_high": 0.2}
    eps.update({k: v for k, v in settings.items() if k.startswith("epsilon")})
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, importance_sampling_level="token",
        off_policy_mask_threshold=None, beta=0.0, loss_type=objective, **eps,
        args=SimpleNamespace(delta=None, steps_per_generation=1,
                             sapo_temperature_pos=settings.get("tau_pos", 1.0),
                             sapo_temperature_neg=settings.get("tau_neg", 1.05)),
        use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x,
                                    num_processes=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(b, t), None),
    )  # fmt: skip
    ids = torch.zeros(b, t, dtype=torch.uint8)  # only concatenated, never read
    inputs = dict(prompt_ids=ids[:, :0], prompt_mask=ids[:, :0], completion_ids=ids,
                  completion_mask=maskf, advantages=adv, old_per_token_logps=logp_old,
                  num_items_in_batch=maskf.sum())  # fmt: skip
    return Trainer._compute_loss(stub, None, inputs)


def peer_child(case: dict) -> dict:
    torch.set_num_threads(1)
    objective, peer, settings = case["objective"], case["peer"], case["settings"]
    try:
        x = make_inputs()
        loss = peer_loss(objective, peer, settings, x)
        loss.backward()
        dirty = make_inputs(fill=float("nan"))
        with torch.no_grad():
            nan_ok = bool(torch.isfinite(peer_loss(objective, peer, settings, dirty)))
    except Exception as err:  # noqa: BLE001  (reported in the table, not hidden)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    torch.save({"loss": loss.item(), "grad": x["logp"].grad}, case["file"])
    return {"nan_padding_finite": nan_ok, "version": _version(peer)}


def _version(peer: str) -> str:
    from importlib.metadata import version

    return version({"liger": "liger-kernel", "trl": "trl", "verl": "verl"}[peer])


# ----------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True,
                        help="python of a venv with trl, liger-kernel and verl")  # fmt: skip
    args = parser.parse_args()
    start = time.perf_counter()
    rows, versions = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (objective, peer, kwargs, settings, mapping) in enumerate(CASES):
            print(f"running {peer} {objective} ({mapping})", file=sys.stderr, flush=True)
            file = os.path.join(tmp, f"{k}.pt")
            case = dict(objective=objective, peer=peer, settings=settings, file=file)
            result = common.isolated(__file__, case, python=args.peer_python, timeout=600)
            ours_kw = ", ".join(f"{a}={v}" for a, v in kwargs.items()) or "-"
            row = {"objective": objective, "peer": peer, "mapping": mapping,
                   "gspo_loss kwargs": ours_kw}  # fmt: skip
            if "error" in result:
                row["note"] = result["error"]
                rows.append(row)
                continue
            versions[peer] = result["version"]
            got = torch.load(file)
            want_loss, want_grad = ours(objective, kwargs)
            row["loss"] = want_loss
            row["max |loss diff|"] = abs(got["loss"] - want_loss)
            row["max |grad diff|"] = (got["grad"] - want_grad).abs().max().item()
            row["NaN pad finite"] = "yes" if result["nan_padding_finite"] else "no (NaN)"
            rows.append(row)
    print(f"float64, B x T = {B} x {T}, groups of {GROUP}, torch {torch.__version__}; peers: "
          + ", ".join(f"{p} {v}" for p, v in sorted(versions.items())))  # fmt: skip
    columns = [("objective", "objective", ""), ("peer", "peer", ""),
               ("gspo_loss kwargs", "gspo_loss kwargs", ""), ("mapping", "peer called with", ""),
               ("loss", "gspo loss", ".6f"), ("max |loss diff|", "|loss diff|", ".1e"),
               ("max |grad diff|", "max |grad diff|", ".1e"),
               ("NaN pad finite", "peer, NaN in padding", "")]  # fmt: skip
    common.print_table(rows, name="objectives_peers", columns=columns, json_line=False)
    for row in rows:
        if "note" in row:
            print(f"{row['peer']} {row['objective']}: could not run: {row['note']}")
    print(f"total runtime {time.perf_counter() - start:.0f} s")
    common.print_json("objectives_peers", rows, {"versions": versions})


if __name__ == "__main__":
    common.run(peer_child, main)
