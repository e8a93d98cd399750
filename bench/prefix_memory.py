"""How much memory does one shared-prefix forward + backward add: plain rows, the dense
[S, 1, N, N] block mask, or the maskless rows of gspo.prefix_attention?

A randomly initialised model of SmolLM2-135M's shape (``--model smollm2``, config only) or
gspo's tiny Qwen2 (``--model tiny``); one group of G rows, a P-token prompt and R-token
responses (random tokens); the log-prob forward and its backward in float32. Each case runs
in its own process; the figure is the peak resident memory added over the process's
resident set before the call (bench/common.py).

    .venv/bin/python bench/prefix_memory.py                     # the shapes below
    .venv/bin/python bench/prefix_memory.py --shapes 150,8,30   # P,G,R triples
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SHAPES = [(150, 8, 30), (150, 8, 100), (32, 4, 2048)]
CASES = {"plain": (None, "rows"), "dense mask": ("P", "dense"), "maskless rows": ("P", "rows")}


def build_model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gspo.train.tiny import tiny_model

    if name == "tiny":
        return tiny_model(layers=2, hidden=64)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def child(case: dict) -> dict:
    import torch

    import gspo.causal_lm
    from gspo.causal_lm import CausalLMLogprobs

    gspo.causal_lm.cheaper = lambda *args: True  # pack whenever asked: compare the paths
    model = build_model(case["model"])
    p, g, r = case["shape"]
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (g, p + r), generator=torch.Generator().manual_seed(0))
    ids[:, :p] = ids[0, :p].clone()
    mask = torch.ones_like(ids)
    prompt_len, attention = CASES[case["case"]]
    engine = CausalLMLogprobs(model, prefix_attention=attention)

    def step():
        out = engine(ids, mask, prompt_len=p if prompt_len else None)
        out.sum().backward()
        model.zero_grad(set_to_none=False)

    return common.measure(step, warmup=1, repeats=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES])
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        p, g, r = (int(x) for x in shape.split(","))
        for name in CASES:
            case = {"model": args.model, "shape": [p, g, r], "case": name}
            rows.append({"P": p, "G": g, "R": r, "case": name, **common.isolated(__file__, case)})
    common.print_table(rows, name="prefix memory", columns=[
        ("P", "P", "d"), ("G", "G", "d"), ("R", "R", "d"), ("case", "case", "s"),
        ("peak_added_mib", "peak MiB", ".0f"), ("median_s", "s", ".2f")])  # fmt: skip


if __name__ == "__main__":
    common.run(child, main)
