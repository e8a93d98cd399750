"""Each stage of one training step on its own: tokenizer and model, rollouts and their
masks, rewards and their errors, data order, log-prob alignment, the update."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.train.config import TrainConfig
from gspo.train.engines.hf import generate
from gspo.train.rewards import RewardError, score
from gspo.train.rollout import response_mask_after_eos
from gspo.train.tasks import build_task, load_prompts_file, prompts_at
from gspo.train.tasks.digitsum import digitsum_prompts, digitsum_reward
from gspo.train.tiny import EOS, tiny_model, tiny_tokenizer
from gspo.train.update import k3_kl, lr_lambda, response_logprobs, update

SMALL = dict(layers=1, hidden=32)


# ---------------------------------------------------------------- tokenizer and model


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = tiny_tokenizer()
    ids = tok("sum 07:", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7  # 's','u','m',' ','0','7',':'
    assert tok.decode(ids) == "sum 07:"
    assert tok.decode([*ids[4:6], tok.eos_token_id], skip_special_tokens=True) == "07"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS


def test_tiny_model_is_a_function_of_the_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = tiny_model(seed=0, **SMALL), tiny_model(seed=0, **SMALL), tiny_model(seed=1, **SMALL)
    assert torch.equal(torch.get_rng_state(), before)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_model_and_tokenizer_save_and_load_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("sum 12:", add_special_tokens=False)["input_ids"]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id
    # AutoTokenizer picks Qwen2Tokenizer from config.json (model_type qwen2); a vocab it does
    # not understand loses the spaces ("sum 12: a b" -> "sum12:ab"), so compare ids exactly.
    text = "sum 12: a b"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"]) == text


# ---------------------------------------------------------------- rollouts


def test_response_mask_keeps_tokens_up_to_and_including_first_eos():
    eos = 2
    response = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool
    )  # a bug masking the EOS itself would give row 0 = [1,1,0,0,0]
    assert torch.equal(response_mask_after_eos(response, eos), expected)


def test_generate_groups_masks_and_padding():
    torch.manual_seed(0)
    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    prompts = digitsum_prompts(3, seed=0)
    r = generate(model, tok, prompts, group_size=4, max_new_tokens=5)
    assert len(r) == 12 and r.prompt_len == 7
    assert [p["prompt"] for p in r.prompts] == [p["prompt"] for p in prompts for _ in range(4)]
    T = r.input_ids.shape[1] - r.prompt_len
    assert r.response_mask.shape == (12, T) and T <= 5
    resp = r.input_ids[:, r.prompt_len :]
    # everything after the first EOS is pad and masked, in ids and in the attention mask
    assert torch.all(resp[~r.response_mask] == tok.pad_token_id)
    assert torch.equal(r.attention_mask[:, r.prompt_len :].bool(), r.response_mask)
    for i in range(12):
        kept = resp[i][r.response_mask[i]].tolist()
        text = tok.decode([t for t in kept if t != tok.eos_token_id], skip_special_tokens=True)
        assert r.completions[i] == text


def test_greedy_generation_is_deterministic():
    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    prompts = digitsum_prompts(4, seed=1)
    a = generate(model, tok, prompts, group_size=1, max_new_tokens=4, greedy=True)
    torch.manual_seed(999)
    b = generate(model, tok, prompts, group_size=1, max_new_tokens=4, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids)


# ---------------------------------------------------------------- rewards and data


def test_digitsum_reward_by_hand():
    targets = [17, 17, 17, 5, 5, 5]
    completions = ["98", "9", "abc", "5", "5a", ""]
    # "98": sum 17, all digits -> 0.9*1 + 0.1 = 1.0
    # "9": |9-17| = 8 -> 0.9*(1-0.8) + 0.1 = 0.28
    # "abc", "": no digits -> 0
    # "5a": half digits, exact -> 0.5 * 1.0 = 0.5
    expected = [1.0, 0.28, 0.0, 1.0, 0.5, 0.0]
    got = digitsum_reward(None, completions, target=targets)
    assert got == pytest.approx(expected, abs=1e-12)


def test_data_order_is_a_pure_function_of_seed_and_position():
    pool = [{"prompt": str(i)} for i in range(10)]
    straight = prompts_at(pool, 3, 0, 25)
    pieces = prompts_at(pool, 3, 0, 7) + prompts_at(pool, 3, 7, 11) + prompts_at(pool, 3, 18, 7)
    assert pieces == straight
    # each epoch is a permutation: no prompt skipped or repeated within 10 positions
    assert sorted(p["prompt"] for p in straight[:10]) == sorted(p["prompt"] for p in pool)
    assert sorted(p["prompt"] for p in straight[10:20]) == sorted(p["prompt"] for p in pool)
    assert straight[:10] != straight[10:20]  # reshuffled per epoch
    assert prompts_at(pool, 4, 0, 10) != straight[:10]  # the seed matters


def test_held_out_prompts_are_fixed():
    _, held_a, _ = build_task(task="digitsum", prompts_file=None, reward=None, eval_size=8, seed=0)
    _, held_b, _ = build_task(task="digitsum", prompts_file=None, reward=None, eval_size=8, seed=0)
    assert held_a == held_b and len(held_a) == 8


def test_prompts_file_fields_reach_the_reward(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"prompt": "sum {t:02d}:", "target": {t}}}\n' for t in range(1, 21)))
    rows = load_prompts_file(path)
    assert rows[3] == {"prompt": "sum 04:", "target": 4}
    seen = {}

    def reward(prompts, completions, target):
        seen.update(prompts=prompts, target=target)
        return [0.5] * len(prompts)

    assert score(reward, rows[:2], ["1", "2"]) == [0.5, 0.5]
    assert seen == {"prompts": ["sum 01:", "sum 02:"], "target": [1, 2]}


def test_prompts_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2 .*\"prompt\""):
        load_prompts_file(path)


ROWS = [{"prompt": "sum 03:", "target": 3}, {"prompt": "sum 09:", "target": 9}]


def test_reward_that_raises_names_the_failing_sample():
    def bad(prompts, completions, target):
        return [1.0 / (t - 9) for t in target]  # the second sample divides by zero

    with pytest.raises(RewardError, match=r"raised ZeroDivisionError.* sample index 1 "
                       r"\(prompt 'sum 09:', completion '2'\)"):  # fmt: skip
        score(bad, ROWS, ["1", "2"])


def test_reward_that_fails_only_on_the_batch_says_so():
    def batch_only(prompts, completions, **_):
        if len(prompts) > 1:
            raise RuntimeError("needs one at a time")
        return [0.0]

    with pytest.raises(RewardError, match=r"the batch of 2 \(no single sample fails alone\)"):
        score(batch_only, ROWS, ["1", "2"])


@pytest.mark.parametrize("value", [math.nan, math.inf, "x", None])
def test_non_finite_reward_names_sample_index_and_prompt(value):
    with pytest.raises(RewardError, match=r"sample index 1 \(prompt 'sum 09:'.*finite"):
        score(lambda p, c, **_: [0.0, value], ROWS, ["1", "2"])


def test_wrong_reward_count_is_reported():
    with pytest.raises(RewardError, match=r"returned 1 values for 2 completions"):
        score(lambda p, c, **_: [0.0], ROWS, ["1", "2"])


# ---------------------------------------------------------------- log-probs and update


def test_response_logprobs_line_up_with_the_response_tokens(monkeypatch):
    torch.manual_seed(0)
    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    r = generate(model, tok, digitsum_prompts(2, 0), group_size=3, max_new_tokens=5)
    import gspo.causal_lm as causal_lm
    import gspo.chunked as chunked

    projected, inner = [], chunked._chunk_logits
    monkeypatch.setattr(chunked, "_chunk_logits",
                        lambda h, *a: projected.append(h.shape[0]) or inner(h, *a))  # fmt: skip
    logp, ent = response_logprobs(causal_lm.CausalLMLogprobs(model), r, temperature=1.0,
                                  entropy=True)  # fmt: skip
    # the LM head ran on response tokens only, never on the 7 prompt positions per row
    assert sum(projected) == int(r.response_mask.sum()) < r.attention_mask[:, 1:].sum()
    # naive: full logits, position P-1+t predicts response token t
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits
    lsm = torch.log_softmax(logits.float(), -1)[:, r.prompt_len - 1 : -1]
    resp = r.input_ids[:, r.prompt_len :]
    naive = lsm.gather(-1, resp[..., None]).squeeze(-1)
    m = r.response_mask
    assert torch.allclose(logp[m], naive[m], atol=1e-5)
    assert torch.all(logp[~m] == 0)
    assert torch.all(ent[m] > 0)


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0, 7.0]])
    mask = torch.tensor([[True, True, False]])
    assert k3_kl(logp, logp.clone(), mask).item() == 0.0
    ref = torch.tensor([[-1.5, -2.0, float("nan")]])  # garbage in the masked slot
    # d = [-0.5, 0]; k3 = exp(-0.5) + 0.5 - 1 = 0.10653; mean over 2 tokens = 0.053265
    assert k3_kl(logp, ref, mask).item() == pytest.approx((math.exp(-0.5) - 0.5) / 2, abs=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 25))


def test_update_moves_the_ratio_off_one_and_clips():
    torch.manual_seed(0)
    from gspo.advantages import advantages
    from gspo.causal_lm import CausalLMLogprobs

    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    config = TrainConfig(minibatches=4, prompts_per_step=4, group_size=4, lr=1e-2, warmup_steps=0)
    r = generate(model, tok, digitsum_prompts(4, 0), group_size=4, max_new_tokens=5)
    rewards = torch.arange(16, dtype=torch.float32) % 5  # distinct rewards: no zero advantage
    adv = advantages(rewards, group_size=4)
    lp = CausalLMLogprobs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 4, 0.1))
    before = [p.detach().clone() for p in model.parameters()]
    history = update(lp, None, opt, sched, r, adv, config=config)
    assert len(history) == 4
    assert history[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first slice: on-policy
    assert history[0]["clip_frac_low"] + history[0]["clip_frac_high"] == 0.0
    later = history[1:]
    assert any(abs(h["ratio_mean"] - 1) > 1e-4 for h in later)
    assert any(h["clip_frac_low"] + h["clip_frac_high"] > 0 for h in later)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sched.get_last_lr()[0] < config.lr


def test_chat_template_is_applied_when_present():
    from gspo.train.rollout import render_prompt

    tok = tiny_tokenizer()
    assert render_prompt(tok, "sum 07:") == "sum 07:"  # no template: the raw prompt
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>"
    assert render_prompt(tok, "sum 07:") == "<user>sum 07:>"


def test_left_padding_does_not_change_response_logprobs():
    """Prompts of different lengths are left-padded; generate() and the log-prob forward
    both number positions from the first real token (position_ids from the attention mask),
    so each row must score exactly as it does unpadded. (Absolute positions: the GPT-2 test
    in test_logprobs.py.)"""
    torch.manual_seed(0)
    from gspo.causal_lm import CausalLMLogprobs

    model, tok = tiny_model(seed=0, **SMALL), tiny_tokenizer()
    prompts = [{"prompt": "sum 7:"}, {"prompt": "a much longer prompt:"}]
    r = generate(model, tok, prompts, group_size=2, max_new_tokens=4)
    lp = CausalLMLogprobs(model)
    logp, _ = response_logprobs(lp, r, temperature=1.0)
    for i in range(len(r)):
        pad = int((r.attention_mask[i, : r.prompt_len] == 0).sum())
        alone = r.select(slice(i, i + 1))
        alone.input_ids = alone.input_ids[:, pad:]
        alone.attention_mask = alone.attention_mask[:, pad:]
        alone.prompt_len = r.prompt_len - pad
        single, _ = response_logprobs(lp, alone, temperature=1.0)
        assert torch.allclose(single[0], logp[i], atol=1e-5), i
    assert (r.attention_mask[:, : r.prompt_len] == 0).any()  # the test did pad something
