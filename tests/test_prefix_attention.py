"""The maskless shared-prefix attention (gspo.prefix_attention: causal SDPA over one gathered
row per response) equals today's dense [S, 1, N, N] block mask and the plain forward:
float64 values and gradients to 1e-10, float32 to 1e-5 (GPT-2's absolute positions,
Qwen2's rotary with grouped-query heads, Llama's rotary, left padding, multi-turn
episodes, LoRA, gradient checkpointing, random group shapes); and its memory grows
linearly with the response length where the dense mask's grows quadratically.

A plausible bug (a response seeing another response's keys, the prompt's outputs taken
from the wrong row, a tail slot used as a key) moves the log-probs by ~1e-2 here.
Why float64 runs keep RMSNorm in float64: tests/test_prefix.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo.causal_lm import CausalLMLogprobs
from gspo.prefix import pack
from gspo.prefix_attention import NAME
from gspo.train.models import enable_grad_checkpointing
from gspo.train.tiny import tiny_model
from test_prefix import B, P, T, batch, tiny_gpt2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture
def float64_llama_norm(monkeypatch):
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                              + self.variance_epsilon))  # fmt: skip

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def three_ways(model, dtype, ids, mask, target, **kwargs):
    """(plain, dense mask, rows) x (logp, entropy, parameter gradients)."""
    weights = torch.randn(target.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for attention, prompt_len in (("rows", None), ("dense", P), ("rows", P)):
        engine = CausalLMLogprobs(model, prefix_attention=attention)
        logp, ent = engine(ids, mask, target_mask=target, return_entropy=True,
                           prompt_len=prompt_len, **kwargs)  # fmt: skip
        grads = torch.autograd.grad((logp * weights).sum() + (ent * weights).sum(), params)
        out.append((logp.detach(), ent.detach(), torch.cat([g.flatten() for g in grads])))
    return out


def assert_all_equal(out, tol):
    plain, dense, rows = out
    assert plain[2].abs().max() > 0.1  # the test reaches the weights
    for other in (plain, dense):
        for a, b in zip(other, rows, strict=True):
            assert (a - b).abs().max().item() < tol


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "llama"])
def test_float64_rows_equal_dense_and_plain(kind, float64_norm, float64_llama_norm):
    model = {"qwen2": lambda: tiny_model(layers=2, hidden=64), "gpt2": tiny_gpt2,
             "llama": tiny_llama}[kind]().double()  # fmt: skip
    out = three_ways(model, torch.float64, *batch())
    assert model.config._attn_implementation == NAME  # the maskless path ran
    assert_all_equal(out, 1e-10)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "llama"])
def test_float32_rows_equal_dense_and_plain(kind):
    model = {"qwen2": lambda: tiny_model(layers=2, hidden=64), "gpt2": tiny_gpt2,
             "llama": tiny_llama}[kind]()  # fmt: skip
    assert_all_equal(three_ways(model, torch.float32, *batch(), temperature=0.7), 1e-5)


def test_float64_lora_and_checkpointing_rows_equal_dense(float64_norm):
    """LoRA adapters in the projections, and the recompute of gradient checkpointing (the
    plan reaches the recomputed attention as a keyword argument)."""
    from gspo.train.config import TrainConfig
    from gspo.train.lora import wrap

    model = wrap(tiny_model(layers=2, hidden=64).double(), TrainConfig(lora_r=4)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    enable_grad_checkpointing(model)
    assert_all_equal(three_ways(model, torch.float64, *batch()), 1e-10)


def test_float64_multi_turn_rows_equal_dense(float64_norm):
    """Environment tokens inside the response: attended, not scored."""
    ids, mask, _ = batch()
    mask[:, P:] = 1
    target = torch.cat([torch.zeros(B, P - 1, dtype=torch.bool), mask[:, P:].bool()], dim=1)
    target[:, P : P + 2] = False
    model = tiny_model(layers=2, hidden=64).double()
    assert_all_equal(three_ways(model, torch.float64, ids, mask, target), 1e-10)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 3), size=st.integers(1, 4))
def test_random_groups_rows_equal_plain(seed, groups, size):
    """Random group counts and sizes, prompt padding and response lengths (some empty);
    garbage ids in the padding columns change nothing."""
    gen = torch.Generator().manual_seed(seed)
    rows, p, t = groups * size, 5, 6
    ids = torch.randint(4, 50, (rows, p + t), generator=gen)
    mask = torch.ones(rows, p + t, dtype=torch.long)
    for g in range(groups):
        ids[g * size : (g + 1) * size, :p] = ids[g * size, :p].clone()
        mask[g * size : (g + 1) * size, : int(torch.randint(0, p - 1, (), generator=gen))] = 0
    response = torch.arange(t)[None] < torch.randint(0, t + 1, (rows, 1), generator=gen)
    mask[:, p:] = response.long()
    ids = torch.where(mask.bool(), ids, 10_000)  # garbage: out of the vocabulary
    target = torch.cat([torch.zeros(rows, p - 1, dtype=torch.bool), response], dim=1)
    ids_ok = torch.where(mask.bool(), ids, 0)
    model = tiny_model(layers=1, hidden=32).double()
    plain = CausalLMLogprobs(model)(ids_ok, mask, target_mask=target)
    engine = CausalLMLogprobs(model)
    packed = pack(ids, mask, p)  # packing reads only real tokens
    assert int(packed.input_ids.max()) < 64
    rows_logp = engine(ids_ok, mask, target_mask=target, prompt_len=p)
    assert (plain - rows_logp).abs().max() < 1e-10


def test_pack_builds_no_n_by_n_tensor():
    """The plan is linear in tokens: rows [M, Lr], back [S, N]; the block mask is built only
    when asked for (Packed.keep)."""
    ids, mask, _ = batch()
    packed = pack(ids, mask, P)
    s, n = packed.input_ids.shape
    assert packed.back.shape == (s, n) and packed.rows.shape[0] == B
    assert packed.rows.shape[1] <= P + T
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 3 for v in vars(packed).values())


MEMORY = r"""
import json, sys, torch
import gspo.causal_lm
from gspo.causal_lm import CausalLMLogprobs
gspo.causal_lm.cheaper = lambda *args: True  # pack in both modes, to compare their memory
from gspo.train.tiny import tiny_model
torch.set_num_threads(1)
attention, lengths = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
model = tiny_model(layers=1, hidden=32)
engine = CausalLMLogprobs(model, prefix_attention=attention)
G, P, peaks = 4, 32, []
def hwm():  # this process's own peak (VmHWM); ru_maxrss also counts the forking parent's
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
for r in lengths:  # growing: the high-water mark is the peak so far
    ids = torch.randint(4, 20, (G, P + r))
    ids[:, :P] = ids[0, :P]
    mask = torch.ones_like(ids)
    engine(ids, mask, prompt_len=P).sum().backward()
    peaks.append(hwm())
print(json.dumps(peaks))
"""


def peaks(attention: str, lengths: list[int]) -> list[float]:
    import os

    # a clean environment: variables earlier tests of the suite set (allocator, thread and
    # engine settings) must not change the child's peak memory (it failed only in the suite)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", MEMORY, attention, ",".join(map(str, lengths))],
                         capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_grows_linearly_with_response_length():
    """G = 4 responses of R tokens after a 32-token prompt, one layer, forward and backward:
    the peak resident memory (MiB) after R = 512, 1024, 2048 (measured here: rows 436, 451,
    478, growing by about 14 MiB per 1000 tokens of R; dense 460, 602, 788, the N^2 terms
    with N = 32 + 4 R: the bool mask and SDPA's float scores). A rows path that let
    transformers build its own 4D mask from the packed position ids (an attention mask of
    None) grows as the dense one does (measured 437, 482, 660)."""
    lengths = [512, 1024, 2048]
    rows, dense = peaks("rows", lengths), peaks("dense", lengths)
    assert dense[-1] - dense[0] > 200  # quadratic: the N^2 terms
    assert rows[-1] - rows[0] < 100  # linear
    assert rows[-1] - rows[0] < (dense[-1] - dense[0]) / 3
