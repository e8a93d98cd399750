"""`gspo eval`: pass@k, the metrics from known completions, and a real run on the tiny model."""

import itertools
import json
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gspo.cli import main as gspo_main
from gspo.train import evaluate as ev


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_chance_k_draws_hold_a_correct_one(nck):
    # Brute force: every k-subset of n samples of which the first c are correct.
    n, c, k = nck
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values_and_errors():
    assert ev.pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert ev.pass_at_k(8, 1, 8) == 1.0
    assert ev.pass_at_k(8, 0, 8) == 0.0
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # C(2,2)/C(4,2) = 1/6 miss
    with pytest.raises(ValueError, match="n=4 c=5"):
        ev.pass_at_k(4, 5, 1)


def test_metrics_from_known_completions(monkeypatch):
    questions = [
        {"prompt": "p0", "question": "What is 1 plus 1?", "answer": "2", "category": "add"},
        {"prompt": "p1", "question": "What is 1 minus 3?", "answer": "-2", "category": "sub"},
    ]
    answers = {  # (greedy?, question) -> completions
        (True, "p0"): ["1 + 1 = 2.\nAnswer: 2"],
        (True, "p1"): ["It is 2"],  # wrong and unformatted
        (False, "p0"): ["Answer: 2", "Answer: 3", "Answer: 2", "two"],
        (False, "p1"): ["Answer: -2", "Answer: 2", "Answer: 2", "Answer: 2"],
    }

    class FakeSampler:  # the engine protocol's sample(): fixed completions
        def sample(self, prompts, *, group_size, greedy):
            rows = [p for p in prompts for _ in range(group_size)]
            texts = [text for p in prompts for text in answers[(greedy, p["prompt"])]]
            return SimpleNamespace(prompts=rows, completions=texts, episodes=None)

    config = ev.EvalConfig(n=4, batch_size=5, progress=False)  # 5 // (1 + 4): 1 per call
    summary, records = ev.evaluate(None, None, questions, config, FakeSampler())
    assert summary["greedy_accuracy"] == 0.5
    assert summary["format_rate"] == 0.5
    assert summary["last_number_accuracy"] == 0.5  # "It is 2" ends on 2, not -2
    # pass@1 = mean correct fraction = (2/4 + 1/4) / 2; pass@4 = 1 for both (each has one).
    assert summary["pass@1"] == pytest.approx(0.375)
    assert summary["pass@4"] == 1.0
    assert summary["by_category"]["sub"] == {"questions": 1, "greedy_accuracy": 0.0,
                                             "format_rate": 0.0, "last_number_accuracy": 0.0,
                                             "pass@1": 0.25, "pass@4": 1.0}  # fmt: skip
    assert [r["samples_correct"] for r in records] == [2, 1]
    assert "sub" in ev.table(summary, 4)


def test_gspo_eval_runs_on_a_model_dir_with_user_questions(tmp_path, capsys):
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    model = tiny_model(layers=1, hidden=32)
    model.config.max_position_embeddings = 512  # arith's instruction: ~150 characters
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    questions = tmp_path / "q.jsonl"
    rows = [{"question": "1+1", "answer": "2", "category": "a"},
            {"question": "2*3", "answer": "6", "category": "b"}]  # fmt: skip
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "completions.jsonl"
    argv = ["eval", "--model", str(model_dir), "--prompts", str(questions), "-n", "3",
            "--max-new-tokens", "4", "--out", str(out), "--device", "cpu",
            "--engine", "hf"]  # fmt: skip
    assert gspo_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["questions"] == 2 and set(summary["by_category"]) == {"a", "b"}
    assert {"greedy_accuracy", "format_rate", "pass@1", "pass@3"} <= set(summary)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in records] == ["1+1", "2*3"]
    assert all(len(r["samples"]) == 3 for r in records)


def test_gspo_eval_bad_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "1+1"}\n{"question": "2+2", "answer": "4"}\n')
    assert gspo_main(["eval", "--model", "tiny", "--prompts", str(bad)]) == 2
    assert "line 1 needs 'question' and 'answer'" in capsys.readouterr().err
    assert gspo_main(["eval", "-n", "-1"]) == 2


def test_gspo_eval_with_vllm_gives_generate_s_greedy_answers(tmp_path, capsys):
    # The same questions through both engines: greedy completions agree token for token
    # (float32 on both sides; a prompt encoded differently or a stale sampler would not).
    pytest.importorskip("vllm")
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model(layers=1, hidden=128).save_pretrained(model_dir)  # vLLM's CPU heads: >= 32 wide
    tiny_tokenizer().save_pretrained(model_dir)
    greedy = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        argv = ["eval", "--model", str(model_dir), "--task", "digitsum", "--questions", "6",
                "-n", "2", "--max-new-tokens", "5", "--out", str(out), "--device", "cpu",
                "--engine", engine, "--vllm-memory", "0.05"]  # fmt: skip
        assert gspo_main(argv) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["engine"] == engine and summary["questions"] == 6
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(len(r["samples"]) == 2 for r in records)
        greedy[engine] = [r["greedy"] for r in records]
    assert greedy["vllm"] == greedy["hf"]


def test_gspo_eval_refuses_prompts_past_the_model_s_positions(tmp_path, capsys):
    # any prompt plus 128 new tokens is past the tiny model's 128 positions
    assert gspo_main(["eval", "--model", "tiny", "--questions", "2", "-n", "0",
                      "--max-new-tokens", "128"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "exceeds the model's 128 positions" in err and "--max-new-tokens" in err


def test_eval_reads_a_training_config_and_flags_win(tmp_path):
    # The base model is asked as the recipe trains it: model, task, levels, system prompt,
    # length, temperature and engine come from the train config; a flag given here wins.
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "smollm2"\ntask = "arith"\ntask_levels = [1]\nsteps = 40\n'
                      'system_prompt = "Be brief."\nmax_new_tokens = 32\ntemperature = 0.7\n'
                      'rollout = "vllm"\nlr = 2e-5\n')  # fmt: skip
    config = ev.parse_config(["--config", str(recipe), "--max-new-tokens", "64"])
    assert (config.model, config.task, config.task_levels) == ("smollm2", "arith", (1,))
    assert (config.system_prompt, config.temperature, config.engine) == ("Be brief.", 0.7, "vllm")
    assert config.max_new_tokens == 64  # the flag, not the file's 32
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "arith"\ntask_levels = [4]\n')
    with pytest.raises(ValueError, match="arith's levels are 1, 2 and 3"):
        ev.parse_config(["--config", str(bad)])  # checked as gspo train checks it
    with pytest.raises(ValueError, match="drop --config"):
        ev.parse_config(["--config", str(recipe), "--run", str(tmp_path)])


def test_eval_run_takes_the_run_s_model_and_config(tmp_path, capsys):
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    run = tmp_path / "run"
    tiny_model(layers=1, hidden=32).save_pretrained(run / "model")
    tiny_tokenizer().save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"model": "tiny", "task": "digitsum",
                                                 "max_new_tokens": 3, "seed": 5}))  # fmt: skip
    with pytest.raises(ValueError, match="no .*missing/model"):
        ev.parse_config(["--run", str(tmp_path / "missing")])
    config = ev.parse_config(["--run", str(run), "--questions", "3", "-n", "0"])
    assert (config.model, config.task, config.max_new_tokens) == (str(run / "model"), "digitsum", 3)
    assert gspo_main(["eval", "--run", str(run), "--questions", "3", "-n", "0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == str(run / "model") and summary["questions"] == 3
    assert len((run / "eval-completions.jsonl").read_text().splitlines()) == 3


REWARDS = '''
def correct(prompts, completions, **fields):
    return [1.0 if c.startswith("right") else 0.0 for c in completions]
def format_(prompts, completions, **fields):
    return [1.0] * len(completions)
def judge(prompts, completions, **fields):  # 0..2: 2 is right
    return [2.0 if c.startswith("right") else 0.0 for c in completions]
'''


class RightSampler:  # every completion is right
    def sample(self, prompts, *, group_size, greedy):
        rows = [p for p in prompts for _ in range(group_size)]
        return SimpleNamespace(prompts=rows, completions=["right"] * len(rows), episodes=None)


@pytest.mark.parametrize("rewards, weights, correct_at, accuracy", [
    (["evrewards:correct", "evrewards:format_"], [1.0, 0.2], 1.0, 1.0),  # 1.2 was "wrong" (== 1)
    (["evrewards:judge"], [], 1.0, 1.0),        # a 0..2 judge: 2 was "wrong"
    (["evrewards:judge"], [], 2.0, 1.0),
    (["evrewards:correct", "evrewards:format_"], [1.0, 0.2], 1.5, 0.0),  # the rule is the user's
])
def test_a_user_reward_counts_right_answers_by_correct_at(tmp_path, monkeypatch, capsys,
                                                          rewards, weights, correct_at, accuracy):
    (tmp_path / "evrewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "p.jsonl"  # no "answer": the default task (arith) must not read one
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(3)))
    config = ev.EvalConfig(prompts=str(prompts), reward=rewards, reward_weights=weights, n=2,
                           correct_at=correct_at, progress=False)
    questions = ev.load_questions(config)
    summary, records = ev.evaluate(None, None, questions, config, RightSampler())
    assert summary["greedy_accuracy"] == accuracy and summary["pass@2"] == accuracy
    assert summary["correct_at"] == correct_at
    assert summary["format_rate"] is None  # arith's checks are not the user's reward's
    warned = "no completion reached --correct-at" in capsys.readouterr().err
    assert warned == (accuracy == 0.0)


def test_gspo_eval_with_prompts_and_a_reward_but_no_task_runs(tmp_path, monkeypatch, capsys):
    # It sampled everything, then died with KeyError: 'answer' (exit 1).
    (tmp_path / "evrewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n"
                                              for i in range(3)))  # fmt: skip
    argv = ["eval", "--model", "tiny", "--prompts", "p.jsonl", "--reward", "evrewards:format_",
            "-n", "1", "--max-new-tokens", "2", "--engine", "hf", "--no-progress"]
    assert gspo_main(argv) == 0
    out = capsys.readouterr().out
    assert "correct: reward >= 1 (--correct-at)" in out
    assert json.loads(out.strip().splitlines()[-1])["greedy_accuracy"] == 1.0
    with pytest.raises(SystemExit) as exit_:
        gspo_main(argv + ["--correct-at", "nan"])
    assert exit_.value.code == 2 and "--correct-at" in capsys.readouterr().err
    with pytest.raises(ValueError, match="correct_at"):
        ev.EvalConfig(correct_at=float("inf"))


def test_an_unwritable_out_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # --out was first opened after every question was asked: the generations were lost.
    from gspo.train import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "out.jsonl"
    assert gspo_main(["eval", "--model", "tiny", "--out", str(bad), "--engine", "hf"]) == 2
    err = capsys.readouterr().err
    assert f"--out '{bad}' cannot be written" in err and "Traceback" not in err
    fine = tmp_path / "new" / "out.jsonl"
    ev.check_writable(fine)
    assert not fine.exists()  # the check leaves no empty file behind
