"""The naive reference, and CausalLMLogprobs on a tiny random Qwen2 against full logits."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs, causal_lm_logprobs
from gspo.logprobs import naive_token_logprobs

transformers = pytest.importorskip("transformers")


def test_naive_matches_hand_computed_softmax():
    # logits [[0, ln 3], [ln 2, ln 2]] -> probs [[1/4, 3/4], [1/2, 1/2]]
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[0.0, math.log(2)], [math.log(3), math.log(2)]])
    logp, ent = naive_token_logprobs(hidden, weight, torch.tensor([1, 0]), return_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([math.log(3 / 4), math.log(1 / 2)]))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([h0, math.log(2)]))


def test_naive_temperature_bias_and_ignore():
    hidden, weight = torch.tensor([[2.0]]), torch.tensor([[1.0], [0.0]])
    bias = torch.tensor([0.0, 1.0])
    # logits [2, 1] / 0.5 = [4, 2]: logp of id 0 = -log(1 + e^-2)
    logp = naive_token_logprobs(hidden, weight, torch.tensor([0]), bias=bias, temperature=0.5)
    torch.testing.assert_close(logp, torch.tensor([-math.log1p(math.exp(-2))]))
    out = naive_token_logprobs(hidden, weight, torch.tensor([-100]), bias=bias)
    assert out.tolist() == [0.0]


def tiny_qwen2(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = transformers.Qwen2ForCausalLM(config).float()
    model.eval()  # no dropout: both paths must see the same network
    return model


def full_logits_logprobs(model, input_ids, attention_mask, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    keep = attention_mask[:, 1:].bool()
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_causal_lm_logprobs_matches_full_logits(tie):
    model = tiny_qwen2(tie)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (3, 10), generator=g)
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, 4:] = 0
    wrapper = CausalLMLogprobs(model, chunk_size=7)
    logp, ent = wrapper(input_ids, attention_mask, temperature=0.8, return_entropy=True)
    want, want_ent = full_logits_logprobs(model, input_ids, attention_mask, temperature=0.8)
    assert logp.shape == (3, 9)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    assert torch.equal(logp[2, 3:], torch.zeros(6))  # targets at mask 0 give 0

    w = torch.randn(3, 9, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((logp * w).sum() + ent.sum(), params)
    ref = torch.autograd.grad((want * w).sum() + want_ent.sum(), params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("lm_head") for n in names) != tie
    for name, a, b in zip(names, got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_causal_lm_logprobs_function_and_module_forward():
    model = tiny_qwen2(tie=True, seed=2)
    input_ids = torch.randint(0, 300, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    logp = causal_lm_logprobs(model, input_ids, mask, chunk_size=3)
    want, _ = full_logits_logprobs(model, input_ids, mask)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    wrapper = CausalLMLogprobs(model)
    assert isinstance(wrapper, torch.nn.Module)
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in model.parameters()}


def test_causal_lm_logprobs_never_calls_full_logits(monkeypatch):
    model = tiny_qwen2(tie=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the full-logits lm_head forward was called")

    monkeypatch.setattr(model.lm_head, "forward", forbidden)
    monkeypatch.setattr(model, "forward", forbidden)
    logp = causal_lm_logprobs(model, torch.randint(0, 300, (1, 5)), torch.ones(1, 5))
    assert logp.shape == (1, 4) and (logp < 0).all()


def test_causal_lm_logprobs_bad_input():
    model = tiny_qwen2(tie=True)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, torch.zeros(4, dtype=torch.long), torch.ones(4))
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        CausalLMLogprobs(model, chunk_size=0)
    with pytest.raises(TypeError, match="model"):
        CausalLMLogprobs(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- models with their own logit transform


def tiny_model_of(kind: str):
    """Tiny random models whose forward transforms the LM head output."""
    torch.manual_seed(0)
    common = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)  # fmt: skip
    if kind == "gemma2":  # cap 1.5 against logits of order 3: tanh saturates, so it matters
        config = transformers.Gemma2Config(**common, final_logit_softcapping=1.5)
        model = transformers.Gemma2ForCausalLM(config)
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(**common, final_logit_softcapping=1.5)
        model = transformers.Gemma3ForCausalLM(config)
    elif kind == "cohere":
        config = transformers.CohereConfig(**common, logit_scale=0.25)
        model = transformers.CohereForCausalLM(config)
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # random init is small; make the logits large enough to be capped
        model.get_output_embeddings().weight.mul_(8.0)
    return model.double().eval()  # float64: both paths agree to rounding, 1e-10


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "cohere"])
def test_models_with_a_logit_transform_match_their_own_forward(kind):
    model = tiny_model_of(kind)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 120, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    logp, ent = CausalLMLogprobs(model, chunk_size=5)(input_ids, mask, temperature=0.9,
                                                      return_entropy=True)  # fmt: skip
    want, want_ent = full_logits_logprobs(model, input_ids, mask, temperature=0.9)
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-10)
    # the transform is not a no-op here: the plain head gives other numbers
    head = model.get_output_embeddings().weight
    hidden = getattr(model, model.base_model_prefix)(input_ids, attention_mask=mask)[0][:, :-1]
    plain = torch.log_softmax(hidden @ head.T / 0.9, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    assert (torch.where(mask[:, 1:].bool(), plain, 0.0) - want).abs().max() > 0.05
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(logp.sum() + ent.sum(), params)
    ref = torch.autograd.grad(want.sum() + want_ent.sum(), params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_unknown_logit_transform_is_refused_naming_the_attribute():
    config = transformers.GraniteConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        logits_scaling=8.0)  # fmt: skip
    with pytest.raises(ValueError, match="logits_scaling = 8.0"):
        CausalLMLogprobs(transformers.GraniteForCausalLM(config))


def test_target_mask_projects_only_the_chosen_positions(monkeypatch):
    import gspo.chunked as chunked

    projected = []
    inner = chunked._chunk_logits

    def counting(h, *args):
        projected.append(h.shape[0])
        return inner(h, *args)

    monkeypatch.setattr(chunked, "_chunk_logits", counting)
    model = tiny_qwen2(tie=True)
    input_ids = torch.randint(0, 300, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    target = torch.zeros(3, 7, dtype=torch.bool)
    target[:, 4:] = True  # the "response": the last 3 targets of each row
    logp = CausalLMLogprobs(model, chunk_size=4)(input_ids, mask, target_mask=target)
    assert sum(projected) == 9  # 3 rows x 3 targets, never the 3 x 4 prompt positions
    full = CausalLMLogprobs(model)(input_ids, mask)
    torch.testing.assert_close(logp, torch.where(target, full, 0.0), rtol=0, atol=1e-6)


def test_gpt2_left_padding_gives_the_log_probs_generate_sampled_from():
    """GPT-2 has absolute position embeddings: without position_ids from the attention mask,
    a left-padded row is scored at shifted positions (measured error ~0.1-1 nats here)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(20.0)  # make positions matter a lot
    prompts = torch.tensor([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11]])  # row 0 left-padded by 3
    prompt_mask = (prompts != 0).long()
    out = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=4,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    logits = torch.stack(out.logits, dim=1)  # [B, T, V] at each sampled step
    response = out.sequences[:, 5:]
    sampled = torch.log_softmax(logits.float(), -1).gather(-1, response[..., None])[..., 0]
    mask = torch.cat([prompt_mask, torch.ones_like(response)], dim=1)
    logp = CausalLMLogprobs(model)(out.sequences, mask)[:, 4:]
    torch.testing.assert_close(logp, sampled, rtol=1e-4, atol=1e-4)
