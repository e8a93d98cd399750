"""Prompts and rewards as users bring them: prompts that do not fit the model, JSONL with a
byte order mark or chat messages, system prompts, rewards imported from the working
directory, several weighted rewards, and the start-up warnings."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from types import SimpleNamespace

import pytest

from gspo.train.config import TrainConfig, TrainWarning
from gspo.train.data import fit_prompts, start_warnings
from gspo.train.models import position_limit
from gspo.train.rewards import Rewards, import_reward, load_rewards, score
from gspo.train.rollout import render_prompt
from gspo.train.tasks import build_task, load_prompts_file
from gspo.train.tiny import tiny_model, tiny_tokenizer

# ---------------------------------------------------------------- prompts that fit the model


def prompts(*texts):
    return [{"prompt": t} for t in texts]


def fake_model(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_position_limit_reads_llama_and_gpt2_names():
    assert position_limit(tiny_model(layers=1, hidden=32)) == 128  # max_position_embeddings
    assert position_limit(fake_model(n_positions=256)) == 256  # GPT-2's name
    assert position_limit(fake_model()) is None


def test_a_prompt_past_the_model_positions_is_an_error_before_the_first_step():
    """The bug: a 400-word prompt on a 256-position GPT-2 died in torch's embedding lookup
    (IndexError). One character = one token here: 30 + 6 new tokens > 32 positions."""
    tok, model = tiny_tokenizer(), fake_model(n_positions=32)
    pool, held = prompts("sum 01:", "a" * 30), prompts("sum 02:")
    config = TrainConfig(max_new_tokens=6)
    with pytest.raises(ValueError, match=r"prompt of 30 tokens .* exceeds the model's 32 positions"
                                         r"; --max-prompt-tokens 26 drops"):  # fmt: skip
        fit_prompts(pool, held, tok, model, config)
    # 26 + 6 = 32 fits exactly
    fit_prompts(prompts("a" * 26, "b"), held, tok, model, config)


def test_max_prompt_tokens_drops_longer_prompts_and_counts_them():
    tok, model = tiny_tokenizer(), fake_model(n_positions=32)
    pool, held = prompts("sum 01:", "a" * 30, "b" * 11), prompts("sum 02:", "c" * 12)
    config = TrainConfig(max_new_tokens=6, max_prompt_tokens=10, prompts_per_step=1)
    kept, kept_held, dropped, _ = fit_prompts(pool, held, tok, model, config)
    assert (kept, kept_held, dropped) == (prompts("sum 01:"), prompts("sum 02:"), 3)
    with pytest.warns(TrainWarning, match="dropped 3 longer prompts"):
        start_warnings(config, len(kept), dropped)
    with pytest.raises(ValueError, match="leaves 0 to train on"):
        fit_prompts(pool, held, tok, model, TrainConfig(max_prompt_tokens=3))


def test_lengths_count_the_chat_template_and_system_prompt():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>"
    model = fake_model(n_positions=32)
    # "<user>ab>" is 9 tokens; with the system prompt "<system>xyz<user>ab>" is 20
    _, _, dropped, _ = fit_prompts(prompts("ab", "cd"), prompts("ef"), tok, model,
                                TrainConfig(max_prompt_tokens=9, max_new_tokens=1))  # fmt: skip
    assert dropped == 0
    with pytest.raises(ValueError, match="leaves 0 to train on"):
        fit_prompts(prompts("ab", "cd"), prompts("ef"), tok, model,
                    TrainConfig(max_prompt_tokens=19, max_new_tokens=1, system_prompt="xyz"))  # fmt: skip


# ---------------------------------------------------------------- start-up warnings


def test_fewer_prompts_than_a_step_and_steps_below_warmup_warn():
    config = TrainConfig(prompts_per_step=16, steps=5, warmup_steps=10)
    with pytest.warns(TrainWarning) as record:
        start_warnings(config, pool_size=6)
    text = " ".join(str(w.message) for w in record)
    assert "only 6 training prompts for --prompts-per-step 16" in text
    assert "--steps 5 < --warmup-steps 10" in text and "never reaches --lr 0.001" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainWarning)  # nothing to warn about: no warning
        start_warnings(TrainConfig(steps=10, warmup_steps=10), pool_size=16)


# ---------------------------------------------------------------- prompt files


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "x": 1}\n{"prompt": "b", "x": 2}\n')
    assert load_prompts_file(path) == [{"prompt": "a", "x": 1}, {"prompt": "b", "x": 2}]


def test_prompts_file_with_chat_messages(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "text"}) + "\n")
    assert load_prompts_file(path)[0]["prompt"] == chat
    path.write_text(json.dumps({"prompt": [{"role": "user"}]}) + '\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"line 1 .*list of chat messages"):
        load_prompts_file(path)


def test_render_chat_messages_and_system_prompt():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert render_prompt(tok, "hi", "sys") == "hi"  # no template: the text as it is
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>"
    assert render_prompt(tok, "hi") == "<user>hi>"
    assert render_prompt(tok, "hi", "be brief") == "<system>be brief<user>hi>"
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]
    assert render_prompt(tok, own, "be brief") == "<system>mine<user>hi>"  # theirs is kept
    assert render_prompt(tok, own[1:], "be brief") == "<system>be brief<user>hi>"


# ---------------------------------------------------------------- rewards


def test_reward_module_in_the_working_directory_imports(tmp_path, monkeypatch):
    """The console script `gspo` does not put the working directory on sys.path (python -m
    does); --reward must import from it all the same."""
    (tmp_path / "cwd_rewards_mod.py").write_text("def score(p, c):\n    return [1.0] * len(p)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    sys.modules.pop("cwd_rewards_mod", None)
    assert import_reward("cwd_rewards_mod:score")(["a"], ["b"]) == [1.0]
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_mod'.*run from the"):
        import_reward("no_such_mod:score")


def length(prompts, completions):
    return [float(len(c)) for c in completions]


def digits(prompts, completions):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def test_several_rewards_are_summed_with_weights_and_kept_apart():
    me = __name__
    rewards = load_rewards([f"{me}:length", f"{me}:digits"], [1.0, 0.2])
    assert isinstance(rewards, Rewards) and rewards.names == ("length", "digits")
    out = score(rewards, prompts("p", "q"), ["ab1", "2345"])
    # 1 * 3 + 0.2 * 1 = 3.2 ; 1 * 4 + 0.2 * 4 = 4.8
    assert out == [pytest.approx(3.2), pytest.approx(4.8)]
    assert out.parts == {"length": [3.0, 4.0], "digits": [1.0, 4.0]}
    assert load_rewards([f"{me}:length"], []) is length  # one reward: no wrapper, no parts
    same = load_rewards([f"{me}:length", f"{me}:length"], [])
    assert same.names == (f"{me}:length", f"{me}:length") and same.weights == (1.0, 1.0)


def test_a_failing_reward_among_several_is_named():
    from gspo.train.rewards import RewardError

    def broken(prompts, completions):
        return [math.nan] * len(prompts)

    both = Rewards((length, broken), (1.0, 1.0), ("length", "broken"))
    with pytest.raises(RewardError, match="reward function .*broken returned nan"):
        score(both, prompts("p"), ["a"])


def test_build_task_takes_a_list_of_rewards(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(20)))
    pool, held, fn = build_task(task="digitsum", prompts_file=str(path),
                                reward=(f"{__name__}:length", f"{__name__}:digits"),
                                reward_weights=(2.0, 1.0), eval_size=4, seed=0)  # fmt: skip
    assert len(pool) == 18 and len(held) == 2 and fn.weights == (2.0, 1.0)
