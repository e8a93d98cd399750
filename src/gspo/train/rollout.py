"""Rollouts: prompts -> G sampled completions each (Hugging Face ``generate``) -> tensors.

Shapes (one letter key): B = prompts x G sequences, P prompt tokens (left-padded),
T response tokens, L = P + T. ``response_mask`` [B, T] is True for the response tokens up to
and including the first EOS; anything generated after EOS is padding and is masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gspo.train.rewards import Prompt


@dataclass
class Rollout:
    prompts: list[Prompt]  # [B] the prompt dict of every sequence (each repeated G times)
    input_ids: torch.Tensor  # [B, L] prompt + response
    attention_mask: torch.Tensor  # [B, L] 1 = real token (prompt or response up to EOS)
    response_mask: torch.Tensor  # [B, T] bool, True = a token the policy chose
    prompt_len: int  # P
    completions: list[str]  # [B] decoded responses, specials removed

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice) -> Rollout:
        return Rollout(
            prompts=self.prompts[index],
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_len=self.prompt_len,
            completions=self.completions[index],
        )


def render_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None) -> str:
    """The text the model sees: a text prompt is the user message of the tokenizer's chat
    template when it has one (after ``system_prompt``, if given; none leaves the template's
    own default), else the text itself. Chat messages ``[{"role", "content"}]`` go through the
    template as they are (``system_prompt`` is put first if they bring no system message)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not has_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        if not has_template:
            raise ValueError("--prompts gives chat messages, but the tokenizer has no chat "
                             "template to render them; give text prompts or a tokenizer with "
                             "a chat_template")  # fmt: skip
        messages = list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def response_mask_after_eos(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] bool: True up to and including the first EOS of each row (all True if none).

    A cumulative count of EOS tokens *before* position t is 0 exactly for the tokens we keep.
    """
    is_eos = response == eos_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
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
    texts = [render_prompt(tokenizer, p["prompt"], system_prompt) for p in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0,
    }  # fmt: skip
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
        **sampling,
    )
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    response = out[:, prompt_len:]
    response_mask = response_mask_after_eos(response, tokenizer.eos_token_id)
    # Slots after EOS may hold anything generate padded with; make them pad explicitly.
    response = torch.where(
        response_mask, response, torch.full_like(response, tokenizer.pad_token_id)
    )
    keep_eos = response_mask & (response != tokenizer.eos_token_id)
    completions = [
        tokenizer.decode(r[m].tolist(), skip_special_tokens=True)
        for r, m in zip(response.cpu(), keep_eos.cpu(), strict=True)
    ]
    return Rollout(
        prompts=list(rows),
        input_ids=torch.cat([enc["input_ids"], response], dim=1),
        attention_mask=torch.cat([enc["attention_mask"], response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_len=prompt_len,
        completions=completions,
    )
