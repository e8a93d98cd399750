"""`gspo train` end to end at tiny sizes: outputs, --model PATH, user rewards that fail,
and resume equivalence (N steps + stop + resume + M steps == N + M straight steps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main, parse_config
from gspo.train.loop import train

TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "2", "--no-progress"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def test_few_steps_write_every_output(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "3", "--checkpoint-every", "2", "--run-dir", str(run)]) == 0
    metrics = rows(run)
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]
    assert metrics[0]["eval_reward"] <= 0.3  # a random model cannot do the task
    for key in ("reward_mean", "reward_std", "loss", "clip_frac_low", "clip_frac_high",
                "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "entropy",
                "response_len", "step_time", "tokens_per_s", "lr"):  # fmt: skip
        assert all(key in r for r in metrics[1:]), key
    assert "eval_reward" in metrics[2] and "eval_reward" in metrics[3]  # every 2, and the end
    assert (run / "reward.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000003"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # staging dirs renamed away
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok.decode(tok("sum 09:")["input_ids"]) == "sum 09:"
    assert torch.equal(model.state_dict()["model.norm.weight"], weights(run)["model.norm.weight"])


def test_keep_last_k_checkpoints(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    assert main([*args, "--no-plot", "--run-dir", str(run)]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-000003", "step-000004"]


def test_model_path_loads_a_local_hf_model(tmp_path):
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "my-model"
    tiny_model(layers=1, hidden=32, seed=5).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    run = tmp_path / "run"
    code = main([*TINY, "--steps", "2", "--no-plot", "--model", str(src), "--run-dir", str(run)])
    assert code == 0
    start = load_file(src / "model.safetensors")
    trained = weights(run)
    assert set(start) == set(trained)
    assert not torch.equal(start["model.norm.weight"], trained["model.norm.weight"])


def test_model_path_that_is_not_a_directory(tmp_path, capsys):
    assert main([*TINY, "--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path)]) == 2
    assert "never downloads" in capsys.readouterr().err


REWARD_MODULE = """
import math
CALLS = []

def raises_on_third_call(prompts, completions, target):
    CALLS.append(1)
    if len(CALLS) == 3:
        raise ZeroDivisionError("bad sample")
    return [0.5] * len(prompts)

def nan_for_sample_2(prompts, completions, target):
    return [math.nan if i == 2 else 0.1 for i in range(len(prompts))]
"""


def user_rewards(tmp_path, monkeypatch, module: str, source: str):
    """``source`` importable as ``module`` from ``tmp_path`` (as --reward imports it), and a
    prompts file of 40 digit-sum rows with their targets; returns the file."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sum {t:02d}:", "target": t}) + "\n"
                            for t in range(1, 41)))  # fmt: skip
    return path


@pytest.fixture
def prompts_and_module(tmp_path, monkeypatch):
    return user_rewards(tmp_path, monkeypatch, "user_rewards", REWARD_MODULE)


def test_reward_that_raises_stops_with_checkpoint(tmp_path, prompts_and_module, capsys):
    run = tmp_path / "run"
    args = [
        *TINY,
        "--steps",
        "5",
        "--eval-every",
        "10",
        "--checkpoint-every",
        "10",
        "--no-plot",
        "--prompts",
        str(prompts_and_module),
        "--reward",
        "user_rewards:raises_on_third_call",
    ]
    # calls: 1 = step-0 eval, 2 = step 1, 3 = step 2 -> raises; the state after step 1 is saved
    assert main([*args, "--run-dir", str(run)]) == 3
    err = capsys.readouterr().err
    assert "raised ZeroDivisionError: bad sample" in err
    assert "the batch of 16 (no single sample fails alone)" in err  # it failed on call 3 only
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]


def test_non_finite_reward_names_the_sample(tmp_path, prompts_and_module, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--steps", "3", "--no-plot", "--prompts", str(prompts_and_module),
            "--reward", "user_rewards:nan_for_sample_2", "--run-dir", str(run)]  # fmt: skip
    assert main(args) == 3
    assert "nan for sample index 2 (prompt 'sum" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["step-000000"]


def test_resume_equals_straight_run_from_sharded_safetensors(tmp_path):
    common = [*TINY, "--steps", "6", "--checkpoint-every", "10", "--no-plot", "--seed", "3"]
    straight = tmp_path / "straight"
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    stopped = tmp_path / "stopped"
    summary = train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=3)
    assert summary["finished"] is False and summary["step"] == 3
    assert [p.name for p in list_checkpoints(stopped)] == ["step-000003"]
    # resume reads sharded safetensors too (what save_pretrained writes for large models)
    from transformers import AutoModelForCausalLM

    saved = list_checkpoints(stopped)[0]
    AutoModelForCausalLM.from_pretrained(saved).save_pretrained(saved, max_shard_size="20KB")
    (saved / "model.safetensors").unlink()
    assert len(list(saved.glob("model-*-of-*.safetensors"))) >= 3
    assert main(["--resume", str(stopped)]) == 0
    a, b = weights(straight), weights(stopped)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # same prompts and samples step by step: identical rewards and losses, no gap or repeat
    ra, rb = rows(straight), rows(stopped)
    assert [r["step"] for r in rb] == list(range(7))
    for x, y in zip(ra, rb, strict=True):
        assert x.get("reward_mean") == y.get("reward_mean")
        assert x.get("eval_reward") == y.get("eval_reward")


def test_sigterm_checkpoints_and_resume_matches(tmp_path):
    common = [*TINY, "--steps", "40", "--eval-every", "100", "--checkpoint-every", "100",
              "--no-plot", "--seed", "1"]  # fmt: skip
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gspo", "train", *common, "--run-dir",
                             str(killed)], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(rows(killed)) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    saved = list_checkpoints(killed)
    if proc.returncode == 0:  # finished before the signal arrived: nothing to test here
        pytest.skip("the run finished before SIGTERM")
    assert proc.returncode == 130, err
    assert len(saved) == 1 and 1 <= int(saved[0].name.split("-")[1]) < 40
    assert "--resume" in err
    assert main(["--resume", str(killed)]) == 0
    straight = tmp_path / "straight"
    assert main([*common, "--run-dir", str(straight)]) == 0
    a, b = weights(straight), weights(killed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "extra, key",
    [(["--kl-coef", "0.1"], "kl_ref"), (["--loss", "grpo"], "loss"),
     (["--loss", "gspo-token", "--task", "copy"], "loss"),
     (["--dtype", "bf16", "--max-tokens-per-microbatch", "24", "--grad-checkpointing",
       "--kl-coef", "0.1"], "kl_ref"),
     (["--old-logprobs", "sampler"], "mismatch_k3"),
     (["--rollout-correction", "token-tis", "--loss", "grpo"], "correction_frac"),
     (["--rollout-correction", "token-tis", "--loss", "grpo",
       "--max-tokens-per-microbatch", "24"], "correction_frac")],
    ids=["kl", "grpo", "gspo-token-copy", "bf16-microbatches-checkpointing",
         "sampler-old-logprobs", "token-tis", "token-tis-microbatches"],
)  # fmt: skip
def test_loss_variants_and_kl_run(tmp_path, extra, key):
    run = tmp_path / "run"
    assert main([*TINY, *extra, "--steps", "2", "--no-plot", "--run-dir", str(run)]) == 0
    metrics = rows(run)[1:]
    assert all(key in r and r[key] == r[key] for r in metrics)  # present and not NaN
    if key == "kl_ref":
        # step 1 samples from the reference itself, so its KL is 0 before the first update;
        # the later minibatches have moved away from it
        assert all(r["kl_ref"] >= 0 for r in metrics) and metrics[-1]["kl_ref"] > 0


FLAKY_MODULE = """
CALLS = []

def score(prompts, completions, target):
    return [0.1 * (len(c) % 7) + 0.01 * t for c, t in zip(completions, target)]

def fails_once(prompts, completions, target):
    CALLS.append(1)
    if len(CALLS) == 3:  # 1 = step-0 eval, 2 = step 1, 3 = step 2
        raise RuntimeError("transient")
    return score(prompts, completions, target)
"""


def test_resume_after_a_reward_error_equals_a_run_without_it(tmp_path, monkeypatch):
    """A failing reward loses only the step it failed in: the checkpoint holds the state
    (RNG included) that step started from, so the resumed run matches a clean one."""
    (tmp_path / "flaky.py").write_text(FLAKY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flaky", None)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sum {t:02d}:", "target": t}) + "\n"
                            for t in range(1, 41)))  # fmt: skip
    common = [*TINY, "--steps", "4", "--eval-every", "10", "--checkpoint-every", "10",
              "--no-plot", "--prompts", str(path)]  # fmt: skip
    clean, failed = tmp_path / "clean", tmp_path / "failed"
    assert main([*common, "--reward", "flaky:score", "--run-dir", str(clean)]) == 0
    assert main([*common, "--reward", "flaky:fails_once", "--run-dir", str(failed)]) == 3
    assert [p.name for p in list_checkpoints(failed)] == ["step-000001"]
    assert main(["--resume", str(failed)]) == 0  # CALLS is past 3: no second failure
    a, b = weights(clean), weights(failed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, capsys):
    assert main([*TINY, "--fsdp", "--run-dir", str(tmp_path / "run")]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


# ---------------------------------------------------------------- a user's own GPT-2 (issue 12)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 as users have them: dropout 0.1 in its config, 32 positions, saved with
    the character tokenizer (no chat template)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gspo.train.tiny import VOCAB, tiny_tokenizer

    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-dropout"])
def test_on_policy_ratio_is_exactly_one_with_dropout_off(tmp_path, gpt2_dir, keep):
    """One minibatch per step is exactly on-policy: the ratio must be 1 and nothing clipped.
    The bug: dropout stayed on, ratios ranged 0.96-1.05 and 44% of sequences were clipped by
    dropout noise alone. --keep-dropout brings that back (which is how this test can fail)."""
    run = tmp_path / "run"
    args = [*TINY, "--minibatches", "1", "--steps", "1", "--no-plot", "--model", str(gpt2_dir),
            "--run-dir", str(run), *(["--keep-dropout"] if keep else [])]  # fmt: skip
    assert main(args) == 0
    step = rows(run)[1]
    if keep:
        assert step["ratio_max"] - step["ratio_min"] > 1e-3
    else:
        assert step["ratio_min"] == step["ratio_max"] == 1.0 and step["clip_frac"] == 0.0


def test_prompt_past_gpt2_positions_exits_2_at_start(tmp_path, gpt2_dir, capsys):
    (tmp_path / "len_reward.py").write_text("def score(p, c):\n    return [0.0] * len(p)\n")
    path = tmp_path / "p.jsonl"
    texts = ["a very long prompt " * 3] + [f"sum {t:02d}:" for t in range(1, 20)]  # 57 chars
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    args = [*TINY, "--steps", "1", "--no-plot", "--model", str(gpt2_dir), "--prompts", str(path),
            "--reward", "len_reward:score", "--eval-prompts", "1"]  # fmt: skip
    sys.modules.pop("len_reward", None)
    old = os.getcwd()
    os.chdir(tmp_path)  # the reward module is found in the working directory
    try:
        assert main([*args, "--run-dir", str(tmp_path / "a")]) == 2
        assert "exceeds the model's 32 positions" in capsys.readouterr().err
        assert not (tmp_path / "a").exists()
        assert main([*args, "--max-prompt-tokens", "20", "--run-dir", str(tmp_path / "b")]) == 0
    finally:
        os.chdir(old)
    assert "dropped 1 longer prompts" in capsys.readouterr().err  # printed as one line
    assert rows(tmp_path / "b")[0]["prompts_dropped"] == 1


MULTI_MODULE = """
def length(prompts, completions):
    return [float(len(c)) for c in completions]

def digits(prompts, completions):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]
"""


def test_several_rewards_with_weights_are_logged_each(tmp_path, monkeypatch):
    (tmp_path / "multi_rewards.py").write_text(MULTI_MODULE)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("multi_rewards", None)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sum {t:02d}:"}) + "\n" for t in range(1, 41)))
    run = tmp_path / "run"
    code = main([*TINY, "--steps", "2", "--no-plot", "--prompts", str(path),
                 "--reward", "multi_rewards:length", "--reward", "multi_rewards:digits",
                 "--reward-weights", "1", "0.2", "--run-dir", str(run)])  # fmt: skip
    assert code == 0
    for r in rows(run)[1:]:
        parts = r["reward/length"], r["reward/digits"]
        assert r["reward_mean"] == pytest.approx(parts[0] + 0.2 * parts[1], rel=1e-9)
        assert parts[0] > 0  # random completions are not empty
    saved = json.loads((run / "config.json").read_text())
    assert saved["reward"] == ["multi_rewards:length", "multi_rewards:digits"]
    assert saved["reward_weights"] == [1.0, 0.2]


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """docs/python-api.md's `TrainConfig` + `train` example, run as printed."""
    readme = (REPO / "docs" / "python-api.md").read_text()
    start = readme.index("```python\nfrom gspo.train import TrainConfig, train")
    code = readme[start + len("```python\n") : readme.index("```", start + 10)]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "python-api.md", "exec"), namespace)  # noqa: S102 - our own docs
    summary = namespace["summary"]
    assert summary["finished"] and (tmp_path / summary["run_dir"] / "model").is_dir()
