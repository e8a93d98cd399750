"""`gspo eval`: how well a model does a task, the same way before and after training.

    gspo eval --model smollm2 --task arith -n 8            # the base model
    gspo eval --model runs/<run>/model --task arith -n 8   # a trained run's output (LoRA too)
    gspo eval --model DIR --prompts questions.jsonl        # your own {"question", "answer"} rows
    gspo eval --model DIR --dataset questions.parquet      # the same from a local data set
    gspo eval --model smollm2 --engine vllm                # sample with vLLM (faster on CPU too)
    gspo eval --config examples/smollm2-arith.toml         # the base, asked as a recipe trains
    gspo eval --run runs/smollm2-arith                     # a run's model, asked as it trained

For each question: one greedy completion and ``n`` sampled ones (temperature 1). Reported,
overall and per category: greedy accuracy, sampled pass@1 and pass@n (the unbiased
estimator of Chen et al. 2021), the format rate (greedy completions whose answer the
task can read) and, for arith, the last-number accuracy (the last number of the greedy
completion is the answer, format aside: what the model computes even when it ignores the
``Answer:`` line). A completion is *correct* when its reward is 1, the maximum of the
built-in tasks. Output: a table, then one JSON line; every completion goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gspo.config import add_arguments, check, check_dataset_fields, from_args, option


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Everything `gspo eval` reads."""

    model: str = option("smollm2", "'tiny', 'smollm2', a .gguf file or an HF dir (a run's "
                        "model/; a LoRA run's is the adapter, loaded onto its base)",
                        metavar="PATH")  # fmt: skip
    task: str = option("arith", "task whose questions and reward are used",
                       choices=("arith", "digitsum", "copy"))  # fmt: skip
    prompts: str | None = option(
        None, "JSONL of {'question', 'answer'} (arith) or {'prompt', ...} rows", metavar="FILE"
    )
    dataset: str | None = option(
        None, "local .jsonl/.json/.parquet/.csv file or save_to_disk directory of questions "
        "(a saved DatasetDict: its 'test' or 'validation' split)", metavar="PATH")  # fmt: skip
    dataset_split: str | None = option(
        None, "split of a saved DatasetDict to ask; none = 'test', else 'validation', else "
        "'train'", metavar="NAME")  # fmt: skip
    prompt_field: str | None = option(
        None, "--dataset column of the question (none = 'question' for arith, else 'prompt')",
        metavar="COLUMN")  # fmt: skip
    answer_field: str | None = option(
        None, "--dataset column renamed 'answer' (none = 'answer')", metavar="COLUMN")
    task_levels: tuple[int, ...] = option(
        (), "difficulty levels of the built-in arith questions (1, 2, 3); none = all",
        metavar="INT")  # fmt: skip
    questions: int = option(
        100, "built-in held-out questions to ask (ignored with --prompts and --dataset)")
    n: int = option(8, "sampled completions per question, for pass@n (0 = greedy only)")
    temperature: float = option(1.0, "sampling temperature of the n samples")
    max_new_tokens: int = option(256, "longest completion, in tokens")
    batch_size: int = option(32, "sequences generated together (hf; vLLM schedules its own)")
    engine: str = option("hf", "hf (transformers generate) or vllm (needs vLLM, see README)",
                         choices=("hf", "vllm"))  # fmt: skip
    vllm_memory: float | None = option(
        None, "vLLM memory: GPU fraction on CUDA (none = 0.3), KV-cache GiB on CPU (none = 1)")
    seed: int = option(0, "seed of the built-in questions and of sampling")
    system_prompt: str | None = option(
        None, "system message before each question (none = the chat template's default); "
        "use the training run's value", metavar="TEXT")  # fmt: skip
    out: str = option("eval-completions.jsonl", "where every completion is written (JSONL)",
                      metavar="FILE")  # fmt: skip
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        check(self.questions >= 1, "questions", self.questions, "ask at least 1 question")
        check(self.n >= 0, "n", self.n, "use 0 (greedy only) or more samples")
        check(self.temperature > 0, "temperature", self.temperature, "use a positive value")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "use >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "use >= 1")
        check(self.vllm_memory is None or self.vllm_memory > 0, "vllm_memory", self.vllm_memory,
              "use > 0, or none")  # fmt: skip
        check_dataset_fields(self)

    top_p = 1.0  # what the rollout engines read besides the fields above: no nucleus cut


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: the chance that k
    samples drawn without replacement contain a correct one, ``1 - C(n-c, k) / C(n, k)``,
    as a product so that large n never forms huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_questions(config: EvalConfig) -> list[dict]:
    """The built-in held-out questions, or a file's or data set's rows formatted by the task."""
    from gspo.train.rewards import held_out_prompts, load_prompts_file

    if config.dataset is not None:
        from gspo.train.local_dataset import load_dataset_prompts

        rows, held_out = load_dataset_prompts(config.dataset, task=config.task,
                                              split=config.dataset_split,
                                              prompt_field=config.prompt_field,
                                              answer_field=config.answer_field)  # fmt: skip
        return rows if held_out is None or config.dataset_split is not None else held_out
    if config.prompts is None:  # the held-out prompts gspo train evaluates on
        return held_out_prompts(config.task, config.questions, config.seed, config.task_levels)
    return load_prompts_file(config.prompts, config.task)


def _generate(model, tokenizer, prompts, *, group_size, config, greedy, sampler=None):
    """Completions for every prompt (``group_size`` each, groups contiguous): from
    ``sampler`` (a rollout engine) when given, else with ``generate`` in batches."""
    from tqdm import tqdm

    from gspo.train.rollout import generate

    if sampler is not None:
        return sampler.sample(prompts, group_size=group_size, greedy=greedy).completions

    per_batch = max(1, config.batch_size // group_size)
    texts = []
    bar = tqdm(total=len(prompts), desc="greedy" if greedy else f"{group_size} samples",
               unit="q", file=sys.stderr, leave=False)  # fmt: skip
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        rollout = generate(model, tokenizer, chunk, group_size=group_size, greedy=greedy,
                           max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature,
                           system_prompt=config.system_prompt)  # fmt: skip
        texts += rollout.completions
        bar.update(len(chunk))
    bar.close()
    return texts


def evaluate(model, tokenizer, questions: list[dict], config: EvalConfig,
             sampler=None) -> tuple[dict, list]:  # fmt: skip
    """(summary, records): score greedy and sampled completions of every question."""
    from gspo.train.arith import has_format, last_number, parse_number
    from gspo.train.rewards import TASKS, score

    _, reward_fn = TASKS[config.task]
    greedy = _generate(model, tokenizer, questions, group_size=1, config=config, greedy=True,
                       sampler=sampler)  # fmt: skip
    greedy_rewards = score(reward_fn, questions, greedy)
    sampled, sampled_rewards = [], []
    if config.n:
        sampled = _generate(model, tokenizer, questions, group_size=config.n, config=config,
                            greedy=False, sampler=sampler)  # fmt: skip
        repeated = [q for q in questions for _ in range(config.n)]
        sampled_rewards = score(reward_fn, repeated, sampled)
    records, arith = [], config.task == "arith"
    for i, question in enumerate(questions):
        samples = sampled[i * config.n : (i + 1) * config.n]
        rewards = sampled_rewards[i * config.n : (i + 1) * config.n]
        records.append({
            "question": question.get("question", question["prompt"]),
            "answer": question.get("answer"),
            "category": str(question.get("category", "all")),
            "greedy": greedy[i], "greedy_reward": greedy_rewards[i],
            "greedy_correct": greedy_rewards[i] == 1.0,
            "greedy_format": has_format(greedy[i]) if arith else None,
            "greedy_last_number_correct": (last_number(greedy[i]) == parse_number(
                str(question["answer"]))) if arith else None,  # fmt: skip
            "samples": samples, "sample_rewards": rewards,
            "samples_correct": sum(r == 1.0 for r in rewards),
        })  # fmt: skip
    return summarize(records, config.n), records


def summarize(records: Sequence[dict], n: int) -> dict:
    """Overall and per-category metrics from the per-question records."""
    groups = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
    summary = _metrics(records, n)
    if len(groups) > 1:
        summary["by_category"] = {cat: _metrics(rows, n) for cat, rows in sorted(groups.items())}
    return summary


def _metrics(rows: Sequence[dict], n: int) -> dict:
    out = {"questions": len(rows),
           "greedy_accuracy": sum(r["greedy_correct"] for r in rows) / len(rows)}  # fmt: skip
    for key, name in (("greedy_format", "format_rate"),
                      ("greedy_last_number_correct", "last_number_accuracy")):  # fmt: skip
        values = [r[key] for r in rows if r.get(key) is not None]
        out[name] = sum(values) / len(values) if values else None
    if n:
        out["pass@1"] = sum(pass_at_k(n, r["samples_correct"], 1) for r in rows) / len(rows)
        out[f"pass@{n}"] = sum(pass_at_k(n, r["samples_correct"], n) for r in rows) / len(rows)
    return out


def table(summary: dict, n: int) -> str:
    """The summary as an aligned text table, one row per category and one for all."""
    columns = ["greedy_accuracy", "format_rate", "last_number_accuracy"]
    columns += ["pass@1", f"pass@{n}"] if n else []
    rows = [("all", summary)] + list(summary.get("by_category", {}).items())
    lines = [f"{'category':<10} {'questions':>9} " + " ".join(f"{c:>15}" for c in columns)]
    for name, m in rows:
        cells = ["-" if m.get(c) is None else f"{m[c]:.3f}" for c in columns]
        lines.append(f"{name:<10} {m['questions']:>9} " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_config(argv)
        summary = run(config)
    except ValueError as err:
        print(f"gspo eval: error: {err}", file=sys.stderr)
        return 2
    print(table(summary, config.n))
    print(json.dumps(summary))
    return 0


# What `gspo eval` reads from a training config, so that a model is asked exactly as it
# was trained (held-out questions come from the same seed and split either way). A run's
# --prompts/--dataset are not taken: training held out only their last rows.
SHARED_WITH_TRAIN = ("model", "task", "task_levels", "system_prompt", "max_new_tokens",
                     "temperature", "vllm_memory")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gspo eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", metavar="FILE", help="a `gspo train` config file (JSON or TOML): its model, "
        "task, levels, system prompt, max new tokens, temperature and engine (rollout)")
    parser.add_argument(
        "--run", metavar="RUN_DIR", help="a training run: its config.json as with --config, "
        "its trained model (RUN_DIR/model), completions to RUN_DIR/eval-completions.jsonl")
    add_arguments(parser, EvalConfig)
    parser.add_argument("-n", dest="n", type=int, default=argparse.SUPPRESS, help="same as --n")
    return parser


def parse_config(argv: Sequence[str]) -> EvalConfig:
    """Defaults < the training config (--run or --config) < flags given here."""
    args = build_parser().parse_args(list(argv))
    if args.run and args.config:
        raise ValueError("--run RUN_DIR already reads RUN_DIR/config.json: drop --config")
    values = {}
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "model").is_dir():
            raise ValueError(f"--run {args.run!r}: no {run_dir / 'model'} (a finished run has "
                             "one); give a run directory, or --model DIR")  # fmt: skip
        values = train_fields(run_dir / "config.json")
        values.update(model=str(run_dir / "model"), out=str(run_dir / "eval-completions.jsonl"))
    elif args.config:
        values = train_fields(args.config)
    return from_args(EvalConfig, args, file_values=values)


def train_fields(path: str | Path) -> dict:
    """The fields of a `gspo train` config file that `gspo eval` shares (its ``rollout``
    engine included), checked as `gspo train` would check them."""
    from gspo.config import TrainConfig, coerce, load_file

    if not Path(path).is_file():
        raise ValueError(f"config file {str(path)!r} not found")
    values = coerce(TrainConfig, load_file(path), str(path))
    train = TrainConfig(**values)  # every check gspo train makes (a ValueError names it)
    out = {k: getattr(train, k) for k in SHARED_WITH_TRAIN if k in values}
    if "rollout" in values:
        out["engine"] = train.rollout
    return out


def run(config: EvalConfig) -> dict:
    """Load the model, answer the questions, write the completions; returns the summary."""
    import torch

    from gspo.train.distributed import pick_device
    from gspo.train.tiny import load_model_and_tokenizer

    questions = load_questions(config)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, layers=2, hidden=128, seed=0)
    _check_lengths(model, tokenizer, questions, config)
    device = pick_device(config.device)
    model.to(device).eval()
    sampler = None
    if config.engine == "vllm":
        from gspo.train.engines.vllm import VLLMEngine

        sampler = VLLMEngine(model, tokenizer, config=config, device=device, seed=config.seed)
    start = time.perf_counter()
    try:
        summary, records = evaluate(model, tokenizer, questions, config, sampler)
    finally:
        if sampler is not None:
            sampler.close()
    seconds = round(time.perf_counter() - start, 1)
    summary = {"model": config.model, "task": config.task, "engine": config.engine, **summary,
               "seconds": seconds,
               "completions": config.out}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return summary


def _check_lengths(model, tokenizer, questions: list[dict], config: EvalConfig) -> None:
    """Every question with its completion must fit the model's positions (else a crash deep
    inside torch or vLLM, halfway through the questions)."""
    from gspo.train.data import position_limit, prompt_lengths

    limit = position_limit(model)
    longest = max(prompt_lengths(tokenizer, questions, config.system_prompt))
    if limit is not None and longest + config.max_new_tokens > limit:
        raise ValueError(
            f"a question of {longest} tokens (chat template and instruction included) plus "
            f"--max-new-tokens {config.max_new_tokens} exceeds the model's {limit} positions; "
            "lower --max-new-tokens or ask shorter questions"
        )
