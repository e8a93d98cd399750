"""What does one training step of a Qwen3-0.6B-shaped model reach on this GPU?

A randomly initialised model of Qwen3-0.6B's shape (its config written out below: nothing is
downloaded), bf16 compute over fp32 master weights (``--dtype bf16``), a rollout batch of
random tokens: ``--prompts`` groups of ``--group-size`` rows, each a ``--prompt``-token
prompt and a ``--response``-token response, in micro-batches of at most
``--microbatch-tokens`` (16K, as prime-rl reports its Qwen3-0.6B figure with). Each case
times ``gspo.train.update.update``: the trainer's old log-probs (one no-grad forward) plus
one update (forward, backward, AdamW), with ``--shared-prefix`` and ``--fused-loss`` on and
off; then HF ``generate`` produces the same batch's responses (the rollout).

Reported per case: seconds, tokens/s (the batch's real tokens, prompts counted once per
row as a user counts them, over the whole old-log-probs + update time), MFU = model FLOPs /
time / the device's peak, and peak memory (``torch.cuda.max_memory_allocated``; on CPU the
process's peak resident set). Model FLOPs (bench/step.py's ``model_flop``: what the
arithmetic needs, whatever a path spends): per real token 6 x the decoder's weights
(forward 2, backward 4), per query-key pair a token attends 12 H per layer (QK^T and PV,
forward and backward), and 6 H V per response token for the LM head; the old log-probs
forward adds a third of that (2 per weight, 4 H per pair, 2 H V). Prompts shared across a
group count once, as the shared-prefix path computes them; the no-sharing cases' MFU is
therefore the useful rate, not the rate their larger arithmetic runs at. Peak: the
device's dense bf16 tensor figure (``PEAK_TFLOPS``, or ``--peak-tflops``); on CPU a float32
matmul of the model's MLP shape timed in the same run.

    python bench/gpu.py                # on a GPU; runs from the source tree (under 5 minutes)
    python bench/gpu.py --tiny         # a tiny model on CPU: what CI runs (seconds)

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import common  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A6000": 154.8, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0, "4090": 165.2}  # fmt: skip
CASES = {"today": (False, False), "shared prefix": (True, False),
         "fused loss": (False, True), "both (default)": (True, True)}  # fmt: skip


def qwen3_06b_config(tiny: bool):
    """Qwen3-0.6B's shape (its config.json), or a tiny model of the same family."""
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=512,
                           tie_word_embeddings=True)  # fmt: skip
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip


def build_rollout(args, vocab: int, device):
    """``prompts x G`` rows: a shared random prompt per group, random responses (EOS-free:
    every response is ``--response`` tokens)."""
    from gspo.train.rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    rows, p, r = args.prompts * args.group_size, args.prompt, args.response
    ids = torch.randint(3, vocab, (rows, p + r), generator=gen)
    for g in range(args.prompts):
        ids[g * args.group_size : (g + 1) * args.group_size, :p] = ids[g * args.group_size, :p]
    mask = torch.ones_like(ids)
    response = torch.ones(rows, r, dtype=torch.bool)
    return Rollout(prompts=[{"prompt": ""}] * rows, input_ids=ids.to(device),
                   attention_mask=mask.to(device), response_mask=response.to(device),
                   prompt_len=p, completions=[""] * rows)  # fmt: skip


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return common.peak_rss_mib()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(args, device, config) -> float:
    """The device's peak (module docstring)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = [v for k, v in PEAK_TFLOPS.items() if k in name]
        if not found:
            raise SystemExit(f"--peak-tflops: unknown GPU {name!r}; give its dense bf16 peak")
        return found[0]
    a = torch.randn(2048, config.hidden_size)
    b = torch.randn(config.hidden_size, config.intermediate_size)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * 3 / (time.perf_counter() - start) / 1e12


def run_case(model, rollout, adv, args, shared: bool, fused: bool, device) -> dict:
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.config import TrainConfig
    from gspo.train.update import update

    config = TrainConfig(prompts_per_step=args.prompts, group_size=args.group_size,
                         minibatches=1, lr=1e-6, old_logprobs="trainer",
                         dtype="fp32" if args.fp32 else "bf16",
                         max_tokens_per_microbatch=args.microbatch_tokens,
                         shared_prefix=shared, fused_loss=fused)  # fmt: skip
    engine = CausalLMLogprobs(model, compute_dtype=None if args.fp32 else torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    times = []
    for _ in range(args.warmup + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        update(engine, None, optimizer, scheduler, rollout, adv, config=config)
        sync(device)
        times.append(time.perf_counter() - start)
    del optimizer
    return {"seconds": times[-1], "peak_mib": peak_memory_mib(device)}


def run_generate(model, rollout, args, device) -> dict:
    """HF generate of every row's response from its prompt (bf16 autocast as the policy)."""
    prompts = rollout.input_ids[:, : args.prompt]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32):
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             max_new_tokens=args.response, min_new_tokens=args.response,
                             pad_token_id=0)  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    new = (out.shape[1] - args.prompt) * out.shape[0]
    return {"seconds": seconds, "tokens_per_s": new / seconds, "peak_mib": peak_memory_mib(device)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (CI)")
    parser.add_argument("--prompts", type=int, default=4, help="groups in the rollout batch")
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--response", type=int, default=1536, help="response tokens")
    parser.add_argument("--microbatch-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per case")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak")
    parser.add_argument("--fp32", action="store_true", help="fp32 compute (CPU default)")
    parser.add_argument("--no-generate", action="store_true", help="skip the HF rollout")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompts, args.group_size, args.prompt, args.response = 2, 4, 16, 24
        args.microbatch_tokens, args.warmup, args.fp32 = 128, 0, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    from transformers import Qwen3ForCausalLM

    from gspo.advantages import advantages
    from step import model_flop

    config = qwen3_06b_config(args.tiny)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device).eval()
    rollout = build_rollout(args, config.vocab_size, device)
    rewards = torch.rand(len(rollout), generator=torch.Generator().manual_seed(1))
    adv = advantages(rewards, group_size=args.group_size).to(device)
    flop = model_flop(model, rollout) * 4 / 3  # + the old log-probs' forward
    peak = peak_tflops(args, device, config)
    tokens = int(rollout.attention_mask.sum())
    rows = []
    for name, (shared, fused) in CASES.items():
        found = run_case(model, rollout, adv, args, shared, fused, device)
        rows.append({"case": name, **found, "tokens_per_s": tokens / found["seconds"],
                     "mfu": flop / found["seconds"] / (peak * 1e12)})  # fmt: skip
    gen = None if args.no_generate else run_generate(model, rollout, args, device)
    report(rows, gen, device, args, flop, peak, tokens)
    return {"rows": rows, "generate": gen}


def report(rows, gen, device, args, flop, peak, tokens) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: {args.prompts} x {args.group_size} rows of "
          f"{args.prompt} + {args.response} tokens ({tokens} tokens), micro-batches of "
          f"{args.microbatch_tokens}; model FLOPs {flop / 1e9:.4g} G; peak {peak:.4g} TFLOP/s")
    print(f"{'case':<16} {'seconds':>8} {'tokens/s':>10} {'MFU':>6} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['case']:<16} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} "
              f"{r['mfu']:6.1%} {r['peak_mib']:9.0f}")
    if gen is not None:
        print(f"{'HF generate':<16} {gen['seconds']:8.2f} {gen['tokens_per_s']:10.0f} "
              f"{'':>6} {gen['peak_mib']:9.0f}   (new tokens/s)")
    print(json.dumps({"bench": "gpu", "device": name, "torch": torch.__version__,
                      "model_tflop": flop / 1e12, "peak_tflops": peak, "tokens": tokens,
                      "cases": rows, "generate": gen, "args": vars(args)}))  # fmt: skip


if __name__ == "__main__":
    main()
