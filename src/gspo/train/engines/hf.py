"""Rollouts with Hugging Face ``generate``, from the policy module itself.

The sampler is the old policy: ``generate`` runs with a generation config built here from
our own settings only (the model's ``generation_config.json`` may carry a repetition
penalty, top-k or a no-repeat n-gram size, none of which the trainer's log-probs know of),
stops at every EOS id of the model, runs in eval mode (dropout off), and keeps the
processed scores (logits / temperature, then top-p), whose log-softmax at the sampled token
is the sampler's log-prob.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from gspo.train import distributed as dd
from gspo.train.models import position_limit
from gspo.train.rollout import Rollout, assemble, concat, encode_prompts, eos_ids, eval_mode


class HFEngine:
    """Samples with ``model.generate``. It holds the policy itself, so there are no weights
    to copy: ``load_weights`` has nothing to do.

    ``sampling`` is a SamplingConfig; ``batch_size``: sequences per ``generate`` call (0:
    all of a call's at once)."""

    def __init__(self, model, tokenizer, sampling, *, synced: bool = False, gathered=None,
                 batch_size: int = 0):  # fmt: skip
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.synced = synced  # every rank steps until all are done (FSDP's forward communicates)
        self.gathered = gathered or contextlib.nullcontext  # FSDP2: the root's full params
        self.batch_size = batch_size

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
        """`gspo eval`'s engine: ``batch_size`` sequences per call (gspo eval shows the
        progress over all of its calls)."""
        return cls(model, tokenizer, sampling, batch_size=batch_size)

    def sample(self, prompts: Sequence[dict], *, group_size: int, greedy: bool) -> Rollout:
        c = self.sampling
        per_call = max(1, self.batch_size // group_size) if self.batch_size else len(prompts)
        parts = []
        with self.gathered():
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                parts.append(generate(self.model, self.tokenizer, chunk, group_size=group_size,
                                      max_new_tokens=c.max_new_tokens,
                                      temperature=c.temperature, top_p=c.top_p, greedy=greedy,
                                      synced=self.synced,
                                      system_prompt=c.system_prompt))  # fmt: skip
        return parts[0] if len(parts) == 1 else concat(parts, self.tokenizer.pad_token_id)

    def generate_from(self, ids: Sequence[Sequence[int]], *, greedy: bool):
        """Continue each sequence of token ids by one response (a turn of gspo.train.episodes):
        per row, (the sampled ids up to and including the first EOS, the sampler's log-prob of
        each, or None when greedy). Batched as ``sample`` batches its sequences."""
        c = self.sampling
        per_call = self.batch_size or len(ids)
        out = []
        with self.gathered():
            for start in range(0, len(ids), per_call):
                response, logps, eos = generate_ids(
                    self.model, self.tokenizer, ids[start : start + per_call],
                    max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                    greedy=greedy, synced=self.synced)  # fmt: skip
                for i, row in enumerate(response.cpu().tolist()):
                    n = next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))
                    out.append((row[:n], None if logps is None else logps[i][:n]))
        return out

    @property
    def max_len(self) -> int | None:
        """The longest sequence the model takes (None: its config does not say)."""
        return position_limit(self.model)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass  # generate() runs the policy module: it is always current

    def close(self) -> None:
        pass


def fresh_generation_config(model, tokenizer, *, max_new_tokens, temperature, top_p, greedy):
    """Only what we choose: sampling at ``temperature`` with nucleus ``top_p`` (top-k off),
    or greedy; every EOS id of the model; no penalties, no n-gram bans."""
    from transformers import GenerationConfig

    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0,
    }  # fmt: skip
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        output_scores=not greedy,
        return_dict_in_generate=True,
        **sampling,
    )


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
) -> Rollout:
    """Sample ``group_size`` completions per prompt; groups are contiguous rows.

    ``synced`` keeps every rank stepping until all are done (needed when the forward itself
    communicates, as under FSDP); this is ``generate(synced_gpus=True)``.
    """
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(group_size)]
    ids = encode_prompts(tokenizer, rows, system_prompt)
    response, logps, eos = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, greedy=greedy,
                                        synced=synced)  # fmt: skip
    return assemble(tokenizer, rows, ids, response.cpu().tolist(), logps, eos=eos,
                    device=device)  # fmt: skip


@torch.no_grad()
def generate_ids(model, tokenizer, ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool, synced: bool = False):  # fmt: skip
    """One ``generate`` call on token ids (left-padded together): the sampled ids
    [B, T_gen] (pad after each row's EOS), the sampler's log-prob of each (a [B][T_gen]
    list; None when greedy), and the EOS ids that stopped it."""
    device = next(model.parameters()).device
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    enc = {k: v.to(device) for k, v in enc.items()}
    gen_config = fresh_generation_config(model, tokenizer, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, greedy=greedy)
    # generate() fills whatever our config leaves unset from model.generation_config (a
    # saved repetition_penalty=1.3 would otherwise come back); swap in the fresh one.
    saved, model.generation_config = model.generation_config, gen_config
    try:
        with eval_mode(model):  # dropout off: the sampler is the policy the log-probs describe
            out = model.generate(**enc, generation_config=gen_config, synced_gpus=synced)
    finally:
        model.generation_config = saved
    P = enc["input_ids"].shape[1]
    response = out.sequences[:, P:]
    logps = None
    if not greedy:  # scores[t] [B, V]: the processed logits step t sampled from
        steps = [torch.log_softmax(s.float(), dim=-1).gather(-1, response[:, t, None])[:, 0]
                 for t, s in enumerate(out.scores)]  # fmt: skip
        logps = torch.stack(steps, dim=1).cpu().tolist()
    return response, logps, gen_config.eos_token_id
