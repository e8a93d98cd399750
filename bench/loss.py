"""Forward + backward of gspo_loss against the eager spec code and the peers' GSPO losses.

Run: .venv/bin/python bench/loss.py [--peer-python /work/peers-venv/bin/python]

For each B x T (ragged lengths T/2..T, groups of 8, float32), in this process:
the eager code a peer writes from the spec (tests/eager_reference.py: multiplies
by the mask, no validation, no metrics; it standardises the rewards itself, about
ten ops on [B]), ``gspo_loss`` padded with the same advantages precomputed (metrics without
the k3 KL: ``kl_metric=False``), ``gspo_loss`` with its default metrics (the k3
KL needs an ``expm1`` per token), and ``gspo_loss`` on the same sequences packed. The
last two columns time one masking of the [B,T] log-ratio alone: ``torch.where(mask, x,
0)``, which gspo_loss runs in its forward and again in its backward so that NaN or inf in
padding cannot reach the loss, against the eager code's ``x * mask`` (NaN * 0 is NaN).

With ``--peer-python PYTHON`` (an interpreter whose venv holds the peers, so that
their dependencies never enter ours) one child process per peer times, on the
same inputs (same seeds, same advantages, float32 masks prepared outside the
timed call):

* Liger-Kernel: ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` with
  ``importance_sampling_level="sequence"``, ``loss_type="grpo"``, ``beta=0``;
* TRL: ``GRPOTrainer._compute_loss`` with ``importance_sampling_level="sequence"``,
  ``loss_type="grpo"``, the model call replaced by returning the log-probs; it
  includes TRL's own metric logging (host syncs, an entropy mean);
* verl: ``core_algos.compute_policy_loss_gspo`` with ``seq-mean-token-mean``
  (the GSPO paper's aggregation), advantages as a [B,1] view expanded to [B,T].

Before a peer is timed its loss and gradient are saved, then compared with
gspo_loss's on the same input; the max abs differences are printed, and a peer
that disagrees by more than AGREE gets no time in the table. A peer that cannot
be imported is reported with the reason, never left out silently.

Then the torch.compile question (``--compile-sizes``): ``torch.compile(gspo_loss)``
in a fresh process per size, first call (compilation) and steady state.

Prints the table(s) and one JSON line. Runs in 2-3 minutes on 2 cores (131 s
measured with --peer-python and the compile table, under load).
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
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

SIZES = [(64, 1024), (64, 4096), (512, 1024), (512, 4096)]
GROUP, EPS = 8, 0.2
PEERS = ("liger", "trl", "verl")
AGREE = 1e-5  # float32: max abs diff of loss and gradient, relative to their scale


def make_inputs(b: int, t: int) -> dict:
    """The same tensors in every process: logp [B,T] (requires grad), logp_old, mask, adv [B].

    Per-sequence shifts of up to +-0.3 in the mean log-ratio put some sequences
    past the clip range (eps 0.2), so the agreement check covers clipping.
    Advantages are docs/spec.md step 1 in plain torch (population std, tied group -> 0).
    """
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(b, t, generator=g)
    shift = 0.6 * torch.rand(b, 1, generator=g) - 0.3
    logp_old = logp - shift + 0.02 * torch.randn(b, t, generator=g)
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    rewards = torch.rand(b, generator=g)
    r = rewards.view(-1, GROUP)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = ((r - r.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1.0)).view(-1)
    return dict(logp=logp.requires_grad_(True), logp_old=logp_old, mask=mask, rewards=rewards,
                adv=adv)  # fmt: skip


def time_ms(loss_fn, logp: torch.Tensor, repeats: int) -> float:
    """Median wall time of loss_fn().backward(), in ms (logp.grad cleared each call)."""

    def step():
        logp.grad = None
        loss_fn().backward()

    return common.median_ms(step, warmup=2, repeats=repeats)


# ----------------------------------------------------------------- ours


def measure_ours(b: int, t: int, repeats: int) -> dict:
    """Eager spec code and gspo_loss (padded, default metrics, packed) at B x T."""
    from eager_reference import eager_gspo_loss
    from gspo import gspo_loss

    x = make_inputs(b, t)
    logp, logp_old, mask, adv = x["logp"], x["logp_old"], x["mask"], x["adv"]
    packed = logp.detach()[mask].requires_grad_(True)
    packed_old, lens = logp_old[mask], mask.sum(-1)
    kw = dict(advantages=adv, eps_low=EPS)
    row = {
        "eager": time_ms(
            lambda: eager_gspo_loss(logp, logp_old, mask, x["rewards"], GROUP, EPS, EPS),
            logp, repeats),
        "gspo": time_ms(
            lambda: gspo_loss(logp, logp_old, mask, kl_metric=False, **kw)[0], logp, repeats),
        "gspo_kl": time_ms(lambda: gspo_loss(logp, logp_old, mask, **kw)[0], logp, repeats),
        "gspo_packed": time_ms(
            lambda: gspo_loss(packed, packed_old, seq_lens=lens, kl_metric=False, **kw)[0],
            packed, repeats),
    }  # fmt: skip
    # What ignoring garbage in padding costs: gspo_loss selects the valid tokens with
    # torch.where (once forward, once backward), the eager code multiplies by a float mask.
    diff, maskf = (logp - logp_old).detach(), mask.float()
    row["select_ms"] = common.median_ms(lambda: torch.where(mask, diff, 0.0), repeats=repeats)
    row["multiply_ms"] = common.median_ms(lambda: diff * maskf, repeats=repeats)
    return row


def gspo_reference(b: int, t: int) -> tuple[float, torch.Tensor]:
    """gspo_loss's value and gradient on the bench input, for the agreement check."""
    from gspo import gspo_loss

    x = make_inputs(b, t)
    loss, _ = gspo_loss(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"], eps_low=EPS)
    loss.backward()
    return loss.item(), x["logp"].grad


# ----------------------------------------------------------------- peers (child process)


def peer_loss_fn(peer: str, x: dict):
    """A zero-argument callable returning the peer's loss on x (imports the peer)."""
    logp, logp_old, adv = x["logp"], x["logp_old"], x["adv"]
    maskf = x["mask"].to(torch.float32)  # peers take float masks; made outside the timing
    if peer == "liger":
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

        def fn():
            loss, _ = LigerFusedLinearGRPOFunction.ppo_loss_fn(
                logp, maskf, adv, maskf, old_per_token_logps=logp_old, epsilon_low=EPS,
                epsilon_high=EPS, beta=0.0, loss_type="grpo",
                importance_sampling_level="sequence",
            )  # fmt: skip
            return loss

        return fn
    if peer == "trl":
        return _trl_loss_fn(logp, logp_old, maskf, adv)
    if peer == "verl":
        from verl.trainer.ppo.core_algos import compute_policy_loss_gspo
        from verl.workers.config import ActorConfig

        config = ActorConfig(strategy="fsdp", rollout_n=GROUP, clip_ratio=EPS,
                             ppo_micro_batch_size_per_gpu=GROUP)  # fmt: skip
        adv_tok = adv[:, None].expand_as(logp)  # verl takes [B,T] advantages; a view here

        def fn():
            loss, _ = compute_policy_loss_gspo(
                logp_old, logp, adv_tok, maskf, loss_agg_mode="seq-mean-token-mean", config=config
            )
            return loss

        return fn
    raise ValueError(f"peer: unknown {peer!r}")


def _trl_loss_fn(logp, logp_old, maskf, adv):
    """TRL's GRPOTrainer._compute_loss on an object holding only what it reads."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logp.shape
    entropies = torch.zeros(b, t)
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, importance_sampling_level="sequence",
        off_policy_mask_threshold=None, beta=0.0, loss_type="grpo", epsilon_low=EPS,
        epsilon_high=EPS, args=SimpleNamespace(delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x),
        # the model call: the log-probs are the input here
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropies, None),
    )  # fmt: skip
    ids = torch.zeros(b, t, dtype=torch.uint8)  # only concatenated, never read
    inputs = dict(prompt_ids=ids[:, :0], prompt_mask=ids[:, :0], completion_ids=ids,
                  completion_mask=maskf, advantages=adv, old_per_token_logps=logp_old)  # fmt: skip
    return lambda: GRPOTrainer._compute_loss(stub, None, inputs)


def peer_child(case: dict) -> dict:
    """In the peer interpreter: for each size, loss + gradient to a file, then the timing."""
    torch.set_num_threads(case["threads"])
    peer, out = case["peer"], {}
    try:
        peer_loss_fn(peer, make_inputs(8, 16))
    except Exception as err:  # noqa: BLE001  (reported in the table, not hidden)
        return {"error": f"cannot import or run {peer}: {type(err).__name__}: {err}"}
    for b, t in case["sizes"]:
        x = make_inputs(b, t)
        fn = peer_loss_fn(peer, x)
        loss = fn()
        loss.backward()
        path = os.path.join(case["dir"], f"{peer}-{b}x{t}.pt")
        torch.save({"loss": loss.item(), "grad": x["logp"].grad}, path)
        out[f"{b}x{t}"] = {"ms": time_ms(fn, x["logp"], case["repeats"]), "file": path}
    return {"sizes": out, "version": _version(peer)}


def _version(peer: str) -> str:
    from importlib.metadata import version

    return version({"liger": "liger-kernel", "trl": "trl", "verl": "verl"}[peer])


def run_peers(python: str, repeats: int, threads: int, rows: list[dict]) -> dict:
    """Time each peer in its own child process; check it against gspo_loss first."""
    notes = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [(r["B"], r["T"]) for r in rows]
        refs = {f"{b}x{t}": gspo_reference(b, t) for b, t in sizes}
        for peer in PEERS:
            case = dict(peer=peer, sizes=sizes, repeats=repeats, threads=threads, dir=tmp)
            print(f"running {peer} with {python}", file=sys.stderr, flush=True)
            result = common.isolated(__file__, case, python=python, timeout=600)
            if "error" in result:
                notes[peer] = result["error"]
                continue
            notes[peer] = f"{peer} {result['version']}"
            for row in rows:
                got = result["sizes"][f"{row['B']}x{row['T']}"]
                peer_out = torch.load(got["file"])
                ref_loss, ref_grad = refs[f"{row['B']}x{row['T']}"]
                row[f"{peer}_loss_diff"] = abs(peer_out["loss"] - ref_loss)
                row[f"{peer}_grad_diff"] = (peer_out["grad"] - ref_grad).abs().max().item()
                agrees = row[f"{peer}_loss_diff"] <= AGREE * max(1.0, abs(ref_loss)) and (
                    row[f"{peer}_grad_diff"] <= AGREE * ref_grad.abs().max().item()
                )
                if agrees:  # a time is shown only for a loss that computes ours
                    row[peer] = got["ms"]
                else:
                    notes[peer] += f"; DISAGREES at {row['B x T']}, time not shown"
    return notes


# ----------------------------------------------------------------- torch.compile


def compile_child(case: dict) -> dict:
    """torch.compile(gspo_loss): first call (compiles forward and backward) and steady state."""
    torch.set_num_threads(case["threads"])
    from gspo import gspo_loss

    x = make_inputs(case["B"], case["T"])
    compiled = torch.compile(gspo_loss)
    start = time.perf_counter()
    compiled(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"], eps_low=EPS,
             kl_metric=False)[0].backward()  # fmt: skip
    first_s = time.perf_counter() - start
    fn = lambda: compiled(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"],  # noqa: E731
                          eps_low=EPS, kl_metric=False)[0]  # fmt: skip
    eager = lambda: gspo_loss(x["logp"], x["logp_old"], x["mask"], advantages=x["adv"],  # noqa: E731
                              eps_low=EPS, kl_metric=False)[0]  # fmt: skip
    return {"first_call_s": first_s, "compiled_ms": time_ms(fn, x["logp"], case["repeats"]),
            "eager_ms": time_ms(eager, x["logp"], case["repeats"])}  # fmt: skip


def run_compile(sizes, repeats: int, threads: int) -> list[dict]:
    rows = []
    for b, t in sizes:
        print(f"compiling gspo_loss at {b} x {t}", file=sys.stderr, flush=True)
        case = dict(compile=True, B=b, T=t, repeats=repeats, threads=threads)
        result = common.isolated(__file__, case, timeout=600)
        rows.append({"B x T": f"{b} x {t}", **result})
    return rows


# ----------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per case (median)")
    parser.add_argument("--peer-python", help="python of a venv with liger-kernel, trl, verl")
    parser.add_argument("--sizes", nargs="+", default=[f"{b}x{t}" for b, t in SIZES],
                        help="B x T cases, e.g. 64x1024")  # fmt: skip
    parser.add_argument("--compile-sizes", nargs="*", default=["64x1024", "512x4096"],
                        help="sizes for the torch.compile measurement (none: skip it)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core)")  # fmt: skip
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        b, t = (int(v) for v in size.split("x"))
        rows.append({"B x T": size.replace("x", " x "), "B": b, "T": t,
                     **measure_ours(b, t, args.repeats)})  # fmt: skip
    notes = run_peers(args.peer_python, args.repeats, threads, rows) if args.peer_python else {}
    for row in rows:
        peers = [row[p] for p in PEERS if p in row]
        row["gspo / eager"] = row["gspo"] / row["eager"]
        row["gspo / best peer"] = row["gspo"] / min(peers) if peers else None
    compile_rows = run_compile(
        [tuple(int(v) for v in s.split("x")) for s in args.compile_sizes], args.repeats, threads
    )
    print(f"float32 forward+backward, ms, median of {args.repeats}, {threads} threads, "
          f"torch {torch.__version__}, load average {load:.1f} at start")  # fmt: skip
    columns = [("B x T", "B x T", ""), ("eager", "eager spec", ".3f"),
               *[(p, p, ".3f") for p in PEERS if any(p in r for r in rows)],
               ("gspo", "gspo_loss", ".3f"), ("gspo_kl", "gspo + k3 KL", ".3f"),
               ("gspo_packed", "gspo packed", ".3f"), ("gspo / eager", "gspo/eager", ".2f"),
               ("gspo / best peer", "gspo/best peer", ".2f"),
               ("select_ms", "where(mask)", ".3f"), ("multiply_ms", "x * mask", ".3f")]  # fmt: skip
    common.print_table(rows, name="loss", columns=columns, json_line=False)
    for peer in PEERS:
        if peer not in notes:
            print(f"{peer}: not run (no --peer-python)")
        elif not any(f"{peer}_loss_diff" in r for r in rows):
            print(f"{peer}: {notes[peer]}")
        else:
            diffs = ", ".join(f"{r['B x T']}: loss {r[peer + '_loss_diff']:.1e}, "
                              f"grad {r[peer + '_grad_diff']:.1e}" for r in rows)  # fmt: skip
            print(f"{notes[peer]}: max abs diff from gspo_loss (tolerance {AGREE:g} of the "
                  f"scale) at {diffs}")  # fmt: skip
    if compile_rows:
        print("\ntorch.compile(gspo_loss), kl_metric=False, fresh process per size:")
        columns = [
            ("B x T", "B x T", ""),
            ("first_call_s", "first call s", ".1f"),
            ("compiled_ms", "compiled ms", ".3f"),
            ("eager_ms", "eager gspo ms", ".3f"),
        ]
        common.print_table(compile_rows, name="compile", json_line=False, columns=columns)
    print(f"total runtime {time.perf_counter() - start:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f} at end")  # fmt: skip
    common.print_json("loss", rows, {"peers": notes, "compile": compile_rows,
                                     "threads": threads, "load_start": load})  # fmt: skip


if __name__ == "__main__":
    _case = common.case_from_argv()
    if _case is None:
        main()
    elif _case.get("compile"):
        common.report(compile_child(_case))
    else:
        common.report(peer_child(_case))
