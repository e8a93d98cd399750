"""The shared-prefix forward (gspo.prefix, CausalLMLogprobs(prompt_len=P)) gives the plain
forward's log-probs, entropy and gradients: float64 to 1e-10, float32 to 1e-5.

Why the float64 tests patch Qwen2's RMSNorm: transformers' RMSNorm casts its input to
float32 even when the model is float64, so the last prompt token's gradient, summed over G
responses before that cast (packed) or after it (plain), differs at float32's 1e-7 however
exact the packing is. The patch keeps the norm in its input dtype; the maths is the same.
GPT-2's LayerNorm needs no patch. The float32 tests run the models unpatched.
"""

from __future__ import annotations

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.prefix import attention_mask_4d, groups, pack, packed_lengths, unsupported
from gspo.train.models import enable_grad_checkpointing
from gspo.train.tiny import tiny_model

B, G, P, T = 8, 4, 6, 5


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


def batch(seed: int = 0):
    """B rows in groups of G; group g's prompt is left-padded by g + 1 tokens (different
    prompt lengths across groups); ragged responses (some of length 1, padding after)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, P + T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    for g in range(B // G):
        rows = slice(g * G, (g + 1) * G)
        ids[rows, :P] = ids[g * G, :P]
        mask[rows, : g + 1] = 0
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    response = torch.arange(T)[None] < lengths[:, None]
    mask[:, P:] = response.long()
    target = torch.cat([torch.zeros(B, P - 1, dtype=torch.bool), response], dim=1)
    return ids, mask, target


def both(engine, model, dtype, **kwargs):
    """(plain, shared) x (logp, entropy, parameter gradients) for one random weighting."""
    ids, mask, target = batch()
    weights = torch.randn(B, P + T - 1, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out = []
    for prompt_len in (None, P):
        logp, ent = engine(ids, mask, target_mask=target, return_entropy=True,
                           prompt_len=prompt_len, **kwargs)  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((logp * weights).sum() + (ent * weights).sum(), params)
        out.append((logp.detach(), ent.detach(), torch.cat([g.flatten() for g in grads])))
    return out


def assert_equal(out, tol):
    (a_logp, a_ent, a_grad), (b_logp, b_ent, b_grad) = out
    assert a_grad.abs().max() > 0.1  # the test reaches the weights
    for a, b in ((a_logp, b_logp), (a_ent, b_ent), (a_grad, b_grad)):
        assert (a - b).abs().max().item() < tol


def test_pack_lays_out_a_group_by_hand():
    """Two rows sharing prompt [5 6] (left pad 1), responses [7 8] and [9] (one padding
    slot): one packed row [5 6 7 8 9], positions 0 1 2 3 2, response 2 blind to response 1."""
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    packed = pack(ids, mask, prompt_len=3)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.keep[0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the second response sees the prompt and itself, not 7 8
    ]
    assert packed.source.tolist() == [[-1, 0, 1, 2, 3], [-1, 0, 1, 4, -1]]
    assert packed_lengths(ids, mask, 3) == [5]
    assert packed.tokens == 5  # the plain forward runs 2 x 5 = 10


def test_groups_are_runs_of_equal_prompts():
    """Equal prompts apart are separate groups; the padding token's id does not matter."""
    ids = torch.tensor([[1, 2, 9], [7, 2, 9], [3, 4, 9], [1, 2, 9]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert groups(ids, mask, 2) == [slice(0, 2), slice(2, 3), slice(3, 4)]


def test_padding_slots_attend_to_themselves_only():
    """A padding slot with no key would be an empty softmax row: NaN in the backward."""
    ids, mask, _ = batch()
    packed = pack(ids, mask, P)
    assert bool(packed.keep.any(dim=-1).all())
    additive = attention_mask_4d(packed.keep, "eager", torch.float32)
    assert additive.shape == (packed.keep.shape[0], 1, *packed.keep.shape[1:])
    assert bool((additive == 0).eq(packed.keep[:, None]).all())


def test_float64_qwen2_equals_plain(float64_norm):
    model = tiny_model(layers=2, hidden=64).double()
    assert_equal(both(CausalLMLogprobs(model), model, torch.float64), 1e-10)


def test_float32_eager_attention_equals_plain():
    """The additive mask of eager attention. (In float64 transformers' eager plain path
    itself gives NaN at left padding; eager's softmax runs in float32 anyway.)"""
    model = tiny_model(layers=2, hidden=64)
    model.config._attn_implementation = "eager"
    assert_equal(both(CausalLMLogprobs(model), model, torch.float32), 1e-5)


def test_float64_gpt2_absolute_positions_equal_plain():
    """GPT-2 adds learned absolute position embeddings: a response's positions must restart
    at the prompt's length, as the plain path numbers them from the mask."""
    model = tiny_gpt2().double()
    assert_equal(both(CausalLMLogprobs(model), model, torch.float64), 1e-10)


def test_float64_lora_equals_plain(float64_norm):
    from gspo.train.config import TrainConfig
    from gspo.train.lora import wrap

    model = wrap(tiny_model(layers=2, hidden=64).double(), TrainConfig(lora_r=4))
    with torch.no_grad():  # B = 0 at init would give the adapters' A no gradient
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    assert_equal(both(CausalLMLogprobs(model), model, torch.float64), 1e-10)


def test_float64_grad_checkpointing_equals_plain(float64_norm):
    model = tiny_model(layers=2, hidden=64).double().train()
    enable_grad_checkpointing(model)
    assert_equal(both(CausalLMLogprobs(model), model, torch.float64), 1e-10)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_float32_equals_plain(kind):
    model = tiny_model(layers=2, hidden=64) if kind == "qwen2" else tiny_gpt2()
    assert_equal(both(CausalLMLogprobs(model), model, torch.float32, temperature=0.7), 1e-5)


def test_models_it_is_not_exact_for_run_the_plain_path(monkeypatch):
    """A model type outside the list, FlashAttention, a sliding window shorter than the
    packed row: the reason is named, and the forward runs the plain path (it never builds
    a packed mask) on a batch that would pack for the list's models."""
    model = tiny_model(layers=1, hidden=32)
    assert unsupported(model) is None
    model.config.sliding_window, model.config.use_sliding_window = 4, True
    assert "sliding window 4" in unsupported(model, length=19)
    assert unsupported(model, length=4) is None
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no 4D mask" in unsupported(model)
    model.config._attn_implementation = "sdpa"
    model.config.model_type = "bloom"  # ALiBi: positions from key indices
    assert "bloom" in unsupported(model)
    ids, mask, target = batch()
    forbid_packing(monkeypatch, "packed for a model it is not exact for")
    engine = CausalLMLogprobs(model)
    plain = engine(ids, mask, target_mask=target)
    assert torch.equal(plain, engine(ids, mask, target_mask=target, prompt_len=P))


def forbid_packing(monkeypatch, why: str) -> None:
    """A spy: the packed forward (its maskless plan, or its dense mask) raises ``why``."""
    import gspo.causal_lm
    import gspo.prefix_attention

    def refuse(*args):
        raise AssertionError(why)

    monkeypatch.setattr(gspo.causal_lm, "attention_mask_4d", refuse)
    monkeypatch.setattr(gspo.prefix_attention, "Rows", refuse)


def test_bad_prompt_len_is_refused():
    ids, mask, target = batch()
    engine = CausalLMLogprobs(tiny_model(layers=1, hidden=32))
    with pytest.raises(ValueError, match="prompt_len"):
        engine(ids, mask, prompt_len=P + T)
    with pytest.raises(TypeError, match="prompt_len"):
        engine(ids, mask, prompt_len=2.0)


def test_packing_runs_only_where_it_is_cheaper(monkeypatch):
    """Per layer, tokens x (2 x weights + 4 H x keys). The tiny model (H = 64, ~49K weights
    a layer): the recipe's shape (8 rows of P = 60 + R = 20 -> one row of 220) packs; 8
    responses of 1000 tokens after a 60-token prompt (one row of 8060, N^2 attention) do
    not; nor does a batch with nothing shared and no padding (the forward then never builds
    a packed mask)."""
    from gspo.prefix import cheaper

    model = tiny_model(layers=2, hidden=64)
    assert cheaper(model, plain=(8, 80), packed=(1, 220))
    assert not cheaper(model, plain=(8, 1060), packed=(1, 8060))
    assert not cheaper(model, plain=(8, 11), packed=(8, 11))  # nothing shared, no padding
    # The maskless attention (8 gathered rows of 1060, causal half) costs no more than the
    # plain rows' attention: sharing the prompt's weight products wins.
    assert cheaper(model, plain=(8, 1060), packed=(1, 8060), rows=(8, 1060))
    ids, mask, target = batch()
    ids, mask, target = ids[:, :-1], mask[:, :-1], target[:, :-1]
    mask[:, P:] = 1  # no response padding, and groups of one row: no saving
    ids[:, 0], mask[:, :P] = torch.arange(B) + 4, 1
    forbid_packing(monkeypatch, "packed although not cheaper")
    engine = CausalLMLogprobs(model)
    plain = engine(ids, mask, target_mask=target)
    assert torch.equal(plain, engine(ids, mask, target_mask=target, prompt_len=P))
    with pytest.raises(AssertionError, match="packed"):  # the spy sees a packing batch
        engine(*batch()[:2], target_mask=batch()[2], prompt_len=P)


def test_float64_multi_turn_episode_equals_plain(float64_norm):
    """A multi-turn episode (gspo.train.envs): the response region holds the environment's
    tokens too, real (attended) but not scored. Packing follows the attention mask, so they
    stay in their response's block; here every row's response columns 1-2 are such tokens."""
    model = tiny_model(layers=2, hidden=64).double()
    engine = CausalLMLogprobs(model)
    ids, mask, target = batch()
    mask[:, P:] = 1  # whole episodes: model, environment, model tokens
    target = torch.cat([torch.zeros(B, P - 1, dtype=torch.bool), mask[:, P:].bool()], dim=1)
    target[:, P : P + 2] = False  # the environment's tokens: attended, not scored
    weights = torch.randn(B, P + T - 1, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)  # fmt: skip
    out = []
    for prompt_len in (None, P):
        logp = engine(ids, mask, target_mask=target, prompt_len=prompt_len)
        grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
        out.append((logp.detach(), torch.cat([g.flatten() for g in grads])))
    (a, ga), (b, gb) = out
    assert ga.abs().max() > 0.1
    assert (a - b).abs().max() < 1e-10 and (ga - gb).abs().max() < 1e-10
