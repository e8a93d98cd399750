"""``--weight-push collective``: the policy's weights to ``gspo serve`` servers through vLLM's
own weight-transfer endpoints (``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update``) instead of files.

vLLM 0.32's built-in transfer backends (nccl, ipc, ...) all need CUDA, so the server's worker
extension registers two of its own (gspo.train.engines.server_worker): ``gspo_gloo`` (CPU: a
torch.distributed gloo group) and ``gspo_nccl`` (CUDA: the same group over NCCL). ``gspo
serve`` picks one by the device. This file is both ends' shared part plus the trainer's side.

One process group per server: rank 0 is the trainer's rank 0 (the only rank that pushes),
ranks 1.. the server's workers (one per tensor-parallel rank). The group is not the trainer's
torch.distributed world (nor the server's): it is made from its own TCPStore, at a free port
on the trainer's address that routes to the server, so servers on other machines work.

A push streams the weights in chunks of at most ``CHUNK_BYTES`` (one dtype each): for each
chunk one ``/update_weights`` request carries the names, dtypes and shapes, and one broadcast
the values, flattened; the server loads them into vLLM's layerwise reload, as the file push
does. A tied tensor crosses once and is loaded under each of its names. The servers sum what
they received (float64 sum and sum of squares per name) and report it with the version, so
the trainer's after-push check is the same for both pushes (gspo.train.engines.vllm_server).
"""

from __future__ import annotations

import datetime
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK_BYTES = 256 * 2**20  # one broadcast's buffer: bounds the copy the push adds
TIMEOUT_S = 600.0  # one collective (a chunk)
RENDEZVOUS_S = 60.0  # a new group's members meeting


def process_group(backend: str, address: str, port: int, rank: int, world: int,
                  timeout_s: float = TIMEOUT_S):  # fmt: skip
    """A gloo or NCCL group of ``world`` processes outside torch.distributed's default one
    (the trainer's and the server's own worlds stay as they are); rank 0 hosts the store."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    # the rendezvous: a server that cannot reach the trainer's port fails the push in a
    # minute, not in a collective's ten
    store = dist.TCPStore(address, port, world, rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=min(RENDEZVOUS_S, timeout_s)))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, options)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def broadcast(group, tensor: torch.Tensor):
    """Rank 0's ``tensor`` into every member's; the pending work (``.wait()`` it)."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    return group.broadcast([tensor], options)


def sums(tensor: torch.Tensor) -> tuple[float, float]:
    x = tensor.detach().double()
    return float(x.sum()), float((x * x).sum())


def chunks(named: Iterable[tuple[str, torch.Tensor]], limit: int = CHUNK_BYTES
           ) -> Iterator[list[tuple[str, torch.Tensor]]]:  # fmt: skip
    """Consecutive runs of ``named`` of one dtype and at most ``limit`` bytes (a larger tensor
    alone), as they come: never more than one chunk held."""
    run, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if run and (size + nbytes > limit or tensor.dtype != run[0][1].dtype):
            yield run
            run, size = [], 0
        run.append((name, tensor))
        size += nbytes
    if run:
        yield run


def unflatten(flat: torch.Tensor, shapes: list[list[int]]) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


def local_address(url: str) -> str:
    """This machine's address on the route to ``url``'s host (what the server connects to)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as s:
        return s.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class CollectivePush:
    """The trainer's side (rank 0 only): a group per server, made at the first push to it and
    again after the server restarted; ``call(url, path, body)`` is the engine's HTTP call
    (raises OSError)."""

    def __init__(self, call: Callable, *, chunk_bytes: int | None = None):
        self.call, self.chunk_bytes = call, chunk_bytes or CHUNK_BYTES
        self.groups: dict[str, tuple[object, torch.device]] = {}  # url -> (group, device)
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="gspo-push")

    def connect(self, url: str) -> None:
        """A new group with ``url``'s workers (the old one, if any, is dropped: its server is
        gone or will not use it again)."""
        self.groups.pop(url, None)
        workers = self.call(url, "/get_world_size")["world_size"]
        # the server's backend (gspo serve: nccl on CUDA, gloo on CPU), which this side joins
        backend = self.call(url, "/collective_rpc", {"method": "gspo_version", "kwargs": {}}
                            )["results"][0].get("transfer")  # fmt: skip
        if backend not in ("gloo", "nccl"):
            raise RuntimeError(f"{url} has no gspo weight-transfer backend ({backend}): "
                               "start it with gspo serve, without --weight-transfer-config")
        address = local_address(url)
        port = free_port(address)
        init = {"master_address": address, "master_port": port, "world_size": 1 + workers,
                "timeout_s": TIMEOUT_S}  # fmt: skip
        answer = self.pool.submit(self.call, url, "/init_weight_transfer_engine",
                                  {"init_info": init})  # fmt: skip
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")  # fmt: skip
        self.groups[url] = (process_group(backend, address, port, 0, 1 + workers), device)
        answer.result()

    def push(self, urls: list[str], named: Iterable[tuple[str, torch.Tensor]],
             aliases: dict[str, list[str]], version: str) -> dict:  # fmt: skip
        """``named`` (aliases of a tied tensor left out: they travel as its ``aliases``) to
        every server in ``urls``; what was sent: ``tensors``, ``sum``, ``sum_squares`` (each
        alias counted, as the file push counts them)."""
        for url in urls:
            if url not in self.groups:
                self.connect(url)
        self._each(urls, lambda url: self.call(url, "/start_weight_update", {}))
        sent = {"tensors": 0, "sum": 0.0, "sum_squares": 0.0}
        skip = {alias for names in aliases.values() for alias in names}
        for run in chunks(((n, t) for n, t in named if n not in skip), self.chunk_bytes):
            self._send(urls, run, aliases, version, sent)
        self._each(urls, lambda url: self.call(url, "/finish_weight_update",
                                               {"weight_version": version}))  # fmt: skip
        return sent

    def _send(self, urls, run, aliases, version: str, sent: dict) -> None:
        tensors = [t.detach() for _, t in run]
        info = {"names": [n for n, _ in run], "shapes": [list(t.shape) for t in tensors],
                "dtype_names": [str(tensors[0].dtype).removeprefix("torch.")] * len(run),
                "aliases": {n: aliases[n] for n, _ in run if n in aliases},
                "version": version}  # fmt: skip
        flat = torch.cat([t.reshape(-1) for t in tensors])
        for name, tensor in run:
            total, squares = sums(tensor)
            copies = 1 + len(aliases.get(name, ()))
            sent["tensors"] += copies
            sent["sum"] += copies * total
            sent["sum_squares"] += copies * squares
        requests = [self.pool.submit(self.call, url, "/update_weights", {"update_info": info})
                    for url in urls]  # fmt: skip
        on = {}  # the chunk once per device (gloo: the CPU copy, NCCL: the GPU's)
        works = [broadcast(group, on.setdefault(device, flat.to(device)))
                 for group, device in (self.groups[url] for url in urls)]  # fmt: skip
        for request in requests:  # a server that refused the chunk: its error, not a hang
            request.result()
        for work in works:
            work.wait()

    def _each(self, urls, work) -> None:
        for future in [self.pool.submit(work, url) for url in urls]:
            future.result()

    def close(self) -> None:
        self.groups.clear()
        self.pool.shutdown(wait=False)
