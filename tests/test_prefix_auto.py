"""``CausalLMLogprobs(prefix_attention="auto")`` (the default): per forward, the shared-prefix
attention with less estimated memory (gspo.prefix_attention.extra_memory), the dense block
mask for long prompts and short responses, the maskless rows for long responses; and
whichever it picks, the plain forward's log-probs and gradients (float64 to 1e-10,
gradcheck). Why float64 runs keep RMSNorm in float64: tests/test_prefix.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gspo import prefix_attention
from gspo.causal_lm import CausalLMLogprobs
from gspo.prefix import pack
from gspo.train.tiny import tiny_model


def smollm2_shape():
    """SmolLM2-135M's shape (the recipes' model), on the meta device: no memory, no weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True)  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def groups(n_groups: int, p: int, g: int, r: int, seed: int = 0):
    """``n_groups`` groups of G rows: a shared P-token prompt, R-token responses."""
    ids = torch.randint(4, 50, (n_groups * g, p + r), generator=torch.Generator().manual_seed(seed))
    for k in range(n_groups):
        ids[k * g : (k + 1) * g, :p] = ids[k * g, :p].clone()
    return ids, torch.ones_like(ids)


def pick(engine, n_groups, p, g, r):
    ids, mask = groups(n_groups, p, g, r)
    return engine.choose_attention(tuple(ids.shape), pack(ids, mask, p))[1]


@pytest.mark.parametrize(("n_groups", "p", "g", "r", "want"), [
    (1, 150, 8, 30, "dense"),     # bench/prefix_memory.py's first shape
    (8, 150, 8, 30, "dense"),     # the calculator recipe's minibatch: 64 episodes
    (8, 60, 8, 20, "dense"),      # the arith recipe (P = 60, R = 20)
    (1, 150, 8, 400, "rows"),     # longer responses: the mask's N^2 passes the copies
    (1, 32, 4, 2048, "rows"),     # tests/test_prefix_attention.py's memory probe's shape
    (2, 512, 8, 1536, "rows"),    # bench/gpu.py's shape
])  # fmt: skip
def test_auto_picks_the_mask_at_the_recipes_shapes_and_the_rows_at_long_responses(
    n_groups, p, g, r, want
):
    engine = CausalLMLogprobs(smollm2_shape())
    assert pick(engine, n_groups, p, g, r) == want
    assert pick(CausalLMLogprobs(smollm2_shape(), prefix_attention="dense"), n_groups, p, g, r) \
        in ("dense", None)  # fmt: skip


def test_auto_keeps_the_mask_for_eager_models_and_follows_the_grad_mode():
    """Eager attention has only the mask. Without gradients only one layer's attention
    tensors live at a time, so the N^2 mask held once weighs more against the rows: at
    P = 150, G = 8 the crossover moves to shorter responses."""
    model = smollm2_shape()
    engine = CausalLMLogprobs(model)
    assert pick(engine, 1, 150, 8, 150) == "dense"
    with torch.no_grad():
        assert pick(engine, 1, 150, 8, 150) == "rows"
    model.config._attn_implementation = "eager"
    assert pick(engine, 1, 32, 4, 2048) is None  # the mask is not cheaper; the rows not run


def test_extra_memory_counts_the_mask_quadratically_and_the_copies_linearly():
    model = smollm2_shape()
    small = prefix_attention.extra_memory(model, (1, 1000), (8, 200), torch.float32)
    twice = prefix_attention.extra_memory(model, (1, 2000), (8, 325), torch.float32)
    assert twice["dense"] == pytest.approx(4 * small["dense"])
    # 8 x 200 - 1000 = 600 copied positions -> 8 x 325 - 2000 = 600: the same copies
    assert twice["rows"] == pytest.approx(small["rows"])
    bf16 = prefix_attention.extra_memory(model, (1, 1000), (8, 200), torch.bfloat16)
    assert bf16["rows"] < small["rows"] and bf16["dense"] < small["dense"]


def float64_tiny():
    return tiny_model(layers=2, hidden=64).double()


def logp_and_grads(engine, ids, mask, target, prompt_len=None):
    weights = torch.randn(target.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)  # fmt: skip
    params = [p for p in engine.parameters() if p.requires_grad]
    logp = engine(ids, mask, target_mask=target, prompt_len=prompt_len)
    grads = torch.autograd.grad((logp * weights).sum(), params)
    return logp.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize(("p", "g", "r", "want"), [(20, 4, 3, "dense"), (4, 4, 40, "rows")])
def test_auto_equals_the_plain_forward_with_either_attention(p, g, r, want, float64_norm):
    model = float64_tiny()
    ids, mask = groups(2, p, g, r)
    mask[g:, :2] = 0  # the second group's prompt left-padded
    target = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    target[:, p - 1 :] = True
    plain = logp_and_grads(CausalLMLogprobs(model), ids, mask, target)
    engine = CausalLMLogprobs(model)
    auto = logp_and_grads(engine, ids, mask, target, prompt_len=p)
    assert engine.attention_used == want
    assert plain[1].abs().max() > 0.1  # the test reaches the weights
    for a, b in zip(plain, auto, strict=True):
        assert (a - b).abs().max().item() < 1e-10


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), n_groups=st.integers(1, 3), size=st.integers(1, 4),
       p=st.integers(2, 24), t=st.integers(1, 32))  # fmt: skip
def test_auto_equals_the_plain_forward_on_random_batches(seed, n_groups, size, p, t, float64_norm):
    """Random group counts and sizes, prompt and response lengths (auto picks the mask for
    long prompts, the rows for long responses), left padding of the prompts, ragged and
    empty responses, garbage ids in every padding slot: the plain forward's log-probs and
    gradients to 1e-10."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = groups(n_groups, p, size, t, seed)
    for k in range(n_groups):
        pad = int(torch.randint(0, p - 1, (), generator=gen))
        mask[k * size : (k + 1) * size, :pad] = 0
    response = torch.arange(t)[None] < torch.randint(0, t + 1, (ids.shape[0], 1), generator=gen)
    mask[:, p:] = response.long()
    garbage = torch.where(mask.bool(), ids, 10_000)  # out of the vocabulary
    target = torch.cat([torch.zeros(ids.shape[0], p - 1, dtype=torch.bool), response], dim=1)
    model = float64_tiny()
    engine = CausalLMLogprobs(model)
    auto = logp_and_grads(engine, torch.where(mask.bool(), ids, 0), mask, target, prompt_len=p)
    note(f"attention used: {engine.attention_used}")
    assert int(pack(garbage, mask, p).input_ids.max()) < 64  # packing reads real tokens only
    plain = logp_and_grads(CausalLMLogprobs(model), torch.where(mask.bool(), ids, 0), mask,
                           target)  # fmt: skip
    for a, b in zip(plain, auto, strict=True):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize(("p", "g", "r", "want"), [(20, 4, 3, "dense"), (4, 4, 40, "rows")])
def test_auto_gradcheck(p, g, r, want, float64_norm):
    """Finite differences against autograd through either attention, for the attention's
    own parameters (the query, key and value biases of the first layer)."""
    model = tiny_model(layers=1, hidden=32).double()
    ids, mask = groups(1, p, g, r)
    engine = CausalLMLogprobs(model)
    attn = model.model.layers[0].self_attn
    names = {f"model.model.layers.0.self_attn.{k}_proj.bias": getattr(attn, f"{k}_proj").bias
             for k in "qkv"}  # fmt: skip

    def logp(*biases):
        params = dict(zip(names, biases, strict=True))
        out = torch.func.functional_call(engine, params, (ids, mask), {"prompt_len": p})
        return out[:, p - 1 :]

    biases = tuple(b.detach().clone().requires_grad_() for b in names.values())
    assert torch.autograd.gradcheck(logp, biases, eps=1e-6, atol=1e-7)
    assert engine.attention_used == want
