"""Data parallelism on PyTorch's own engines: DDP, or FSDP2 (``fully_shard``).

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) this joins the
process group (gloo on CPU, nccl on CUDA); launched plainly it is a world of one and every
helper is a no-op. Each rank gets a contiguous share of the step's prompts and samples
their G completions itself, so every group lives whole on one rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu or auto")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_choice: str) -> World:
    """Join the torchrun process group if there is one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=pick_device(device_choice))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                 device=device)  # fmt: skip


def shutdown(world: World, *, clean: bool = True) -> None:
    """Leave the process group. ``clean``: every rank reached this point, so they first meet
    at a barrier (on an error path a rank may be stuck in a collective, and a barrier would
    hang).

    Then a short wait with the GIL released, because gloo's worker threads free a finished
    collective (and its tensors, which takes the GIL) shortly *after* ``wait()`` returns. A
    rank whose interpreter began finalising meanwhile died with SIGABRT ("terminate called
    without an active exception"), which torchrun reports as a failed run
    (pytorch/pytorch#190489). Measured on 2 gloo ranks: 3 of 12 runs without the barrier,
    1 of 40 with it, 0 of 160 with the wait as well. ``os._exit`` would close the window
    for good but skips native destructors: vLLM's CPU shared-memory segments then outlive the
    run under a fixed name and the next run fails to create them."""
    if world.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        time.sleep(_EXIT_GRACE_S)


_EXIT_GRACE_S = 0.2


# ---------------------------------------------------------------- one rank fails, all stop


class PeerFailure(RuntimeError):
    """Another rank of the job failed first, and this one stopped with it, at once and
    without a checkpoint (saving one needs every rank): the last checkpoint is intact.

    ``failed_rank``: the rank that failed (None when it died without a word: killed by a
    signal or the out-of-memory killer); ``run_dir``: set by the loop once RUN_DIR is known.
    """

    def __init__(self, notice: str, failed_rank: int | None, run_dir=None) -> None:
        super().__init__(notice)
        self.failed_rank, self.run_dir = failed_rank, run_dir


_FAILED = "gspo/failed"  # the key of the first failure's notice in the job's store
_STORE_TIMEOUT = datetime.timedelta(seconds=5)


def _job_store(world: World):
    """A client of the job's key-value store (torch.distributed's TCPStore at MASTER_ADDR:
    MASTER_PORT, which torchrun's agent hosts, so it outlives a failed rank); None without
    one."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not world.distributed or not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=_STORE_TIMEOUT)
    except (RuntimeError, ValueError):  # the store went with its host
        return None


def announce_failure(world: World, err: BaseException) -> None:
    """Leave this rank's failure, in one line, in the job's store for the other ranks to
    print (the first failure's notice stays). Ctrl-C and exits are not failures."""
    if not isinstance(err, Exception) or isinstance(err, PeerFailure) or lost_peer(err):
        return
    store = _job_store(world)
    if store is None:
        return
    first = (str(err).strip().splitlines() or [""])[0][:400]
    notice = f"rank {world.rank} failed: {type(err).__name__}: {first}"
    with contextlib.suppress(RuntimeError):
        store.compare_set(_FAILED, "", notice)


def peer_failure(world: World) -> PeerFailure | None:
    """Another rank's announced failure, or None (none yet, or the store is gone)."""
    store = _job_store(world)
    if store is None:
        return None
    try:
        if not store.check([_FAILED]):
            return None
        notice = store.get(_FAILED).decode()
    except RuntimeError:
        return None
    rank = int(notice.split()[1]) if notice.startswith("rank ") else None
    return None if rank == world.rank else PeerFailure(notice, rank)


def lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo: its connection closed)."""
    if isinstance(err, dist.DistNetworkError | dist.DistBackendError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("closed by peer" in text
                                              or "reset by peer" in text)  # fmt: skip


def stopped_by_peer(world: World, err: BaseException) -> PeerFailure | None:
    """On a rank leaving training with ``err``: this rank's own failure is announced to the
    others (None is returned: raise ``err``); a failure that another rank's caused (its
    notice, or a collective that lost it) comes back as the PeerFailure to raise instead."""
    if not world.distributed:
        return None
    if isinstance(err, PeerFailure):
        peer = err
    elif lost_peer(err):
        peer = peer_failure(world) or PeerFailure(
            "another rank stopped without a message (killed by a signal or the out-of-memory "
            "killer?); torchrun's summary below names it and its exit code", None)  # fmt: skip
    else:
        announce_failure(world, err)
        return None
    # torchrun's SIGTERM to the surviving ranks carries the same news: let this rank finish
    # stopping and exit with its own code and message instead of being killed mid-way
    with contextlib.suppress(ValueError):  # not the main thread: nothing to change
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return peer


def shard(items: list, world: World) -> list:
    """This rank's contiguous share; the caller guarantees ``len(items) % world.size == 0``."""
    per = len(items) // world.size
    return items[world.rank * per : (world.rank + 1) * per]


def wrap(logprobs: torch.nn.Module, world: World, *, fsdp: bool) -> torch.nn.Module:
    """DDP around the log-prob module, or FSDP2 on each decoder layer and then the root.

    Under FSDP2 the root group holds the embeddings and the LM head, which the log-prob
    module uses outside the inner model's forward; sharding the *log-prob module* as root
    makes its forward gather them.
    """
    if not world.distributed and not fsdp:
        return logprobs
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: FSDP2 gathers bf16 copies of the fp32 shards for compute and reduce-scatters
        # the gradients in fp32 into the fp32 shards (master weights); no autocast needed.
        low = getattr(logprobs, "compute_dtype", None)
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
        if low is not None:
            logprobs.compute_dtype = None  # the parameters are already bf16 inside forward
        layers = decoder_layers(logprobs)
        if not layers:
            from gspo.train.config import TrainWarning

            warnings.warn("--fsdp: found no repeated decoder blocks (a ModuleList) in the "
                          "model; sharding it as one unit, which gathers every weight at "
                          "once", TrainWarning, stacklevel=2)  # fmt: skip
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        root = fully_shard(logprobs, mp_policy=policy)
        # The log-prob module returns a view; we never modify it in place, so FSDP's warning
        # about in-place ops on views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        # FSDP2 initialises lazily on the first *root* forward; generate() calls only the
        # inner model, so run one tiny root forward first (every rank, so collectives match).
        ids = torch.zeros(1, 2, dtype=torch.long, device=world.device)
        with torch.no_grad():
            root(ids, torch.ones_like(ids))
        # The root keeps its parameters gathered after a forward; while gathered, .parameters()
        # yields plain temporary tensors, and an optimizer built from those would never update
        # the real (sharded) embeddings. Reshard so callers see the DTensor parameters.
        root.reshard()
        from torch.distributed.tensor import DTensor

        if not all(isinstance(p, DTensor) for p in root.parameters()):
            raise RuntimeError("FSDP2: parameters are not sharded after reshard()")
        return root
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(logprobs, device_ids=ids)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the ModuleList of one repeated block type holding the most
    parameters (Llama / Qwen / Mistral ``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX
    ``gpt_neox.layers``, OPT ``model.decoder.layers``, ...; an MoE layer's experts list is
    inside a block, so it holds fewer). Empty if the model has none."""
    best, best_size = [], 0
    for sub in module.modules():
        if not isinstance(sub, torch.nn.ModuleList) or len(sub) == 0:
            continue
        if len({type(block) for block in sub}) != 1:
            continue
        size = sum(p.numel() for p in sub.parameters())
        if size > best_size:
            best, best_size = list(sub), size
    return best


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def all_mean(values: dict[str, float], world: World) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank has the same number of sequences)."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist(), strict=True)}


def all_extreme(value: float, world: World, *, largest: bool) -> float:
    """The max (or min) of a scalar over ranks."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return float(t.item())


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if it is True on any (so all ranks stop at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(obj, world: World):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The HF model's full (unsharded) weights on rank 0, None elsewhere."""
    state = {}
    for name, value in full_params(model):
        if world.main:
            state[name] = value.cpu().clone()
    return state if world.main else None


def full_params(model: torch.nn.Module):
    """Yield (name, full tensor) for each of the HF model's weights, one at a time.

    Under FSDP2 the parameters are DTensor shards; ``full_tensor()`` all-gathers one at a time
    (a collective, so every rank runs this loop in the same order), so at most one unsharded
    tensor beyond the shards exists at once.
    """
    from torch.distributed.tensor import DTensor

    seen = set()
    for name, value in model.state_dict().items():
        # Tied weights (embeddings = LM head) appear under two names; keep the first, as
        # save_pretrained does, so the file has the layout from_pretrained expects.
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.numel() and local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield name, value.detach()


def all_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def save_optimizer(engine: torch.nn.Module, optimizer, directory, world: World) -> None:
    """Every rank writes its part of the optimizer state with ``torch.distributed.checkpoint``
    (DCP), keyed by parameter name: under FSDP2 each rank its shards, under DDP rank 0 once
    (DCP de-duplicates replicated tensors). Any number of ranks, with DDP, FSDP2 or one
    process, can load it back (``load_optimizer``): DCP reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_fsdp(engine):
        engine.reshard()  # name -> parameter must map to the sharded parameters
    state = get_optimizer_state_dict(engine, optimizer)
    with _single_process_quiet():
        dcp.save({"optimizer": state}, checkpoint_id=str(directory),
                 no_dist=not world.distributed)  # fmt: skip


def load_optimizer(engine: torch.nn.Module, optimizer, directory, world: World) -> None:
    """Read an optimizer state saved by ``save_optimizer`` on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if is_fsdp(engine):
        engine.reshard()
    # The state to load into: initialised by a zero-lr step with zero gradients (DCP's own
    # helper), so every tensor has the shape and placement this world needs.
    state = get_optimizer_state_dict(engine, optimizer)
    with _single_process_quiet():
        dcp.load({"optimizer": state}, checkpoint_id=str(directory),
                 no_dist=not world.distributed)  # fmt: skip
    set_optimizer_state_dict(engine, optimizer, state)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' when there is no process group: that
    is what no_dist=True asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def gathered(engine: torch.nn.Module):
    """Full root parameters (embeddings, LM head) for generate() under FSDP2.

    ``generate`` calls the inner model, not the root's forward, so the root's hooks never
    gather its parameters; ``unshard()`` does, ``reshard()`` frees them again. The decoder
    layers gather themselves on each forward (their own FSDP hooks), which is why every rank
    must run the same number of forwards (``generate(synced_gpus=True)``).
    """
    if not is_fsdp(engine):
        yield
        return
    engine.unshard()
    try:
        yield
    finally:
        engine.reshard()


def subgroup(world: World, size: int):
    """The gloo process group of this rank's block of ``size`` consecutive ranks (a
    tensor-parallel sampler), None when ``size`` is 1. A collective: ``new_group`` must be
    called by every rank for every block, in the same order."""
    if size == 1 or not world.distributed:
        return None
    mine = None
    for start in range(0, world.size, size):
        group = dist.new_group(list(range(start, start + size)), backend="gloo")
        if start <= world.rank < start + size:
            mine = group
    return mine


def gather_in_group(items: list, group) -> tuple[list, int]:
    """(the items of every rank of ``group`` in rank order, where this rank's start), for a
    sampler shared by the group; ``(items, 0)`` without a group. Python objects over gloo,
    so prompts of any length or kind."""
    if group is None:
        return items, 0
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    mine = dist.get_rank(group)
    return [x for part in parts for x in part], sum(len(p) for p in parts[:mine])


def all_gather_floats(values: list[float], world: World) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), in rank order."""
    if not world.distributed:
        return [values]
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]
