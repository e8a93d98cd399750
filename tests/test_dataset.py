"""`--dataset PATH`: local data through Hugging Face `datasets`, every format giving the prompts
a `--prompts` file gives, columns renamed by `--prompt-field` / `--answer-field`, held-out
splits, offline reading, the errors, and `gspo train` / `gspo eval` end to end."""

from __future__ import annotations

import json
import socket
import sys

import pytest

datasets = pytest.importorskip("datasets", reason="--dataset needs the 'datasets' package")

from gspo.train.config import TrainConfig  # noqa: E402
from gspo.train.tasks import build_task, load_prompts_file  # noqa: E402
from gspo.train.tasks.arith import INSTRUCTION, arith_reward  # noqa: E402
from gspo.train.tasks.files import load_dataset_prompts  # noqa: E402

datasets.disable_progress_bars()

ROWS = [{"prompt": f"sum {t:02d}:", "target": t, "kind": "odd" if t % 2 else "even"}
        for t in range(1, 11)]  # fmt: skip


def write(rows, path, fmt):
    """``rows`` as the file or directory ``fmt`` names, written the way users write them."""
    if fmt == "jsonl":
        path = path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":  # one JSON array, as json.dump of a list writes it
        path = path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        path = path / "d.csv"
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif fmt == "saved":
        path = path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "saved-dict":
        path = path / "saved-dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- formats and fields


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "saved", "saved-dict"])
def test_every_format_gives_the_prompts_a_prompts_file_gives(tmp_path, fmt):
    expected = load_prompts_file(write(ROWS, tmp_path, "jsonl"))
    rows, held_out = load_dataset_prompts(write(ROWS, tmp_path, fmt))
    # Same dicts, same order, the int field still an int (a CSV read as text would give "1").
    assert rows == expected and held_out is None
    assert type(rows[0]["target"]) is int


def test_prompt_and_answer_fields_are_renamed(tmp_path):
    rows = [{"text": f"q{i}", "solution": i, "answer": "a long worked solution", "id": i}
            for i in range(4)]  # fmt: skip
    path = write(rows, tmp_path, "parquet")
    got, _ = load_dataset_prompts(path, prompt_field="text", answer_field="solution")
    # "solution" becomes "answer" and replaces the column of that name; the rest stay fields.
    assert got[1] == {"prompt": "q1", "answer": 1, "id": 1}
    unrenamed, _ = load_dataset_prompts(path, prompt_field="text")
    assert unrenamed[1] == {"prompt": "q1", "solution": 1, "answer": "a long worked solution",
                            "id": 1}  # fmt: skip


def test_chat_message_prompts_through_a_jsonl_dataset(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rows = [{"messages": chat, "n": 1}, {"messages": chat[1:], "n": 2}]
    got, _ = load_dataset_prompts(write(rows, tmp_path, "jsonl"), prompt_field="messages")
    assert got == [{"prompt": chat, "n": 1}, {"prompt": chat[1:], "n": 2}]


def test_arith_formats_question_columns_and_scores_the_renamed_answer(tmp_path):
    rows = [{"question": "What is 1 plus 1?", "answer": 2},
            {"question": "Halve 3.", "answer": "3/2"}]  # fmt: skip
    got, _ = load_dataset_prompts(write(rows, tmp_path, "jsonl"), task="arith")
    assert got[0]["prompt"] == f"What is 1 plus 1?\n{INSTRUCTION}" and got[0]["answer"] == "2"
    # Other column names: --prompt-field is arith's question, --answer-field its answer.
    (tmp_path / "q.csv").write_text("q,a,level\nWhat is 1 plus 1?,2,1\nHalve 3.,3/2,1\n")
    renamed, _ = load_dataset_prompts(tmp_path / "q.csv", task="arith", prompt_field="q",
                                      answer_field="a")  # fmt: skip
    assert [r["prompt"] for r in renamed] == [r["prompt"] for r in got]
    assert renamed[1]["level"] == 1
    assert arith_reward(None, ["Answer: 1.5"], answer=[renamed[1]["answer"]]) == [1.0]
    # A prompt column is arith's fully written prompt: taken as it is.
    written = [{"prompt": "say 2", "answer": 2}, {"prompt": "say 3", "answer": 3}]
    as_is, _ = load_dataset_prompts(write(written, tmp_path, "parquet"), task="arith")
    assert as_is[0] == {"prompt": "say 2", "answer": 2}


def test_a_saved_dataset_dict_holds_out_its_test_split(tmp_path):
    train = datasets.Dataset.from_list(ROWS)
    test = datasets.Dataset.from_list([{**r, "prompt": r["prompt"] + "?"} for r in ROWS[:6]])
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    pool, held, _ = build_task(task="digitsum", prompts_file=None, reward=f"{__name__}:zero",
                               eval_size=4, seed=0, dataset=str(path))  # fmt: skip
    # All of train to train on; the first --eval-prompts rows of test held out (not train's
    # last 10%, which a bug that ignored the split would give: 9 and 1).
    assert len(pool) == 10 and [h["prompt"] for h in held] == ["sum 01:?", "sum 02:?",
                                                               "sum 03:?", "sum 04:?"]  # fmt: skip
    # --dataset-split picks another split; then the rows' last 10% are held out.
    pool, held, _ = build_task(task="digitsum", prompts_file=None, reward=f"{__name__}:zero",
                               eval_size=4, seed=0, dataset=str(path),
                               dataset_split="test")  # fmt: skip
    assert len(pool) == 5 and held[0]["prompt"] == "sum 06:?"
    with pytest.raises(ValueError, match=r"--dataset-split 'dev': .* has the splits \['train', 'test'\]"):
        load_dataset_prompts(path, split="dev")
    only_eval = tmp_path / "no-train"
    datasets.DatasetDict({"validation": train, "test": test}).save_to_disk(str(only_eval))
    with pytest.raises(ValueError, match=r"has no 'train' split but \['validation', 'test'\]; name the one"):
        load_dataset_prompts(only_eval)
    rows, held = load_dataset_prompts(only_eval, split="validation")
    assert len(rows) == 10 and len(held) == 6  # the test split is held out


def test_no_split_of_a_file_is_held_out_but_its_last_tenth(tmp_path):
    path = write([{"prompt": f"p{i}"} for i in range(20)], tmp_path, "csv")
    pool, held, _ = build_task(task="digitsum", prompts_file=None, reward=f"{__name__}:zero",
                               eval_size=64, seed=0, dataset=str(path))  # fmt: skip
    assert [p["prompt"] for p in held] == ["p18", "p19"] and len(pool) == 18


def zero(prompts, completions, **fields):
    return [0.0] * len(prompts)


def test_reading_sends_nothing_over_the_network(tmp_path, monkeypatch):
    """datasets' json builder, unless offline, sends a download-count request to the Hub's
    bucket (it swallows the error, so only watching the sockets shows it)."""
    calls, before = [], datasets.config.HF_HUB_OFFLINE

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    load_dataset_prompts(write(ROWS, tmp_path, "jsonl"))
    load_dataset_prompts(write(ROWS, tmp_path, "saved-dict"))
    assert calls == []
    assert datasets.config.HF_HUB_OFFLINE == before  # offline while reading, then as it was


# ---------------------------------------------------------------- errors


def test_missing_fields_and_bad_paths_are_named(tmp_path):
    path = write(ROWS, tmp_path, "parquet")
    with pytest.raises(ValueError, match=r"--prompt-field 'text' is not a column; its columns are \['prompt', 'target', 'kind'\]"):
        load_dataset_prompts(path, prompt_field="text")
    with pytest.raises(ValueError, match=r"--answer-field 'solution' is not a column"):
        load_dataset_prompts(path, answer_field="solution")
    with pytest.raises(ValueError, match=r"--dataset .*: --prompt-field 'prompt' is not a column"):
        load_dataset_prompts(write([{"text": "a"}, {"text": "b"}], tmp_path, "jsonl"))
    with pytest.raises(ValueError, match="--answer-field 'prompt' is also the prompt field"):
        load_dataset_prompts(path, answer_field="prompt")
    with pytest.raises(ValueError, match=r"'openai/gsm8k': no such file or directory; only local data"):
        load_dataset_prompts("openai/gsm8k")
    (tmp_path / "d.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"unknown file type '.txt'; use .jsonl, .json, .parquet, .csv"):
        load_dataset_prompts(tmp_path / "d.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory that Dataset.save_to_disk did not write"):
        load_dataset_prompts(tmp_path / "empty")
    with pytest.raises(ValueError, match="--dataset-split is for save_to_disk directories"):
        load_dataset_prompts(path, split="train")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' cannot be read as json"):
        load_dataset_prompts(tmp_path / "bad.jsonl")


def test_bad_rows_are_named_by_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,target\nsum 01:,1\n,2\n")  # row 2 has an empty prompt
    with pytest.raises(ValueError, match=r"d.csv: row 2 must be an object with a \"prompt\" that is a string.*\(got NoneType\)"):
        load_dataset_prompts(path)
    rows = [{"question": "What is 1 plus 1?", "answer": 2}, {"question": "Why?", "answer": "none"}]
    with pytest.raises(ValueError, match=r"answer 'none' of question 'Why\?' is not a number"):
        load_dataset_prompts(write(rows, tmp_path, "jsonl"), task="arith")
    with pytest.raises(ValueError, match="need at least 2 prompts, found 1"):
        load_dataset_prompts(write(ROWS[:1], tmp_path, "parquet"))


@pytest.mark.parametrize(
    "kwargs, field, fix",
    [
        ({"dataset": "d.csv", "prompts": "p.jsonl", "reward": "m:f"}, "dataset", "not both"),
        ({"dataset": "d.csv"}, "dataset", "add --reward module:function"),
        ({"prompt_field": "text"}, "prompt_field", "add --dataset or drop it"),
        ({"answer_field": "a", "prompts": "p.jsonl", "reward": "m:f"}, "answer_field", "add --dataset"),
        ({"dataset_split": "test"}, "dataset_split", "add --dataset"),
        ({"dataset": "d.csv", "reward": "m:f", "prompt_field": " "}, "prompt_field", "give a name"),
    ],
)
def test_config_errors_name_the_flag(kwargs, field, fix):
    with pytest.raises(ValueError, match=rf"--{field.replace('_', '-')} / {field} = .*{fix}"):
        TrainConfig(**kwargs)


def test_config_accepts_a_dataset_with_a_reward_or_arith():
    TrainConfig(dataset="d.parquet", reward="m:f", prompt_field="text", answer_field="label")
    TrainConfig(dataset="d.parquet", task="arith")  # arith scores its own rows
    TrainConfig(reward="m:f", dataset="d.parquet")  # --reward needs prompts: these are


# ---------------------------------------------------------------- end to end

HELD_REWARD = """
def held(prompts, completions, answer, held):
    # 1 for the test split's prompts, 0 for train's; `answer` exists only if renamed.
    assert all(isinstance(a, int) for a in answer)
    return [float(h) for h in held]
"""


def test_gspo_train_on_a_saved_dataset_for_two_steps(tmp_path, monkeypatch):
    from gspo.train.cli import main

    (tmp_path / "held_reward.py").write_text(HELD_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("held_reward", None)
    split = {name: datasets.Dataset.from_list(
        [{"text": f"sum {t:02d}:", "target": t, "held": name == "test"} for t in range(1, 13)])
        for name in ("train", "test")}  # fmt: skip
    data = tmp_path / "data"
    datasets.DatasetDict(split).save_to_disk(str(data))
    run = tmp_path / "run"
    args = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
            "--group-size", "2", "--minibatches", "2", "--max-new-tokens", "3",
            "--eval-prompts", "4", "--eval-every", "2", "--no-progress", "--no-plot",
            "--steps", "2", "--dataset", str(data), "--prompt-field", "text",
            "--answer-field", "target", "--reward", "held_reward:held",
            "--run-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Evaluation asked the test split only (1.0), training the train split only (0.0).
    assert [m.get("eval_reward") for m in metrics] == [1.0, None, 1.0]
    assert [m["reward_mean"] for m in metrics[1:]] == [0.0, 0.0]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("sum ") for s in samples)
    saved = json.loads((run / "config.json").read_text())
    assert saved["dataset"] == str(data) and saved["answer_field"] == "target"


def test_gspo_eval_asks_the_held_out_split(tmp_path, capsys):
    from gspo.cli import main as gspo_main
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model = tmp_path / "model"
    tiny_model(layers=1, hidden=32).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    rows = {name: [{"q": f"{i}+{i}", "a": 2 * i, "category": name} for i in range(n)]
            for name, n in (("train", 5), ("test", 3))}  # fmt: skip
    data = tmp_path / "data"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}
                         ).save_to_disk(str(data))  # fmt: skip
    out = tmp_path / "completions.jsonl"
    argv = ["eval", "--model", str(model), "--dataset", str(data), "--prompt-field", "q",
            "--answer-field", "a", "-n", "2", "--max-new-tokens", "3", "--out", str(out),
            "--device", "cpu", "--engine", "hf"]  # fmt: skip
    assert gspo_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["questions"] == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in records] == [("0+0", "0"), ("1+1", "2"),
                                                               ("2+2", "4")]  # fmt: skip
    assert gspo_main([*argv, "--dataset-split", "train"]) == 0  # another split when named
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["questions"] == 5
    assert gspo_main(["eval", "--dataset", str(data), "--prompts", "q.jsonl"]) == 2
    assert "give --dataset or --prompts, not both" in capsys.readouterr().err
