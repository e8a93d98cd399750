"""DPPO, VESPO, LUSPO, the off-policy sequence mask and MaxRL: gspo against each peer's own
code on identical inputs, in one command.

Run: .venv/bin/python bench/objectives_peers_2026.py --peer-python /tmp/peers-venv/bin/python

The peers, as they are called:
* verl (``verl/trainer/ppo/core_algos.py`` at the commit of a mirror fetched with the
  project's ``fetch`` tool, --verl-git): ``compute_policy_loss_dppo_tv`` / ``_dppo_kl``
  with ``agg_loss`` and ``verl_F.masked_sum`` / ``masked_mean`` from the same commit,
  loss_agg_mode "seq-mean-token-mean" (ours: the mean over sequences of token means);
* prime-rl (--prime-git): ``default_loss_fn`` (its DPPO-Binary-TV mask; kl_tau = 0,
  adv_tau = 1) per sample, and ``MaxRLAlgorithm.score_group`` (its advantage);
* TRL (installed in PYTHON, a separate venv; ``pip install trl`` with torch==2.13.0):
  ``GRPOTrainer._compute_loss`` with loss_type "vespo" (token level), "luspo" (sequence
  level) and "grpo" with ``off_policy_mask_threshold`` (DeepSeek-V3.2's mask), the model
  call replaced by returning the log-probs, one process.

verl's and prime-rl's functions are read from the mirrors' git objects (``git show``) and
only the named functions are executed, with torch and tiny stand-ins for the imports they
do not use (verl's config object, prime-rl's trace plumbing), so neither package nor its
dependencies is installed. Inputs: a padded float64 batch of B sequences in groups of 8,
ragged lengths, log-probs <= 0 with per-token log-ratios spread (sd 0.3 plus a shift per
sequence) so that every mask, weight and clip acts, one group of tied rewards. Prints a
table (max |loss diff|, max |grad diff| against gspo_loss) and one JSON line.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

B, T, GROUP = 64, 128, 8
VERL_GIT = "/work/.mirror/verl-project+verl/repo"
PRIME_GIT = "/work/.mirror/PrimeIntellect-ai+prime-rl/repo"


def make_inputs(fill: float = 0.0) -> dict:
    """logp [B,T] float64 (requires grad), logp_old, mask, adv [B]; padding holds ``fill``."""
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    shift = 0.4 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.2
    logp_old = (logp - shift - 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    logp_old = logp_old.clamp(max=-1e-6)  # log-probs: p <= 1
    lens = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    rewards = torch.rand(B, generator=g, dtype=torch.float64)
    rewards[:GROUP] = 0.5  # one tied group: A = 0 exactly
    r = rewards.view(-1, GROUP)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = ((r - r.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0)).view(-1)
    logp, logp_old = torch.where(mask, logp, fill), torch.where(mask, logp_old, fill)
    return dict(logp=logp.requires_grad_(True), logp_old=logp_old, mask=mask, adv=adv)


def ours(variant: str, **kwargs) -> tuple[float, torch.Tensor]:
    from gspo import gspo_loss

    x = make_inputs()
    loss, _ = gspo_loss(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"],
                        variant=variant, **kwargs)  # fmt: skip
    loss.backward()
    return loss.item(), x["logp"].grad


# ------------------------------------------------ peer source from the fetched mirrors


def load(git_dir: str, path: str, names: list[str], namespace: dict) -> dict:
    """Execute only the functions / classes ``names`` of ``path`` at the mirror's HEAD in
    ``namespace`` (decorators other than staticmethod dropped: registries, type checkers);
    returns the namespace, the commit under "__commit__"."""
    text = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    commit = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    tree = ast.parse(text)
    nodes = [n for n in tree.body if getattr(n, "name", None) in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise LookupError(f"{path} at {commit[:8]} has no {sorted(missing)}")
    for node in nodes:
        node.decorator_list = [d for d in node.decorator_list
                               if ast.unparse(d) == "staticmethod"]  # fmt: skip
    exec(compile(ast.Module(body=nodes, type_ignores=[]), f"{git_dir}:{path}", "exec"), namespace)
    namespace["__commit__"] = commit
    return namespace


class VerlConfig(SimpleNamespace):
    """What verl's DPPO losses read of an ActorConfig."""

    def get(self, key, default=None):
        return getattr(self, key, default)


def verl_dppo(divergence: str, delta: float, git_dir: str) -> tuple[float, torch.Tensor, str]:
    from typing import Any, Optional

    f = load(git_dir, "verl/utils/torch_functional.py", ["masked_sum", "masked_mean"],
             {"torch": torch})  # fmt: skip
    verl_f = SimpleNamespace(masked_sum=f["masked_sum"], masked_mean=f["masked_mean"])
    ns = load(git_dir, "verl/trainer/ppo/core_algos.py",
              ["agg_loss", f"compute_policy_loss_dppo_{divergence}"],
              {"torch": torch, "verl_F": verl_f, "Optional": Optional, "Any": Any,
               "ActorConfig": VerlConfig, "AlgoConfig": type("AlgoConfig", (), {})})  # fmt: skip
    config = VerlConfig(clip_ratio=delta, clip_ratio_low=None, clip_ratio_high=None,
                        global_batch_info={})  # fmt: skip
    x = make_inputs()
    adv = x["adv"][:, None].expand_as(x["logp"])
    loss, _ = ns[f"compute_policy_loss_dppo_{divergence}"](
        x["logp_old"], x["logp"], adv, x["mask"].to(torch.float64),
        loss_agg_mode="seq-mean-token-mean", config=config)  # fmt: skip
    loss.backward()
    return loss.item(), x["logp"].grad, ns["__commit__"]


def prime_dppo(delta: float, git_dir: str) -> tuple[float, torch.Tensor, str]:
    # its LossInputs / LossOutputs are plain records of the fields it reads and writes
    ns = load(git_dir, "src/prime_rl/trainer/rl/loss.py",
              ["_safe_mean", "compute_importance_ratio_and_mismatch_kl", "default_loss_fn"],
              {"torch": torch, "Tensor": torch.Tensor, "LossInputs": SimpleNamespace,
               "LossOutputs": SimpleNamespace, "DefaultLossConfig": object})  # fmt: skip
    config = SimpleNamespace(dppo_mask_low=delta, dppo_mask_high=delta, adv_tau=1.0, kl_tau=0.0)
    x = make_inputs()
    total = x["logp"].new_zeros(())
    for i in range(B):  # prime-rl's loss is per sample, a sum over its tokens
        m = x["mask"][i]
        inputs = ns["LossInputs"](trainer_logprobs=x["logp"][i][m],
                                  inference_logprobs=x["logp_old"][i][m], ref_logprobs=None,
                                  advantages=x["adv"][i].expand(int(m.sum())),
                                  loss_mask=torch.ones(int(m.sum()), dtype=torch.bool),
                                  loss_weights=None)  # fmt: skip
        # ours: the mean over tokens, then over sequences
        total = total + ns["default_loss_fn"](inputs, config).loss / (int(m.sum()) * B)
    total.backward()
    return total.item(), x["logp"].grad, ns["__commit__"]


def prime_maxrl(git_dir: str) -> tuple[float, str]:
    """max |A diff| of prime-rl's MaxRL advantage (float32 there) against ours (float64) on
    groups of 0/1 and graded rewards, a group with mean 0 and a tied one included."""
    from gspo.advantages import advantages

    got = {}
    stub_vf = SimpleNamespace(Episode=object)
    ns = load(git_dir, "src/prime_rl/orchestrator/algo/max_rl.py", ["MaxRLAlgorithm"],
              {"torch": torch, "vf": stub_vf, "Algorithm": object, "__name__": "max_rl",
               "iter_trainable_traces": lambda episodes: [(None, e) for e in episodes],
               "assign_advantages": lambda trace, a: got.__setitem__(id(trace), a)})  # fmt: skip
    g = torch.Generator().manual_seed(1)
    groups = [torch.randint(0, 2, (8,), generator=g).double() for _ in range(24)]
    groups += [torch.rand(8, generator=g, dtype=torch.float64) for _ in range(6)]
    groups += [torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64)]
    worst = 0.0
    for rewards in groups:
        traces = [SimpleNamespace(reward=float(r)) for r in rewards]
        asyncio.run(ns["MaxRLAlgorithm"].score_group(None, traces))
        theirs = torch.tensor([got[id(t)] for t in traces], dtype=torch.float64)
        mine = advantages(rewards, group_size=8, norm="maxrl")
        worst = max(worst, (theirs - mine).abs().max().item())
    return worst, ns["__commit__"]


# ----------------------------------------------------------------- TRL (child process)


def trl_loss(loss_type: str, level: str, x: dict, **args) -> torch.Tensor:
    """TRL's _compute_loss on an object holding only what it reads (one process)."""
    from collections import defaultdict

    from trl.trainer.grpo_trainer import GRPOTrainer as Trainer

    logp, maskf = x["logp"], x["mask"].to(torch.float64)
    b, t = logp.shape
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, importance_sampling_level=level,
        off_policy_mask_threshold=args.pop("off_policy_mask_threshold", None), beta=0.0,
        loss_type=loss_type, epsilon_low=args.pop("epsilon", 0.2),
        epsilon_high=args.get("epsilon", 0.2),
        args=SimpleNamespace(delta=None, steps_per_generation=1, vespo_k_pos=2.0,
                             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
        use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda v, reduction: v, gather=lambda v: v,
                                    num_processes=1),
        get_off_policy_mask=Trainer.get_off_policy_mask,
        get_gamma_weights=Trainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(b, t), None),
    )  # fmt: skip
    stub.epsilon_high = stub.epsilon_low
    ids = torch.zeros(b, t, dtype=torch.uint8)  # only concatenated, never read
    inputs = dict(prompt_ids=ids[:, :0], prompt_mask=ids[:, :0], completion_ids=ids,
                  completion_mask=maskf, advantages=x["adv"], old_per_token_logps=x["logp_old"],
                  num_items_in_batch=maskf.sum())  # fmt: skip
    return Trainer._compute_loss(stub, None, inputs)


TRL_CASES = {  # name -> (loss_type, importance level, TRL settings, gspo_loss keywords)
    "vespo": ("vespo", "token", {}, {"variant": "vespo"}),
    "luspo": ("luspo", "sequence", {"epsilon": 0.2},
              {"variant": "luspo", "eps_low": 0.2, "eps_high": 0.2}),
    "seq mask (grpo)": ("grpo", "token", {"off_policy_mask_threshold": 0.05},
                        {"variant": "grpo", "eps_low": 0.2, "eps_high": 0.2,
                         "seq_mask_delta": 0.05}),
}  # fmt: skip


def trl_child(case: dict) -> dict:
    torch.set_num_threads(1)
    loss_type, level, settings, _ = TRL_CASES[case["name"]]
    try:
        x = make_inputs()
        loss = trl_loss(loss_type, level, x, **dict(settings))
        loss.backward()
        with torch.no_grad():
            dirty = trl_loss(loss_type, level, make_inputs(fill=float("nan")), **dict(settings))
    except Exception as err:  # noqa: BLE001  (reported in the table, not hidden)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    torch.save({"loss": loss.item(), "grad": x["logp"].grad}, case["file"])
    from importlib.metadata import version

    return {"nan_padding_finite": bool(torch.isfinite(dirty)), "version": version("trl")}


# ----------------------------------------------------------------- report


def compare(row: dict, peer_loss, peer_grad, variant_kwargs: dict) -> dict:
    want_loss, want_grad = ours(**variant_kwargs)
    row.update({"gspo loss": want_loss, "|loss diff|": abs(peer_loss - want_loss),
                "max |grad diff|": (peer_grad - want_grad).abs().max().item()})  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="python of a venv with trl")
    parser.add_argument("--verl-git", default=VERL_GIT, help="git dir of a verl mirror")
    parser.add_argument("--prime-git", default=PRIME_GIT, help="git dir of a prime-rl mirror")
    args = parser.parse_args()
    start, rows, versions = time.perf_counter(), [], {}
    for div, delta in (("tv", 0.15), ("kl", 0.05)):
        loss, grad, commit = verl_dppo(div, delta, args.verl_git)
        versions["verl"] = commit[:12]
        rows.append(compare({"objective": f"dppo-{div}", "peer": "verl",
                             "called with": f"clip_ratio={delta}, seq-mean-token-mean"},
                            loss, grad, {"variant": f"dppo-{div}"}))  # fmt: skip
    loss, grad, commit = prime_dppo(0.15, args.prime_git)
    versions["prime-rl"] = commit[:12]
    rows.append(compare({"objective": "dppo-tv", "peer": "prime-rl",
                         "called with": "dppo_mask_low/high=0.15, kl_tau=0, per sample / T_i B"},
                        loss, grad, {"variant": "dppo-tv"}))  # fmt: skip
    worst, _ = prime_maxrl(args.prime_git)
    rows.append({"objective": "adv_norm=maxrl", "peer": "prime-rl",
                 "called with": "MaxRLAlgorithm.score_group, 32 groups of 8",
                 "max |adv diff|": worst})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, (loss_type, level, settings, kwargs) in TRL_CASES.items():
            print(f"running trl {name}", file=sys.stderr, flush=True)
            file = os.path.join(tmp, "trl.pt")
            result = common.isolated(__file__, {"name": name, "file": file},
                                     python=args.peer_python, timeout=600)  # fmt: skip
            row = {"objective": name, "peer": "trl",
                   "called with": f"loss_type={loss_type}, {level} level"
                   + "".join(f", {k}={v}" for k, v in settings.items())}  # fmt: skip
            if "error" in result:
                row["note"] = result["error"]
                rows.append(row)
                continue
            versions["trl"] = result["version"]
            got = torch.load(file)
            compare(row, got["loss"], got["grad"], kwargs)
            row["peer, NaN in padding"] = "finite" if result["nan_padding_finite"] else "NaN"
            rows.append(row)
    print(f"float64, B x T = {B} x {T}, groups of {GROUP}, torch {torch.__version__}; peers: "
          + ", ".join(f"{p} {v}" for p, v in sorted(versions.items())))  # fmt: skip
    columns = [("objective", "objective", ""), ("peer", "peer", ""),
               ("called with", "peer called with", ""), ("gspo loss", "gspo loss", ".6f"),
               ("|loss diff|", "|loss diff|", ".1e"), ("max |grad diff|", "max |grad diff|", ".1e"),
               ("max |adv diff|", "max |adv diff|", ".1e"),
               ("peer, NaN in padding", "peer, NaN in padding", "")]  # fmt: skip
    common.print_table(rows, name="objectives_peers_2026", columns=columns, json_line=False)
    for row in rows:
        if "note" in row:
            print(f"{row['peer']} {row['objective']}: could not run: {row['note']}")
    print(f"total runtime {time.perf_counter() - start:.0f} s")
    common.print_json("objectives_peers_2026", rows, {"versions": versions})


if __name__ == "__main__":
    common.run(trl_child, main)
