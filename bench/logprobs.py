"""Hidden states -> GSPO loss, forward + backward: full logits (naive) vs chunked.

Question: at Qwen2.5-0.5B's head (H = 896, V = 151936), how much peak memory
and time does the chunked path (gspo.chunked) cost against materialising the
[N,V] logits? Goals (issue 3): >= 8x less added peak memory than naive at the
largest N both can run, and at most 1.2x naive's time.

Each case runs in its own subprocess (bench/common.py); float32,
torch.set_num_threads(2). A step is: logp from hidden states, gspo_loss over
packed sequences of SEQ_LEN tokens (groups of 4), backward into hidden and the
output weight. Memory is the peak RSS added over the RSS after building the
inputs (hidden, weight, labels), so the 545 MB weight itself is not counted
but its gradient is (it is part of every method's cost).

Warm-up: one step on the first WARMUP_TOKENS tokens (thread pool, kernel
selection, allocator), then `--repeats` timed full-size steps; a full-size
warm-up would add minutes per case and touches nothing a small step does not.

Measured 2026-11-29 on a quiet machine (torch 2.13 CPU, 2 threads, load average
1.3-2.0 from the benchmark itself), --repeats 1, total runtime 397 s:

    N      method   C    fwd+bwd s  added peak MiB  time / naive  naive mem / this
    4096   naive    -         23.0            7156             -                 -
    4096   chunked  256       25.0             710          1.09              10.1
    4096   fused    512       17.3             859          0.75               8.3
    4096   liger    512       24.0            1196          1.05               6.0
    16384  naive    -    does not fit (~28.0 GiB)
    16384  chunked  256      101.1             750
    16384  fused    512       69.4             902
    16384  liger    512      100.8            1238

Fused (gspo_loss_from_hidden's default: gradients formed in the forward, 3 matmuls
instead of 4) meets the memory goal (8.3x) and is faster than naive (at 4096) and than
Liger (at both sizes). Naive does the same three [N,H] x [H,V] products; those alone
(``--methods matmuls``, now a default row) took 18.0 s at N = 4096 where fused took 17.4 s
beside them, so no exact method gets far under fused's 0.75x of naive on this CPU.

    .venv/bin/python bench/logprobs.py --liger-python /work/peers-venv/bin/python  # the table above
    .venv/bin/python bench/logprobs.py --n 256 --methods chunked fused --chunk-size 64 128

Chunk-size sweep (issue 11 item 3: each path's default chunk comes from it, see the
table beside DEFAULT_CHUNK_SIZE in gspo/chunked.py; 21 min of both cores):

    .venv/bin/python bench/logprobs.py --n 4096 16384 --methods chunked fused \
        --chunk-size 128 256 512 1024 2048

``--chunk-size`` applies to every chunked method (chunked, fused, liger); the
table ends with the fastest chunk per (N, method) and its added memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import common

H, V = 896, 151936
SEQ_LEN = 512
GROUP_SIZE = 4
WARMUP_TOKENS = 512
BYTES_F32 = 4
GIB = 1024**3


def build(n: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Scales like a trained head: hidden ~ unit per feature after the final norm,
    # weight ~ 0.02, so logits are O(1) and the softmax is not one-hot.
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    seq_lens = torch.tensor(_seq_lens(n))
    rewards = torch.rand(seq_lens.shape[0], generator=g)
    logp_old = -torch.rand(n, generator=g) * 12 - 5  # near log(1/V) ~ -11.9
    loss_kw = dict(seq_lens=seq_lens, rewards=rewards, group_size=_group(seq_lens.shape[0]))
    return dict(hidden=hidden, weight=weight, labels=labels, logp_old=logp_old, loss_kw=loss_kw)


def _seq_lens(n: int) -> list[int]:
    """Sequences of SEQ_LEN tokens, the last one shorter if SEQ_LEN does not divide n.

    n < SEQ_LEN gives one sequence of n tokens (``--n 256`` once crashed here).
    """
    full, rest = divmod(n, SEQ_LEN)
    return [SEQ_LEN] * full + ([rest] if rest else [])


def _group(num_seqs: int) -> int:
    return GROUP_SIZE if num_seqs % GROUP_SIZE == 0 else 1


def step(inputs: dict, method: str, chunk_size: int) -> float:
    if method == "liger":  # runs in Liger's venv, which need not hold gspo
        return _liger_step(inputs, chunk_size)
    from gspo.chunked import gspo_loss_from_hidden, token_logprobs
    from gspo.logprobs import naive_token_logprobs
    from gspo.loss import gspo_loss

    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    hidden.grad = weight.grad = None  # every step allocates its gradients afresh
    if method == "naive":
        logp = naive_token_logprobs(hidden, weight, labels)
        loss, _ = gspo_loss(logp, inputs["logp_old"], **inputs["loss_kw"])
    elif method == "chunked":
        logp = token_logprobs(hidden, weight, labels, chunk_size=chunk_size)
        loss, _ = gspo_loss(logp, inputs["logp_old"], **inputs["loss_kw"])
    elif method == "fused":
        loss, _ = gspo_loss_from_hidden(
            hidden,
            weight,
            labels,
            inputs["logp_old"],
            chunk_size=chunk_size,
            fused=True,
            **inputs["loss_kw"],
        )
    elif method == "matmuls":
        return _matmuls(hidden, weight, chunk_size)
    else:
        raise ValueError(f"method: unknown {method!r}")
    loss.backward()
    return float(loss)


def _matmuls(hidden, weight, block: int) -> float:
    """The floor of every exact method: only the three [N,H] x [H,V] products (logits,
    the hidden-state gradient, the weight gradient) in blocks of ``block`` rows, with
    no softmax, loss or accumulation."""
    import torch

    with torch.no_grad():
        for start in range(0, hidden.shape[0], block):
            h = hidden[start : start + block]
            logits = h @ weight.T
            logits @ weight, logits.T @ h  # noqa: B018 - their time is the measurement
    return 0.0


def _liger_step(inputs: dict, chunk_size: int) -> float:
    """Liger-Kernel's fused linear GRPO loss with sequence-level (GSPO) ratios, eager.

    Padded [B,T] view of the same packed sequences' first ``b * t`` tokens (t =
    the first sequence's length, b = how many whole sequences of t fit); its
    chunk_size counts sequences, so chunk_size // t of them per chunk.
    """
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    hidden.grad = weight.grad = None
    t = int(inputs["loss_kw"]["seq_lens"][0])
    b = hidden.shape[0] // t
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=False, use_ref_model=False, chunk_size=max(1, chunk_size // t),
        epsilon_low=3e-4, epsilon_high=3e-4, loss_type="grpo",
        importance_sampling_level="sequence",
    )  # fmt: skip
    out = loss_fn(
        hidden[: b * t].view(b, t, H), weight, labels[: b * t].view(b, t),
        torch.ones(b, t), inputs["loss_kw"]["rewards"][:b] - 0.5,
        old_per_token_logps=inputs["logp_old"][: b * t].view(b, t),
    )  # fmt: skip
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return float(loss)


def child(case: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    inputs = build(case["n"])
    # Warm-up on the first WARMUP_TOKENS tokens of the same inputs (same weight,
    # so no second 545 MB copy inflates the process's high-water mark).
    warm = min(WARMUP_TOKENS, case["n"])
    small = dict(inputs, hidden=inputs["hidden"][:warm].detach().requires_grad_())
    small.update(labels=inputs["labels"][:warm], logp_old=inputs["logp_old"][:warm])
    small["loss_kw"] = dict(inputs["loss_kw"], seq_lens=torch.tensor([warm]))
    small["loss_kw"].update(rewards=inputs["loss_kw"]["rewards"][:1], group_size=1)
    method, chunk = case["method"], case["chunk_size"]
    return common.measure(
        lambda: step(inputs, method, chunk),
        repeats=case["repeats"],
        warmup_fn=lambda: step(small, method, chunk),
    )


def naive_estimate_gib(n: int, per_token_mib: float | None) -> float:
    """Added peak of naive at n tokens: measured MiB per token if known, else 4 [N,V] copies."""
    if per_token_mib is not None:
        return n * per_token_mib / 1024
    return (4 * n * V * BYTES_F32 + V * H * BYTES_F32) / GIB


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return 24.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--methods", nargs="+", default=["naive", "chunked", "fused", "matmuls"],
                   help="naive, chunked, fused, matmuls (the three products alone: the floor)")
    p.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        help="chunk sizes to sweep, for chunked, fused and liger alike "
        "(default: chunked's DEFAULT_CHUNK_SIZE, fused/liger's --fused-chunk-size)",
    )
    p.add_argument(
        "--fused-chunk-size",
        type=int,
        default=None,
        help="chunk of the fused and Liger paths (default: gspo's DEFAULT_FUSED_CHUNK_SIZE)",
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--liger-python",
        help="interpreter of a separate venv with liger-kernel; adds a Liger column per N",
    )
    args = p.parse_args(argv)
    from gspo.chunked import DEFAULT_CHUNK_SIZE, DEFAULT_FUSED_CHUNK_SIZE

    args.fused_chunk_size = args.fused_chunk_size or DEFAULT_FUSED_CHUNK_SIZE

    start = time.perf_counter()
    methods = args.methods + (["liger"] if args.liger_python else [])
    per_method = {
        "naive": [None],
        "chunked": args.chunk_size or [DEFAULT_CHUNK_SIZE],
        "fused": args.chunk_size or [args.fused_chunk_size],
        "liger": args.chunk_size or [args.fused_chunk_size],
        "matmuls": [args.fused_chunk_size],
    }
    rows, per_token = [], None
    for n in sorted(args.n):
        for method in methods:
            python = args.liger_python if method == "liger" else None
            for chunk in per_method[method]:
                rows.append(run_case(n, method, chunk, args.repeats, per_token, python))
                if method == "naive" and "peak_added_mib" in rows[-1]:
                    per_token = rows[-1]["peak_added_mib"] / n
    add_ratios(rows)
    columns = [
        ("n", "N", ""),
        ("method", "method", ""),
        ("chunk_size", "C", ""),
        ("median_s", "fwd+bwd s", ".1f"),
        ("peak_added_mib", "added peak MiB", ".0f"),
        ("time_vs_naive", "time / naive", ".2f"),
        ("mem_vs_naive", "naive mem / this", ".1f"),
        ("loadavg_1min", "load avg", ".1f"),
    ]
    print(f"hidden -> GSPO loss, H={H}, V={V}, float32, 2 threads, median of {args.repeats}")
    common.print_table(rows, name="logprobs", columns=columns, json_line=False)
    best = fastest_chunks(rows)
    for (n, method), row in best.items():
        print(f"fastest at N={n}, {method}: C={row['chunk_size']} "
              f"({row['median_s']:.1f} s, +{row['peak_added_mib']:.0f} MiB)")  # fmt: skip
    print(f"total runtime {time.perf_counter() - start:.0f} s")
    common.print_json("logprobs", rows, {"fastest": [r for r in best.values()]})


def fastest_chunks(rows: list[dict]) -> dict:
    """(n, method) -> its fastest measured row, for methods run at more than one chunk."""
    best: dict = {}
    for r in rows:
        if r["method"] == "naive" or "median_s" not in r:
            continue
        key = (r["n"], r["method"])
        if key not in best or r["median_s"] < best[key]["median_s"]:
            best[key] = r
    swept = {(r["n"], r["method"]) for r in rows if sum(
        1 for q in rows if (q["n"], q["method"]) == (r["n"], r["method"])) > 1}  # fmt: skip
    return {k: v for k, v in best.items() if k in swept}


def run_case(n, method, chunk, repeats, per_token, python=None) -> dict:
    case = dict(n=n, method=method, chunk_size=chunk, repeats=repeats)
    if method == "naive":
        need = naive_estimate_gib(n, per_token)
        case["estimate_gib"] = round(need, 1)
        if need > 0.9 * mem_available_gib():
            return case | {"note": f"does not fit (~{need:.1f} GiB)"}
    print(f"running {case}", file=sys.stderr, flush=True)
    result = common.isolated(__file__, case, python=python)
    if "error" in result:
        return case | {"note": "failed", "error": result["error"]}
    return case | result


def add_ratios(rows: list[dict]) -> None:
    naive = {r["n"]: r for r in rows if r["method"] == "naive" and "median_s" in r}
    for r in rows:
        base = naive.get(r["n"])
        if base is None or "median_s" not in r or r["method"] == "naive":
            continue
        r["time_vs_naive"] = r["median_s"] / base["median_s"]
        r["mem_vs_naive"] = base["peak_added_mib"] / max(r["peak_added_mib"], 1.0)


if __name__ == "__main__":
    common.run(child, main)
