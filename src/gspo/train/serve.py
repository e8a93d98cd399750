"""`gspo serve`: a vLLM server that `gspo train --rollout vllm-server` can sample from and push
weights to (docs/scale-out.md).

A thin launcher of vLLM's own OpenAI-compatible server (``vllm serve``'s entry point): the
HTTP server and the engine are vLLM's. It only sets what the trainer needs, each unless
given:

* ``VLLM_SERVER_DEV_MODE=1``: vLLM's ``/collective_rpc`` and ``/reset_prefix_cache``
  endpoints, through which weights are pushed (they are development endpoints: anyone who
  reaches the port can call them, hence ``--host 127.0.0.1`` by default);
* ``--worker-extension-cls``: gspo.train.engines.server_worker.WorkerExtension (loads the
  pushed weights, reports the version and a checksum of the weights it holds);
* ``--enable-scale-out``: vLLM's ``/inference/v1/generate`` endpoint, token ids in, token
  ids and log-probs out (nothing decoded and encoded again);
* ``--weight-transfer-config {"backend": "gspo_gloo"}`` (``gspo_nccl`` on CUDA): the
  backend of vLLM's weight-transfer endpoints that ``--weight-push collective`` drives,
  registered by the worker extension (vLLM's own backends need CUDA; see
  gspo.train.engines.weight_transfer);
* ``--logprobs-mode processed_logprobs`` (log-probs after temperature and top-p, the
  distribution each token was drawn from), ``--generation-config vllm`` (the model's
  generation_config.json does not change the sampling), ``--dtype float32`` (the trainer's
  master weights: sampler and trainer then agree to float rounding), and on CPU
  ``--enforce-eager`` and a 1 GiB KV cache.

``--model`` is a Hugging Face directory, ``smollm2``, or ``tiny`` (the built-in model's
architecture, written to a temporary directory; its weights come from the trainer's first
push anyway). Every other argument goes to ``vllm serve`` as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

EXTENSION = "gspo.train.engines.server_worker.WorkerExtension"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gspo serve",
        description="Start vLLM's OpenAI-compatible server for gspo train --rollout "
        "vllm-server --vllm-servers http://HOST:PORT (weights pushed after every step). "
        "Arguments not listed here go to `vllm serve` unchanged (e.g. --tensor-parallel-size, "
        "--gpu-memory-utilization, --max-model-len).",
        epilog="Defaults set unless given: --host 127.0.0.1, --dtype float32, --logprobs-mode "
        "processed_logprobs, --generation-config vllm, --enable-scale-out, --worker-extension-cls "
        + EXTENSION
        + ", --weight-transfer-config '{\"backend\": \"gspo_gloo\"}' (gspo_nccl on CUDA)"
        + "; on CPU --enforce-eager and --kv-cache-memory-bytes 1 GiB. The server's "
        "development endpoints are on (VLLM_SERVER_DEV_MODE=1): expose it only to the trainer.",
    )  # fmt: skip
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a Hugging Face model directory, 'smollm2', or 'tiny'")  # fmt: skip
    parser.add_argument("--port", type=int, required=True, help="the server's TCP port")
    parser.add_argument("--tiny-layers", type=int, default=2, help="--model tiny: layers")
    parser.add_argument("--tiny-hidden", type=int, default=128, help="--model tiny: width")
    return parser


def vllm_arguments(model_dir: str, port: int, rest: Sequence[str], *, cuda: bool) -> list[str]:
    """``vllm serve``'s arguments: the user's ``rest``, then each default they did not give."""
    given = {a.split("=")[0] for a in rest if a.startswith("--")}
    defaults = {"--host": "127.0.0.1", "--dtype": "float32",
                "--logprobs-mode": "processed_logprobs", "--generation-config": "vllm",
                "--worker-extension-cls": EXTENSION,
                "--weight-transfer-config": json.dumps(
                    {"backend": "gspo_nccl" if cuda else "gspo_gloo"})}  # fmt: skip
    if not cuda:
        defaults["--kv-cache-memory-bytes"] = str(2**30)
    args = ["--model", model_dir, "--port", str(port), *rest]
    for flag, value in defaults.items():
        if flag not in given:
            args += [flag, value]
    if not cuda and "--enforce-eager" not in given:
        args.append("--enforce-eager")  # CPU: no compile time
    if "--enable-scale-out" not in given:
        args.append("--enable-scale-out")  # /inference/v1/generate: token ids in and out
    return args


def _model_dir(args, cleanup: list[str]) -> str:
    if args.model == "tiny":
        from gspo.train.tiny import tiny_model, tiny_tokenizer

        directory = tempfile.mkdtemp(prefix="gspo-serve-tiny-")
        cleanup.append(directory)
        tiny_model(layers=args.tiny_layers, hidden=args.tiny_hidden).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
        return directory
    from gspo.train import gguf

    path = gguf.resolve(args.model)
    if not os.path.isdir(path):
        raise ValueError(f"--model {args.model!r} is not a directory; give a Hugging Face "
                         "model directory, 'smollm2' or 'tiny'")  # fmt: skip
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    cleanup: list[str] = []
    try:
        model_dir = _model_dir(args, cleanup)
    except ValueError as err:
        print(f"gspo serve: error: {err}", file=sys.stderr)
        return 2
    import torch

    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # other jobs share the cores
    # vLLM's own OpenAI-compatible server entry point (what `python -m
    # vllm.entrypoints.openai.api_server` runs; `vllm serve`'s CLI wrapper looks up the
    # package named "vllm", which vllm-cpu's is not)
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    sys.argv = ["gspo serve", *vllm_arguments(model_dir, args.port, rest,
                                        cuda=torch.cuda.is_available())]  # fmt: skip
    try:
        vllm_main()
    finally:
        for directory in cleanup:
            shutil.rmtree(directory, ignore_errors=True)
    return 0
