"""What does running a warm-start batch's shared system prompt once buy?

The word-problem recipe's warm start (examples/smollm2-wordproblems.toml) trains on worked
episodes whose first ~220 tokens are the same for all: SmolLM2's system line and the
calculator's JSON schema (examples/chatml-tools.jinja), then a ~50-token question and ~80
tokens of replies and tool answers. With ``--shared-prefix`` (default on) each batch of
``warmstart.BATCH`` episodes runs that common prefix once (gspo.prefix, as a rollout group's
prompt); without it every episode runs it again.

Cases, in one process on the same batches from the same weights: ``plain``
(``--no-shared-prefix``), ``shared`` (the default; ``--prefix-attention auto`` picks the
dense block mask at this shape, by memory) and ``shared, rows`` (``--prefix-attention
rows``: no N x N mask): a batch's forward + backward
(warmstart._batch_loss then ``backward()``), no optimizer step. The table gives the decoder
tokens per batch, seconds per batch, the ratio plain / shared, the loss difference (the
same batch's loss both ways, float32) and the rate achieved in GFLOP/s of the arithmetic
the shared case needs (6 x decoder weights x its tokens) next to ``peak_gflops``, a
[tokens, H] x [H, I] float32 matmul of the model's MLP shape timed in the same run: what this
machine's cores reach.

    .venv/bin/python bench/warm_start.py                # SmolLM2, 3 batches each

Run 2026-12-06 on 2 idle cores (AMD EPYC, AVX2; load 2.0 = this run), --batches 2: plain
2816 decoder tokens and 39.5 s a batch (45.4 GFLOP/s), shared with the dense mask 1298 tokens
and 25.9 s (1.53x), shared with rows 23.4 s (1.69x; 35.4 GFLOP/s, 54% of the 66.1 GFLOP/s
matmul peak); losses equal to 3.6e-7 (float32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from step import peak_gflops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "smollm2-wordproblems.toml"


def encoded_batches(tokenizer, batches: int) -> list[list[tuple[list[int], list[bool]]]]:
    """The recipe's first ``batches`` x BATCH worked episodes, encoded as the warm start
    encodes them (its template, tools and end-of-turn token)."""
    from gspo.config import load_file
    from gspo.train import episodes, warmstart
    from gspo.train.config import TrainConfig
    from gspo.train.envs.select import tool_schemas

    config = TrainConfig(**load_file(str(RECIPE)))
    tokenizer.chat_template = (ROOT / config.policy.chat_template).read_text()
    turns = episodes.Turns(tokenizer, None, [tokenizer.eos_token_id],
                           tools=tool_schemas(config.data))  # fmt: skip
    end = warmstart.end_of_turn_id(turns, [tokenizer.eos_token_id])
    lines = (ROOT / config.warm.warm_start).read_text().splitlines()
    out = [warmstart.encode(json.loads(line)["messages"], turns, end)
           for line in lines[: batches * warmstart.BATCH]]  # fmt: skip
    return [out[i : i + warmstart.BATCH] for i in range(0, len(out), warmstart.BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per case")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gspo.causal_lm import CausalLMLogprobs
    from gspo.prefix import packed_lengths
    from gspo.train import warmstart
    from gspo.train.models import load

    model, tokenizer = load("smollm2")
    model.eval()
    batches = encoded_batches(tokenizer, args.batches + 1)  # the first is the warm-up
    engines = {a: CausalLMLogprobs(model, prefix_attention=a) for a in ("auto", "rows")}
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    pad = tokenizer.pad_token_id

    def step(batch, shared: bool, engine) -> float:
        model.zero_grad(set_to_none=True)
        loss, _ = warmstart._batch_loss(engine, batch, pad, torch.device("cpu"),
                                        shared_prefix=shared)  # fmt: skip
        loss.backward()
        return float(loss.detach())

    rows, losses = [], {}
    for name, shared, attention in (("plain", False, "auto"), ("shared", True, "auto"),
                                    ("shared, rows", True, "rows")):  # fmt: skip
        engine = engines[attention]
        step(batches[0], shared, engine)
        times, tokens = [], []
        for batch in batches[1:]:
            t = time.perf_counter()
            losses.setdefault(name, []).append(step(batch, shared, engine))
            times.append(time.perf_counter() - t)
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            prefix = warmstart.common_prefix([s for s, _ in batch])
            real = int(mask.sum())
            tokens.append(sum(packed_lengths(ids, mask, prefix)) if shared else real)
        rows.append({"case": name, "tokens_per_batch": sum(tokens) / len(tokens),
                     "s_per_batch": sum(times) / len(times),
                     "attention": engine.attention_used or "plain",
                     "gflops": 6.0 * decoder * sum(tokens) / sum(times) / 1e9})  # fmt: skip
    for row in rows[1:]:
        row["speedup"] = rows[0]["s_per_batch"] / row["s_per_batch"]
    diff = max(abs(a - b) for name in ("shared", "shared, rows")
               for a, b in zip(losses["plain"], losses[name], strict=True))  # fmt: skip
    shared = max(rows[1:], key=lambda row: row["speedup"])
    peak, _ = peak_gflops(model, tokens=int(shared["tokens_per_batch"]))
    common.print_table(rows, name="warm_start", columns=[
        ("case", "case", ""), ("attention", "forward", ""),
        ("tokens_per_batch", "decoder tokens / batch", ".0f"),
        ("s_per_batch", "s / batch (fwd+bwd)", ".2f"), ("speedup", "plain / shared", ".2f"),
        ("gflops", "GFLOP/s", ".1f")],
        extra={"max_abs_loss_diff": diff, "peak_gflops": peak,
               "loadavg_1min": os.getloadavg()[0]})  # fmt: skip
    print(f"loss plain vs shared: max |diff| {diff:.2e} (float32); peak matmul {peak:.1f} "
          f"GFLOP/s: the faster shared case ({shared['case']}) reaches "
          f"{shared['gflops'] / peak:.0%} of it")


if __name__ == "__main__":
    main()
