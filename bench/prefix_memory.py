"""How much memory does one shared-prefix forward + backward add: plain rows, the dense
[S, 1, N, N] block mask, the maskless rows of gspo.prefix_attention, or "auto" (the
default: the one of the two with less estimated memory)?

A randomly initialised model of SmolLM2-135M's shape (``--model smollm2``, config only;
``--layers`` fewer than its 30 keeps long rows inside a shared machine's memory) or gspo's
tiny Qwen2 (``--model tiny``); one group of G rows, a P-token prompt and R-token responses
(random tokens); the log-prob forward and its backward. Each case runs in its own process;
the figure is the peak memory added over the process's memory before the call: resident
(VmHWM, bench/common.py) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA
(``--device cuda``, ``--dtype bf16`` for bf16 autocast over fp32 weights).

Per shape: each case's peak, auto's pick, auto's peak over the dense mask's and the rows',
and the estimate auto decides by (gspo.prefix_attention.extra_memory: rows minus dense)
next to the measured rows minus dense.

    .venv/bin/python bench/prefix_memory.py                        # the shapes below
    .venv/bin/python bench/prefix_memory.py --shapes 150,8,30      # P,G,R triples
    .venv/bin/python bench/prefix_memory.py --layers 6 --shapes 32,4,2048 --cases dense,rows,auto
    python bench/prefix_memory.py --device cuda --dtype bf16       # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT / "src"))

import common  # noqa: E402

SHAPES = [(150, 8, 30), (150, 8, 100), (150, 8, 200)]
CASES = {"plain": (None, "rows"), "dense": ("P", "dense"), "rows": ("P", "rows"),
         "auto": ("P", "auto")}  # fmt: skip
MIB = 2**20


def build_model(name: str, layers: int = 30):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gspo.train.tiny import tiny_model

    if name == "tiny":
        return tiny_model(layers=2, hidden=64)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def child(case: dict) -> dict:
    import torch

    import gspo.causal_lm
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.prefix import pack
    from gspo.prefix_attention import extra_memory

    gspo.causal_lm.cheaper = lambda *args: True  # pack whenever asked: compare the paths
    device = torch.device(case["device"])
    model = build_model(case["model"], case["layers"]).to(device)
    p, g, r = case["shape"]
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 1000), (g, p + r), generator=torch.Generator().manual_seed(0))
    ids[:, :p] = ids[0, :p].clone()
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    prompt_len, attention = CASES[case["case"]]
    low = torch.bfloat16 if case["dtype"] == "bf16" else None
    engine = CausalLMLogprobs(model, prefix_attention=attention, compute_dtype=low)

    def step():
        out = engine(ids, mask, prompt_len=p if prompt_len else None)
        out.sum().backward()
        model.zero_grad(set_to_none=False)

    if device.type == "cuda":
        model.zero_grad(set_to_none=False)  # the gradients' memory is in the baseline
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = common.timer(step, warmup=1, repeats=1)
        torch.cuda.synchronize(device)
        result["peak_added_mib"] = (torch.cuda.max_memory_allocated(device) - baseline) / MIB
    else:
        result = common.measure(step, warmup=1, repeats=1)
    packed = pack(ids, mask, p)
    estimate = extra_memory(model, tuple(packed.input_ids.shape), tuple(packed.rows.shape),
                            low or model.dtype)  # fmt: skip
    return {**result, "used": engine.attention_used,
            "estimate_mib": {k: v / MIB for k, v in estimate.items()}}  # fmt: skip


def summarise(p: int, g: int, r: int, found: dict) -> dict:
    """One table row per shape from its cases' results."""
    row = {"P": p, "G": g, "R": r}
    for name, result in found.items():
        if "error" in result:
            row["note"] = f"{name}: {result['error']}"
            continue
        row[name] = result["peak_added_mib"]
        row[f"{name}_s"] = result["median_s"]
        row["load"] = result.get("loadavg_1min")
        row["estimate_mib"] = result["estimate_mib"]
    if "auto" in row:
        row["picked"] = found["auto"]["used"]
        for other in ("dense", "rows"):
            if other in row:
                row[f"auto/{other}"] = row["auto"] / row[other]
    if "dense" in row and "rows" in row:
        row["measured rows-dense"] = row["rows"] - row["dense"]
        est = row["estimate_mib"]
        row["estimated rows-dense"] = est["rows"] - est["dense"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (smollm2)")
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated of " +
                        ", ".join(CASES))  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        parser.error(f"--cases: {sorted(unknown)} not in {list(CASES)}")
    rows = []
    for shape in args.shapes:
        p, g, r = (int(x) for x in shape.split(","))
        found = {}
        for name in cases:
            case = {"model": args.model, "layers": args.layers, "shape": [p, g, r], "case": name,
                    "device": args.device, "dtype": args.dtype}  # fmt: skip
            found[name] = common.isolated(__file__, case)
            print(f"{p},{g},{r} {name}: {found[name]}", file=sys.stderr, flush=True)  # as it goes
        rows.append(summarise(p, g, r, found))
    columns = [("P", "P", "d"), ("G", "G", "d"), ("R", "R", "d")]
    columns += [(c, c, ".0f") for c in cases]
    columns += [("picked", "auto ran", "s"), ("auto/dense", "auto/dense", ".2f"),
                ("auto/rows", "auto/rows", ".2f"),
                ("measured rows-dense", "rows-dense", ".0f"),
                ("estimated rows-dense", "estimated", ".0f"), ("load", "load", ".1f")]  # fmt: skip
    print(f"peak MiB added, {args.model} ({args.layers} layers), {args.device}, {args.dtype}")
    common.print_table(rows, name="prefix memory", columns=columns,
                       extra={"args": vars(args)})  # fmt: skip


if __name__ == "__main__":
    common.run(child, main)
