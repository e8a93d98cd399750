"""Rollouts from vLLM servers (``--rollout vllm-server --vllm-servers URL ...``): the trainer on
its own ranks, the samplers wherever ``gspo serve`` started them (docs/scale-out.md).

Requests: every sequence of a ``continue_ids`` call is one request to vLLM's
``/inference/v1/generate`` endpoint (token ids in; token ids and the log-prob of each sampled
token out, nothing decoded and encoded again), all in flight at once, spread over the
servers by their index in the step (rank-major). Each sampled request carries its own seed,
derived from the engine's seed (the run's, offset per rank) and the batch's seed (drawn from
the process's RNG, which checkpoints save, or the one the caller gives): a request draws the
same tokens on whichever server it lands, and a resumed run redraws what a straight one
drew. The servers compute in float32 by default (``gspo serve``) and return
``processed_logprobs`` (after temperature and top-p), as the in-process engine does.

Weights: after every optimizer step rank 0 pushes the policy's weights to every server, by
``--weight-push``: ``files`` (the default) writes safetensors files (one tensor per file, tied
aliases under each name; in /dev/shm, so the servers must be on this machine) and every
server reloads them in place through vLLM's ``/collective_rpc`` into the gspo worker
extension (gspo.train.engines.server_worker); ``collective`` sends them through vLLM's
weight-transfer endpoints over a process group per server (gspo.train.engines.weight_transfer:
gloo on CPU, NCCL on GPUs; servers anywhere the trainer can reach). Then each server drops its
prefix cache. Each server answers with the version it now holds and the number, sum and sum
of squares of the tensors it loaded, which must equal the trainer's. Before every request
batch each rank asks every server for its version. A server that restarted (it holds no
version) gets the last push again from rank 0 and is checked (the other ranks wait for it,
REFILL_S). A push that did not land, a server that holds another version, or one that does
not answer is a ``ServerError``: the next sampling call raises it inside the loop's guard,
which saves a checkpoint and exits 3 (a push is recorded, not raised, so that the checkpoint
holds the step's finished update). ``--resume`` pushes the checkpoint's weights to the
servers before it samples.

Under ``--fsdp`` (FSDP2) the weights are shards: every rank walks ``weights()`` in the same
order, so each tensor is gathered once (``full_tensor()``, a collective), and only rank 0 writes
or sends it. Every rank walks to the end even when rank 0's push fails partway (else the
others would wait in a gather rank 0 never joins). A server that restarted is not refilled
under ``--fsdp`` (the gathers would need every rank at once): ServerError, exit 3, and
``--resume`` pushes the weights to it.

Not yet: the NCCL push run on GPUs (written, never run: no GPU here), LoRA adapters pushed as
adapters (the merged weights are pushed).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from gspo.train import distributed as dd
from gspo.train.data import sequence_len
from gspo.train.engines.vllm import request_seed, tied_aliases, weight_files
from gspo.train.engines.weight_transfer import CollectivePush
from gspo.train.rewards import RewardError
from gspo.train.rollout import Continuation, Rollout, eos_ids, sample_prompts, trim

TIMEOUT_S = 600.0  # one request (a prompt's G samples), or one server's weight reload
REFILL_S = 120.0  # how long a rank other than 0 waits for rank 0 to refill a restarted server
START = "start it with `gspo serve --model DIR --port P` (docs/scale-out.md)"


class ServerError(RewardError):
    """A rollout server failed, timed out, or holds other weights than the trainer pushed.
    Raised inside the loop's guard, like a reward error: checkpoint, then exit 3."""


def _call(url: str, path: str, body: dict | None = None, *, timeout: float = TIMEOUT_S):
    """POST ``body`` (GET without one) to ``url + path``; the JSON answer (None if empty).
    Raises OSError (URLError, HTTPError with the server's message, TimeoutError)."""
    request = urllib.request.Request(url + path, method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise OSError(f"HTTP {err.code} from {path}: {detail}") from None
    return json.loads(raw) if raw else None


def _rpc(url: str, method: str, **kwargs: str) -> list:
    """vLLM's ``/collective_rpc``: ``method`` of the gspo worker extension on every worker of
    the server; one answer per worker."""
    return _call(url, "/collective_rpc", {"method": method, "kwargs": kwargs})["results"]


def check_servers(urls: Sequence[str]) -> None:
    """Before the model loads: every server answers, was started by ``gspo serve`` (its
    worker extension and token endpoint), else ValueError naming the URL (exit 2)."""
    for url in urls:
        url = url.rstrip("/")
        try:
            _call(url, "/v1/models", timeout=10)
        except OSError as err:
            raise ValueError(f"--vllm-servers: {url} does not answer ({_reason(err)}); "
                             f"{START}") from None  # fmt: skip
        try:
            _rpc(url, "gspo_version")
            _call(url, "/inference/v1/generate", {"token_ids": [0], "sampling_params": {
                "max_tokens": 1, "detokenize": False}}, timeout=60)  # fmt: skip
        except OSError as err:
            raise ValueError(f"--vllm-servers: {url} is a vLLM server without what the "
                             f"trainer needs ({_reason(err)}); {START}") from None  # fmt: skip


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return " ".join(str(reason).split())[:300]


class ServerEngine:
    def __init__(self, urls: Sequence[str], model, tokenizer, sampling, *, seed: int,
                 world: dd.World, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 prompt_tokens: int | None = None):  # fmt: skip
        """``urls``: the servers; ``weights()``: the policy's current weights (Hugging Face
        names), pushed now, so the servers sample this run's policy whatever they loaded at
        start, and again to a server that restarted; ``seed``: this rank's (the run's, offset
        per rank)."""
        self.urls = [u.rstrip("/") for u in urls]
        self.tokenizer, self.sampling, self.seed, self.world = tokenizer, sampling, seed, world
        self.max_len = sequence_len(model, prompt_tokens, sampling.max_new_tokens)
        self.eos = eos_ids(model, tokenizer)
        self.aliases = tied_aliases(model)
        self.sharded = _sharded(model)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="gspo-server")
        for url, info in zip(self.urls, self._each(lambda u: _call(u, "/v1/models")),
                             strict=True):  # fmt: skip
            served = info["data"][0].get("max_model_len") or 0
            if served < self.max_len:
                raise ValueError(f"--vllm-servers: {url} holds sequences of {served} tokens, "
                                 f"this run needs {self.max_len} (longest prompt + "
                                 f"--max-new-tokens): restart it with --max-model-len "
                                 f"{self.max_len} or more")  # fmt: skip
        # this run's versions: another run's pushes to the same servers never match them
        self.run_id = dd.broadcast_object(uuid.uuid4().hex[:8], world)
        self.pushes, self.version, self.sync_error = 0, None, None
        self.weights, self.collective = weights, None
        if sampling.weight_push == "collective" and world.main:
            self.collective = CollectivePush(_call)
        self.load_weights(weights())
        if self.sync_error is not None:
            raise ValueError(f"--vllm-servers: the first weight push failed: {self.sync_error}")

    @classmethod
    def for_run(cls, sampling, policy, world, logprobs, *, seed: int,
                prompt_tokens: int | None = None) -> ServerEngine:  # fmt: skip
        return cls(sampling.vllm_servers, policy.hf_model, policy.tokenizer, sampling,
                   seed=seed + 7919 * world.rank, world=world, weights=policy.sampler_weights,
                   prompt_tokens=prompt_tokens)  # fmt: skip

    @classmethod
    def for_eval(cls, model, tokenizer, sampling, *, device, seed: int, batch_size: int,
                 prompt_tokens: int | None = None) -> ServerEngine:  # fmt: skip
        """`gspo eval`'s engine: the model's weights pushed to the servers first."""
        check_servers(sampling.vllm_servers)
        return cls(sampling.vllm_servers, model, tokenizer, sampling, seed=seed,
                   world=dd.World(), weights=lambda: model.state_dict().items(),
                   prompt_tokens=prompt_tokens)  # fmt: skip

    @classmethod
    def preflight(cls, sampling) -> None:
        check_servers(sampling.vllm_servers)

    # ---- sampling

    def sample(self, prompts: Sequence[dict], *, group_size: int, greedy: bool,
               seed: int | None = None) -> Rollout:  # fmt: skip
        return sample_prompts(self, self.tokenizer, prompts, group_size=group_size,
                              greedy=greedy, seed=seed, system_prompt=self.sampling.system_prompt,
                              eos=self.eos)  # fmt: skip

    def continue_ids(self, ids: Sequence[Sequence[int]], *, n: int = 1, greedy: bool,
                     seed: int | None = None) -> list[Continuation]:  # fmt: skip
        """``n`` continuations of each sequence (rows contiguous per sequence), one request
        per sequence. ``seed``: the batch's (None: drawn from the process's RNG). Raises
        ServerError (module docstring)."""
        self._check_versions()
        if seed is None and not greedy:
            seed = int(torch.randint(2**30, ()).item())  # the checkpointed RNG: resumable
        first = self.world.rank * len(ids)  # spread every rank's requests over the servers
        base = None if greedy else request_seed(self.seed, seed)
        jobs = [(self.urls[(first + i) % len(self.urls)], list(p),
                 self._params(p, greedy, None if greedy else base + i * n, n))
                for i, p in enumerate(ids)]  # fmt: skip
        answers = self._each(lambda job: self._generate(*job), jobs)
        found = []
        for (_, p, _), choices in zip(jobs, answers, strict=True):
            for choice in choices if not greedy else choices * n:
                logp = None if greedy else [c["logprob"] for c in choice["logprobs"]["content"]]
                found.append(trim(len(p), choice["token_ids"], logp, eos=self.eos,
                                  max_new_tokens=self.sampling.max_new_tokens,
                                  max_len=self.max_len))  # fmt: skip
        return found

    def _params(self, prompt, greedy: bool, seed: int | None, n: int) -> dict:
        c = self.sampling
        return {"n": 1 if greedy else n, "temperature": 0.0 if greedy else c.temperature,
                "top_p": 1.0 if greedy else c.top_p, "top_k": 0,
                # the engine's sequence length, whatever the server's --max-model-len
                "max_tokens": max(0, min(c.max_new_tokens, self.max_len - len(prompt))),
                "stop_token_ids": self.eos, "logprobs": None if greedy else 0,
                "detokenize": False, "seed": seed}  # fmt: skip

    def _generate(self, url: str, prompt: list[int], params: dict) -> list[dict]:
        if params["max_tokens"] == 0:  # no positions left: nothing to ask
            return [{"token_ids": [], "logprobs": {"content": []}}] * params["n"]
        try:
            answer = _call(url, "/inference/v1/generate",
                           {"token_ids": prompt, "sampling_params": params})  # fmt: skip
        except OSError as err:
            raise ServerError(f"rollout server {url} failed: {_reason(err)}") from None
        return sorted(answer["choices"], key=lambda c: c["index"])

    def more(self, live: bool) -> bool:
        return live  # every rank samples its own sequences

    # ---- weights

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The policy's weights to every server (rank 0 pushes; every rank walks ``named``,
        whose FSDP2 gathers are collectives), then the check; a failure is kept for the next
        ``continue_ids`` to raise (module docstring)."""
        self.pushes += 1
        version, error = f"{self.run_id}-{self.pushes}", None
        if self.world.main:
            try:
                self._sent = self._push(named, version, self.urls)
            except ServerError as err:
                error = str(err)
        else:
            for _ in named:
                pass
        failed = dd.any_rank(error is not None, self.world)  # and: no rank samples before it
        self.version = version
        if failed:
            self.sync_error = error or "the weight push of rank 0 failed (its message)"

    def _push(self, named: Iterable[tuple[str, torch.Tensor]], version: str,
              urls: Sequence[str]) -> dict:  # fmt: skip
        """``named`` to ``urls`` by --weight-push, each server's report checked against what
        was sent (returned)."""
        t0 = time.perf_counter()
        named = iter(named)
        try:
            sent, answers = self._transfer(named, version, urls)
        finally:
            for _ in named:  # FSDP2: the rest of the gathers, which the other ranks run
                pass
        self.push_seconds = time.perf_counter() - t0
        for url, workers in zip(urls, answers, strict=True):
            for got in workers:
                if not _same(got, sent, version):
                    raise ServerError(f"rollout server {url}: the weight push did not land: "
                                      f"it loaded {_describe(got)}, the trainer sent "
                                      f"{_describe({**sent, 'version': version})}")  # fmt: skip
        return sent

    def _transfer(self, named, version: str, urls: Sequence[str]) -> tuple[dict, list]:
        """``named`` to ``urls`` by --weight-push: what was sent, and each server's report."""
        if self.collective is not None:
            try:
                sent = self.collective.push(list(urls), named, self.aliases, version)
            except (OSError, RuntimeError) as err:  # HTTP, or the group (a server gone)
                for url in urls:  # a failed group is not used again
                    self.collective.groups.pop(url, None)
                raise ServerError(f"the collective weight push failed (rollout server(s) "
                                  f"{', '.join(urls)}): {_reason(err)}") from None  # fmt: skip
            answers = self._each(self._landed, urls)
        else:
            with weight_files(named, self.aliases, checksum=True,
                              prefix="gspo-push-") as (directory, sent):  # fmt: skip
                self._sent = sent  # the tests' stand-in for a push that skipped a server
                answers = self._each(lambda url: self._load(url, directory, version), urls)
        return sent, answers

    def _load(self, url: str, directory: str, version: str) -> list[dict]:
        try:
            workers = _rpc(url, "gspo_load_weights", path=directory, version=version)
            _call(url, "/reset_prefix_cache", {})  # its KV blocks came from the old weights
        except OSError as err:
            raise ServerError(f"rollout server {url}: the weight push failed: "
                              f"{_reason(err)}") from None  # fmt: skip
        return workers

    def _landed(self, url: str) -> list[dict]:
        """A collective push's report from each of ``url``'s workers."""
        try:
            workers = _rpc(url, "gspo_transfer_landed")
            _call(url, "/reset_prefix_cache", {})
        except OSError as err:
            raise ServerError(f"rollout server {url}: the weight push failed: "
                              f"{_reason(err)}") from None  # fmt: skip
        return workers

    def _refill(self, url: str) -> None:
        """A server that restarted (it holds no version) gets the last push again, from the
        policy's weights now: they must still be the pushed ones (they are, sampling between
        two steps; with --async-rollouts the trainer may have moved on: then exit 3)."""
        if self.collective is not None:
            self.collective.groups.pop(url, None)  # its old group died with it
        last = self._sent
        sent = self._push(self.weights(), self.version, [url])
        if not _same({**sent, "version": self.version}, last, self.version):
            raise ServerError(f"rollout server {url} restarted, and the trainer's weights are "
                              "no longer the ones it last pushed (the server cannot be "
                              "refilled mid-step); --resume pushes them again")  # fmt: skip

    def _check_versions(self) -> None:
        """Every server holds this run's last push; one that restarted (no version) gets it
        again from rank 0, which pushes (the other ranks wait for it: REFILL_S)."""
        if self.sync_error is not None:
            raise ServerError(self.sync_error)
        deadline = time.monotonic() + REFILL_S
        for url, held in zip(self.urls, self._each(self._held), strict=True):
            if None in held and self.sharded:
                # a refill gathers every tensor, a collective of all ranks, which ranks that
                # see the restart at different moments (or sample on the --async-rollouts
                # thread) cannot agree on: stop, and let --resume push
                raise ServerError(f"rollout server {url} restarted (it holds no weights); "
                                  "under --fsdp it is not refilled mid-run: --resume pushes "
                                  "the weights to it again")  # fmt: skip
            if None in held and self.world.main:
                self._refill(url)
                held = self._held(url)
            while None in held and time.monotonic() < deadline:
                time.sleep(1)
                held = self._held(url)
            if any(v != self.version for v in held):
                raise ServerError(f"rollout server {url} holds weights version {held[0]}, not "
                                  f"this run's {self.version}: it restarted or missed a push; "
                                  "once it is up, --resume pushes the weights again")  # fmt: skip

    def _held(self, url: str) -> list:
        try:
            return [w["version"] for w in _rpc(url, "gspo_version")]
        except OSError as err:
            raise ServerError(f"rollout server {url} does not answer: {_reason(err)}") \
                from None  # fmt: skip

    def _each(self, work, items: Sequence | None = None) -> list:
        """``work(item)`` for every item (default: every server URL), all at once; results
        in order; the first error raised."""
        return list(self.pool.map(work, self.urls if items is None else items))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        if self.collective is not None:
            self.collective.close()


def _sharded(model) -> bool:
    """Whether the weights are FSDP2 shards (DTensors): gathering them is a collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _same(got: dict, sent: dict, version: str) -> bool:
    return (got.get("version") == version and got.get("tensors") == sent["tensors"]
            and math.isclose(got.get("sum", math.nan), sent["sum"], rel_tol=1e-9, abs_tol=1e-9)
            and math.isclose(got.get("sum_squares", math.nan), sent["sum_squares"],
                             rel_tol=1e-9))  # fmt: skip


def _describe(state: dict) -> str:
    return (
        f"version {state.get('version')}, {state.get('tensors')} tensors, sum "
        f"{state.get('sum')}, sum of squares {state.get('sum_squares')}"
    )
