"""Rollouts with Hugging Face ``generate``, from the policy module itself.

The sampler is the old policy: ``generate`` runs with a generation config built here from
our own settings only (the model's ``generation_config.json`` may carry a repetition
penalty, top-k or a no-repeat n-gram size, none of which the trainer's log-probs know of),
stops at every EOS id of the model, and runs in eval mode (dropout off).

The sampler's log-prob of each sampled token is the log-softmax of the processed scores
(logits / temperature, then top-p) at that token. ``generate(output_scores=True)`` would keep
every step's scores, T x B x V float32 (80 GB for 128 sequences of 1,024 tokens at
V = 151,936) to read B x T numbers; instead ``_Recorder`` holds the current step's processed
scores only, and reads the sampled token's log-prob out of them as soon as the token is
drawn (a stopping criterion sees the new token before the next step starts). Temperature
and top-p are therefore passed as our own processors, ahead of the recorder (generate would
apply its own warpers after every custom processor); they are the classes generate builds,
in its order, so the samples are bit-identical to generate's own sampling.

A call generates ``--generation-batch-size`` sequences at a time (0 = all of a call's at
once).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence

import torch

from gspo.train import distributed as dd
from gspo.train.models import position_limit
from gspo.train.rollout import (
    Continuation,
    Rollout,
    assemble,
    encode_prompts,
    eos_ids,
    eval_mode,
    sample_prompts,
    trim,
)


class HFEngine:
    """Samples with ``model.generate``. It holds the policy itself, so there are no weights
    to copy: ``load_weights`` has nothing to do. ``detach`` makes one that samples a copy
    (for the overlapped sampler, gspo.train.overlap), whose ``load_weights`` copies in.

    ``sampling`` is a SamplingConfig (its ``generation_batch_size``: sequences per
    ``generate`` call, 0 = all of a call's at once)."""

    def __init__(self, model, tokenizer, sampling, *, synced: bool = False, gathered=None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.synced = synced  # every rank steps until all are done (FSDP's forward communicates)
        self.gathered = gathered or contextlib.nullcontext  # FSDP2: the root's full params
        self.own_copy, self.seed = False, 0

    @property
    def shares_policy(self) -> bool:
        """True while it samples the trainer's module (whose weights move during an update)."""
        return not self.own_copy

    def detach(self, *, seed: int) -> HFEngine:
        """An engine on a copy of the model (one more replica in memory), seeded batches
        drawn from ``seed`` (this rank's). Refused under FSDP2 (config: a whole model per
        rank) and LoRA (the copy would hold adapters, the sampler weights are merged)."""
        import copy

        engine = HFEngine(copy.deepcopy(self.model), self.tokenizer, self.sampling)
        engine.own_copy, engine.seed = True, seed
        return engine

    @classmethod
    def for_run(cls, sampling, policy, world, logprobs, *, seed: int,
                prompt_tokens: int | None = None) -> HFEngine:  # fmt: skip
        # prompt_tokens: generate() reserves nothing ahead (its cache grows with the batch)
        # under LoRA the HF model inside the PeftModel: its layers run the adapters, and
        # generate() must see its own generation_config (swapped in generate below)
        fsdp = world.distributed and dd.is_fsdp(logprobs)
        return cls(policy.hf_model, policy.tokenizer, sampling, synced=fsdp,
                   gathered=lambda: dd.gathered(logprobs))  # fmt: skip

    @classmethod
    def for_eval(cls, model, tokenizer, sampling, *, device, seed: int, batch_size: int,
                 prompt_tokens: int | None = None):  # fmt: skip
        """`gspo eval`'s engine: gspo eval asks ``batch_size`` sequences a call and shows the
        progress over all of its calls; ``sampling.generation_batch_size`` splits a call."""
        return cls(model, tokenizer, sampling)

    def sample(self, prompts: Sequence[dict], *, group_size: int, greedy: bool,
               seed: int | None = None) -> Rollout:  # fmt: skip
        """``group_size`` samples per prompt, groups contiguous (rollout.sample_prompts over
        ``continue_ids``)."""
        return sample_prompts(self, self.tokenizer, prompts, group_size=group_size,
                              greedy=greedy, seed=seed, system_prompt=self.sampling.system_prompt,
                              eos=eos_ids(self.model, self.tokenizer),
                              device=next(self.model.parameters()).device)  # fmt: skip

    def continue_ids(self, ids: Sequence[Sequence[int]], *, n: int = 1, greedy: bool,
                     seed: int | None = None) -> list[Continuation]:  # fmt: skip
        """The engine's one generation primitive: ``n`` continuations of each token-id
        sequence (rows contiguous per sequence: len(ids) * n of them), each up to its first
        EOS or --max-new-tokens. ``generation_batch_size`` rows per ``generate`` call (a
        sequence's n rows may span two calls: rows are independent).
        ``seed``: draw from a ``torch.Generator`` of its own seeded with (engine seed,
        ``seed``), never from torch's process-wide RNG, so that the batch depends on nothing
        drawn before and the trainer's RNG (and the checkpoint that saves it) on nothing this
        call draws, whichever thread runs it (the overlapped sampler's). ``generate`` takes no
        generator: tokens are then drawn by the Gumbel-max rule (``_gumbel_argmax``)."""
        generator = None
        if seed is not None:
            device = next(self.model.parameters()).device
            generator = torch.Generator(device).manual_seed(self.seed * 1_000_003 + seed * 65_537)
        c = self.sampling
        rows = [list(p) for p in ids for _ in range(n)]
        per_call = c.generation_batch_size or len(rows)
        limit = self.max_len
        out = []
        with self.gathered():
            for start in range(0, len(rows), per_call):
                chunk = rows[start : start + per_call]
                response, logps, eos = generate_ids(
                    self.model, self.tokenizer, chunk, max_new_tokens=c.max_new_tokens,
                    temperature=c.temperature, top_p=c.top_p, greedy=greedy,
                    synced=self.synced, generator=generator)  # fmt: skip
                for i, row in enumerate(response.cpu().tolist()):
                    out.append(trim(len(chunk[i]), row, None if logps is None else logps[i],
                                    eos=eos, max_new_tokens=c.max_new_tokens,
                                    max_len=limit))  # fmt: skip
        return out

    def more(self, live: bool) -> bool:
        """Whether the engine's ranks have more to generate (one rank's engine: ``live``)."""
        return live

    @property
    def max_len(self) -> int | None:
        """The longest sequence the model takes (None: its config does not say)."""
        return position_limit(self.model)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.own_copy:
            return  # generate() runs the policy module: it is always current
        own = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named:
                own[name].copy_(tensor)  # tied weights come once; the alias shares storage

    def close(self) -> None:
        pass


def fresh_generation_config(model, tokenizer, *, max_new_tokens, greedy):
    """Only what we choose: sampling (temperature and top-p come as our own processors,
    ``_Recorder.processors``; top-k off) or greedy; every EOS id of the model; no
    penalties, no n-gram bans; no scores kept."""
    from transformers import GenerationConfig

    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    }  # fmt: skip
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        return_dict_in_generate=True,
        **sampling,
    )


class _Recorder:
    """The sampled token's log-prob at each step, holding one step's scores at most.

    As the last logits processor it keeps a reference to the step's processed scores
    [B, V] (the tensor generate samples from); as a stopping criterion, called right after
    the token is drawn (``input_ids[:, -1]``), it reads log_softmax(scores)[token] into a
    [B] column and drops the reference. ``logp()`` is [B, steps] float32 (garbage after a
    row's EOS, where generate pads; ``assemble`` masks it)."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []

    def processors(self, temperature: float, top_p: float, generator=None):
        """The warpers, then the recorder; with ``generator``, then Gumbel noise from it, for
        generate's greedy decoding to draw the token (``_gumbel_argmax``)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        # generate's own warpers, in its order (temperature, then top-p), built as it builds
        # them: only when they change anything.
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)] if top_p < 1.0 else []
        noise = [] if generator is None else [functools.partial(_gumbel_argmax, generator)]
        return LogitsProcessorList([*warpers, self._keep, *noise])

    def stopping(self):
        from transformers import StoppingCriteria, StoppingCriteriaList

        recorder = self

        class _Read(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                recorder._read(input_ids[:, -1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Read()])

    def _keep(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores = scores
        return scores

    def _read(self, token: torch.Tensor) -> None:
        logp = torch.log_softmax(self.scores.float(), dim=-1).gather(-1, token[:, None])[:, 0]
        self.columns.append(logp)
        self.scores = None

    def logp(self, steps: int) -> torch.Tensor:
        """[B, steps]: generate may undo steps it ran past a stop, so keep the first ones."""
        return torch.stack(self.columns[:steps], dim=1)


def _gumbel_argmax(generator: torch.Generator, input_ids, scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, V] whose argmax is a draw from softmax(scores): ``scores - log(E)``, E
    i.i.d. Exp(1) from ``generator`` (-log E is Gumbel(0, 1): the Gumbel-max trick). A -inf
    score (cut by top-p) stays -inf, so the nucleus is kept; float32, as softmax would be."""
    exp1 = torch.empty(scores.shape, device=scores.device).exponential_(generator=generator)
    return scores.float() - exp1.log()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[dict],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    synced: bool = False,
    system_prompt: str | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``group_size`` completions per prompt; groups are contiguous rows; from
    ``generator`` when given (else torch's process-wide RNG, as ``generate`` draws).

    ``synced`` keeps every rank stepping until all are done (needed when the forward itself
    communicates, as under FSDP); this is ``generate(synced_gpus=True)``.
    """
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(group_size)]
    ids = encode_prompts(tokenizer, rows, system_prompt)
    response, logps, eos = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, greedy=greedy,
                                        synced=synced, generator=generator)  # fmt: skip
    return assemble(tokenizer, rows, ids, response.cpu().tolist(), logps, eos=eos,
                    device=device)  # fmt: skip


@torch.no_grad()
def generate_ids(model, tokenizer, ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool, synced: bool = False,
                 generator: torch.Generator | None = None):  # fmt: skip
    """One ``generate`` call on token ids (left-padded together): the sampled ids
    [B, T_gen] (pad after each row's EOS), the sampler's log-prob of each (a [B][T_gen]
    list; None when greedy), and the EOS ids that stopped it."""
    device = next(model.parameters()).device
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    enc = {k: v.to(device) for k, v in enc.items()}
    # with a generator of our own, generate decodes greedily over Gumbel-noised scores
    gen_config = fresh_generation_config(model, tokenizer, max_new_tokens=max_new_tokens,
                                         greedy=greedy or generator is not None)  # fmt: skip
    recorder = None if greedy else _Recorder()
    hooks = {} if greedy else {
        "logits_processor": recorder.processors(temperature, top_p, generator),
        "stopping_criteria": recorder.stopping()}  # fmt: skip
    # generate() fills whatever our config leaves unset from model.generation_config (a
    # saved repetition_penalty=1.3 would otherwise come back); swap in the fresh one.
    saved, model.generation_config = model.generation_config, gen_config
    try:
        with eval_mode(model):  # dropout off: the sampler is the policy the log-probs describe
            out = model.generate(**enc, generation_config=gen_config, synced_gpus=synced,
                                 **hooks)  # fmt: skip
    finally:
        model.generation_config = saved
    P = enc["input_ids"].shape[1]
    response = out.sequences[:, P:]
    logps = None if greedy else recorder.logp(response.shape[1]).cpu().tolist()
    return response, logps, gen_config.eos_token_id
