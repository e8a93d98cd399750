"""The warm start (gspo.train.warmstart): worked episodes rendered as rollouts render them,
the loss on the assistant's tokens only, a step that raises their likelihood, the trainer's
use of it (new runs only), and the calculator's worked episodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train import warmstart
from gspo.train.config import TrainConfig
from gspo.train.distributed import World
from gspo.train.episodes import PLAIN_SEPARATOR, Turns
from gspo.train.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, rows) -> str:
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _episode(*pairs) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in pairs]}


@pytest.mark.parametrize(("row", "why"), [
    ("{not json", "line 1: not JSON"),
    ({"prompt": "x"}, "line 1: needs"),
    (_episode(("user", "q"), ("robot", "a")), "each message needs a role"),
    (_episode(("assistant", "a")), "roles"),
    (_episode(("user", "q")), "roles"),
    (_episode(("user", "q"), ("assistant", "a"), ("user", "more")), "roles"),
    (_episode(("user", "q"), ("assistant", "a"), ("assistant", "b")), "roles"),
    (_episode(("user", "q"), ("system", "s"), ("assistant", "a")), "optional system message"),
    (_episode(("user", "q"), ("assistant", "a"), ("system", "s"), ("assistant", "b")),
     r"got roles \['user', 'assistant', 'system', 'assistant'\]"),
])  # fmt: skip
def test_bad_episodes_are_refused_naming_the_line(tmp_path, row, why):
    with pytest.raises(ValueError, match=why):
        warmstart.load(_write(tmp_path, [row]))


def test_missing_empty_and_binary_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        warmstart.load(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no episodes"):
        warmstart.load(_write(tmp_path, [""]))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="binary.jsonl: not UTF-8 text"):
        warmstart.load(str(binary))


def test_plain_text_episode_masks_exactly_the_assistant_tokens():
    tok = tiny_tokenizer()  # no chat template: turns are plain text
    eos = [tok.eos_token_id]
    turns = Turns(tok, None, eos)
    episode = _episode(("user", "sum 07:"), ("assistant", "4"), ("user", "again"),
                       ("assistant", "7"))["messages"]  # fmt: skip
    ids, mask = warmstart.encode(episode, turns, warmstart.end_of_turn_id(turns, eos))
    first = turns.first_ids(["sum 07:"])[0]
    four = tok("4", add_special_tokens=False)["input_ids"] + eos
    env = tok(f"{PLAIN_SEPARATOR}again{PLAIN_SEPARATOR}", add_special_tokens=False)["input_ids"]
    seven = tok("7", add_special_tokens=False)["input_ids"] + eos
    assert ids == first + four + env + seven
    assert mask == [False] * len(first) + [True] * len(four) + [False] * len(env) + \
        [True] * len(seven)  # fmt: skip


def test_chat_template_episode_is_the_rollouts_rendering(smollm2_chat):
    """SmolLM2's template: a worked calculator episode's ids decode to the template's
    rendering of the whole conversation, and the mask covers each reply and its
    <|im_end|>, the token the model writes to end a turn."""
    from gspo.train.envs.calculator import SYSTEM_PROMPT

    _, tok, eos = smollm2_chat
    turns = Turns(tok, SYSTEM_PROMPT, eos)
    end = warmstart.end_of_turn_id(turns, eos)
    assert tok.decode([end]) == "<|im_end|>"
    messages = _episode(("user", "What is 2+3?"), ("assistant", "<calc>2+3</calc>"),
                        ("user", "2+3 = 5"), ("assistant", "Answer: 5"))["messages"]  # fmt: skip
    ids, mask = warmstart.encode(messages, turns, end)
    whole = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, *messages],
                                    tokenize=False)  # fmt: skip
    assert tok.decode(ids) == whole.rstrip("\n")  # the template adds a newline after the end
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == \
        "<calc>2+3</calc><|im_end|>Answer: 5<|im_end|>"  # fmt: skip


def _encoded(n=8):
    tok = tiny_tokenizer()
    turns = Turns(tok, None, [tok.eos_token_id])
    episodes = [_episode(("user", f"sum {i}{i + 1}:"), ("assistant", str(2 * i + 1)))["messages"]
                for i in range(n)]  # fmt: skip
    return [warmstart.encode(e, turns, tok.eos_token_id) for e in episodes], tok


def _nll(logprobs, encoded, pad_id) -> float:
    with torch.no_grad():
        loss, _ = warmstart._batch_loss(logprobs, encoded, pad_id, torch.device("cpu"))
    return float(loss)


def test_the_loss_is_the_assistant_tokens_nll_and_ignores_padding():
    encoded, tok = _encoded()
    model = tiny_model(layers=1, hidden=32, seed=0)
    logprobs = CausalLMLogprobs(model)
    want = []
    for ids, mask in encoded:  # one at a time: no padding at all
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        picked = logp.gather(-1, x[0, 1:, None])[:, 0]
        want += picked[torch.tensor(mask[1:])].tolist()
    expected = -sum(want) / len(want)
    for pad in (tok.pad_token_id, 3, 51):  # what fills the padding does not matter
        assert _nll(logprobs, encoded, pad) == pytest.approx(expected, rel=1e-5)


def test_common_prefix_counts_the_ids_every_sequence_begins_with():
    assert warmstart.common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert warmstart.common_prefix([[1, 2], [1, 2]]) == 2
    assert warmstart.common_prefix([[5], [1, 2]]) == 0


@pytest.mark.parametrize("pad", [0, 51])
def test_a_shared_system_prompt_runs_once_with_the_same_loss_and_gradients(pad, float64_norm):
    # The episodes share a long system prompt (as the tools' schemas are): packed, it runs
    # once per batch (gspo.prefix); the loss and every gradient equal the plain forward's,
    # whatever fills the padding (float64; conftest.float64_norm says why the norm is patched).
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    turns = Turns(tok, "You answer sums. Think of the digits, then add them. " * 3,
                  [tok.eos_token_id])  # fmt: skip
    encoded = [warmstart.encode(_episode(("user", f"sum {i}{3 * i}:"),
                                         ("assistant", str(4 * i + 3 * i % 7)))["messages"],
                                turns, tok.eos_token_id) for i in range(6)]  # fmt: skip
    shared = warmstart.common_prefix([ids for ids, _ in encoded])
    assert shared > 20 and len({len(ids) for ids, _ in encoded}) > 1  # a prefix, and padding
    results = []
    for packed in (False, True):
        logprobs = CausalLMLogprobs(tiny_model(layers=2, hidden=32, seed=0).double(),
                                    prefix_attention="dense")  # fmt: skip
        loss, tokens = warmstart._batch_loss(logprobs, encoded, pad, torch.device("cpu"),
                                             shared_prefix=packed)  # fmt: skip
        loss.backward()
        assert logprobs.attention_used == ("dense" if packed else None)
        results.append((loss, tokens, {n: p.grad for n, p in logprobs.named_parameters()}))
    (plain, n_plain, g_plain), (packed, n_packed, g_packed) = results
    assert n_plain == n_packed
    torch.testing.assert_close(packed, plain, rtol=1e-12, atol=1e-12)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_packed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_warm_start_raises_the_likelihood_of_the_worked_replies():
    encoded, tok = _encoded()
    torch.manual_seed(0)
    logprobs = CausalLMLogprobs(tiny_model(layers=1, hidden=32, seed=0))
    before = _nll(logprobs, encoded, tok.pad_token_id)
    config = warmstart.WarmStartConfig(warm_start="x", warm_start_epochs=3, warm_start_lr=1e-3)
    losses = warmstart.run(logprobs, list(encoded), config, world=World(), seed=0,
                           max_grad_norm=1.0, pad_id=tok.pad_token_id, log=lambda *_: None)  # fmt: skip
    after = _nll(logprobs, encoded, tok.pad_token_id)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert after < before - 0.1, (before, after)


def test_options_are_checked_and_refused_with_the_kl_penalty():
    with pytest.raises(ValueError, match="add --warm-start FILE"):
        TrainConfig(warm_start_epochs=3)  # would silently do nothing
    assert TrainConfig(warm_start="./a/../demos.jsonl").warm.warm_start == "demos.jsonl"
    with pytest.raises(ValueError, match="warm_start_epochs"):
        TrainConfig(warm_start_epochs=0)
    with pytest.raises(ValueError, match="warm_start_lr"):
        TrainConfig(warm_start_lr=0.0)
    with pytest.raises(ValueError, match="--kl-coef 0"):
        TrainConfig(warm_start="demos.jsonl", kl_coef=0.1)


def _gspo(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gspo", "train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_run_warm_starts_once_and_not_on_resume(tmp_path):
    rows = [_episode(("user", f"sum {i}{i}:"), ("assistant", str(2 * i))) for i in range(10)]
    demos = _write(tmp_path, rows)
    common = ["--steps", "2", "--warm-start", demos, "--warm-start-lr", "1e-3",
              "--checkpoint-every", "1", "--eval-every", "1", "--no-progress"]  # fmt: skip
    run = _gspo(*common, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("warm start: epoch") + run.stderr.count("warm start: epoch") == 2
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["warm_start_loss"] > 0
    again = _gspo("--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress",
                  cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "warm start" not in again.stdout + again.stderr


@pytest.mark.parametrize(("row", "why"), [
    ({"messages": []}, "needs"),
    # the tiny model has no chat template: one plain first message only
    (_episode(("user", "a"), ("user", "b"), ("assistant", "c")), "no chat template"),
    (_episode(("user", "sum 12:"), ("assistant", "3 " * 300)), "past the model's 128 positions"),
])  # fmt: skip
def test_a_bad_file_is_exit_2_naming_its_line(tmp_path, row, why):
    bad = _write(tmp_path, [_episode(("user", "sum 11:"), ("assistant", "2")), row])
    run = _gspo("--steps", "1", "--warm-start", bad, "--run-dir", str(tmp_path / "r"),
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"--warm-start {bad}, line 2" in run.stderr and why in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_calculator_worked_episodes_are_right_and_the_example_file_is_current():
    from gspo.train.envs.calculator import worked_episode
    from gspo.train.tasks.arith import arith_prompts

    for row in arith_prompts(600, seed=3) + arith_prompts(200, seed=4, split="test"):
        messages = worked_episode(row)["messages"]
        assert messages[-1]["content"] == f"Answer: {row['answer']}", row
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import calculator_demos
    finally:
        sys.path.pop(0)
    written = (REPO / "examples" / "calculator-demos.jsonl").read_text().splitlines()
    assert written == calculator_demos.lines()
    warmstart.load(str(REPO / "examples" / "calculator-demos.jsonl"))  # a valid file


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_warm_start_on_their_shares(tmp_path, fsdp):
    """Under torchrun (2 gloo ranks, DDP or FSDP2) each rank takes half the episodes (the
    same number of steps, as FSDP2's collectives need) and the reported loss is over both
    ranks' tokens; the run then trains as usual."""
    from test_train_distributed import TINY, torchrun

    rows = [_episode(("user", f"sum {i}{i}:"), ("assistant", str(2 * i))) for i in range(10)]
    demos = _write(tmp_path, rows)
    done = torchrun([*TINY, "--steps", "2", "--warm-start", demos, "--warm-start-lr", "1e-3",
                     *(["--fsdp"] if fsdp else []), "--run-dir", str(tmp_path / "run")],
                    tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("warm start: epoch") == 2  # rank 0 only
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["warm_start_loss"] > 0
