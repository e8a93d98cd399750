"""`gspo eval`: how well a model does a task, the same way before and after training.

    gspo eval --model smollm2 --task arith                 # the base model
    gspo eval --model runs/<run>/model --task arith -n 8   # a trained run's output (LoRA too)
    gspo eval --model DIR --prompts questions.jsonl        # your own {"question", "answer"} rows
    gspo eval --model DIR --dataset questions.parquet      # the same from a local data set
    gspo eval --model smollm2 --engine hf                  # HF generate (vLLM if installed)
    gspo eval --config examples/smollm2-arith.toml         # the base, asked as a recipe trains
    gspo eval --run runs/smollm2-arith                     # a run's model, asked as it trained

For each question: one greedy completion and ``n`` sampled ones (temperature 1), of up to
the task's answer length (arith: 32 tokens; docs/eval-defaults.md gives what the defaults
cost), with a progress bar and the time left on stderr. Reported,
overall and per category: greedy accuracy, sampled pass@1 and pass@n (the unbiased
estimator of Chen et al. 2021), the format rate (greedy completions whose answer the
task can read) and, for arith, the last-number accuracy (the last number of the greedy
completion is the answer, format aside: what the model computes even when it ignores the
``Answer:`` line). A completion is *correct* when its reward is at least ``--correct-at``
(default 1, the maximum of the built-in tasks' rewards): a weighted sum of rewards (1 x
correct + 0.2 x format gives 1.2) or a judge on a 0..2 scale counts a right answer, and the
rule is printed with the table; when no completion reaches it although some scored above
0, a warning says to set ``--correct-at``. With ``--reward`` the task's own checks (arith's
format and last number) do not apply and are not reported. Output: a table, then one JSON
line; every completion goes to ``--out``.

With ``--env`` (gspo.train.episodes) each question is an episode: the greedy completion is
the model's last reply, the environment's reward scores it, and the summary adds the
greedy episodes' tool-call rate (the share with at least one environment answer), turns
per episode and truncated share; every greedy episode's turns go to ``--out``
(``greedy_turns``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gspo.config import (
    Composite,
    add_arguments,
    check,
    coerce,
    from_args,
    load_file,
    option,
    to_dict,
)
from gspo.train.config import ModelConfig, SamplingConfig, TaskConfig, TrainConfig


def default_engine() -> str:
    """vLLM when it is installed (it batches every sequence of a call; docs/eval-defaults.md
    has the measured costs), else HF."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


@dataclass(frozen=True, init=False)
class EvalConfig(Composite):
    """Everything `gspo eval` reads: the model, task and sampling concerns of `gspo train`
    (gspo.train.config; here with defaults for a pretrained chat model), and its own.

    Defaults a user can wait for (docs/eval-defaults.md measures them): vLLM when it is
    installed, the task's own answer length (``Task.max_new_tokens``, arith 32) when
    neither ``max_new_tokens`` nor a whole sampling concern is given, 4 samples per
    question. A training config (``--config`` / ``--run``) gives all of these as it trained."""

    policy: ModelConfig = field(default_factory=lambda: ModelConfig(model="smollm2"))
    data: TaskConfig = field(default_factory=lambda: TaskConfig(task="arith", eval_prompts=100))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        rollout=default_engine(), max_new_tokens=32))  # 32: the default task's (arith)
    n: int = option(4, "sampled completions per question, for pass@n (0 = greedy only)")
    correct_at: float = option(1.0, "a completion counts as correct (accuracy, pass@k) when its "
                               "reward is at least this; 1 is the built-in tasks' maximum",
                               metavar="REWARD")  # fmt: skip
    seed: int = option(0, "seed of the built-in questions and of sampling")
    out: str = option("eval-completions.jsonl", "where every completion is written (JSONL)",
                      metavar="FILE")  # fmt: skip
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    progress: bool = option(True, "a progress bar over questions x completions, with the "
                            "time left (stderr)")  # fmt: skip

    # Other spellings of shared options: `gspo eval --engine vllm` is --rollout;
    # --questions is --eval-prompts (the held-out questions asked); --batch-size (its name
    # before gspo train shared it) is --generation-batch-size.
    aliases = {"engine": "rollout", "questions": "eval_prompts",
               "batch_size": "generation_batch_size"}  # fmt: skip

    def __init__(self, **values) -> None:
        from gspo.train.tasks import get

        values = {self.aliases.get(k, k): v for k, v in values.items()}
        if "max_new_tokens" not in values and "sampling" not in values:
            data = values.get("data") or type(self).__dataclass_fields__["data"].default_factory()
            values["max_new_tokens"] = get(values.get("task", data.task)).max_new_tokens
        super().__init__(**values)

    def __post_init__(self) -> None:
        check(self.n >= 0, "n", self.n, "use 0 (greedy only) or more samples")
        check(math.isfinite(self.correct_at), "correct_at", self.correct_at,
              "use a finite reward, e.g. your reward's value for a right answer")  # fmt: skip

    @property
    def sequences_per_call(self) -> int:
        """Sequences per engine call, the progress bar moving after each:
        ``--generation-batch-size`` (``--batch-size``), or 32 on hf and 128 on vllm (vLLM
        batches better the more it is given: 6 questions a call took 1.5x the time of 20,
        docs/eval-defaults.md)."""
        return self.sampling.generation_batch_size or (128 if self.sampling.rollout == "vllm"
                                                       else 32)  # fmt: skip


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
    from gspo.train.tasks import held_out_prompts, load_dataset_prompts, load_prompts_file

    d = config.data
    if d.dataset is not None:
        rows, held_out = load_dataset_prompts(d.dataset, task=d.task, split=d.dataset_split,
                                              prompt_field=d.prompt_field,
                                              answer_field=d.answer_field,
                                              env=d.env is not None)  # fmt: skip
        return rows if held_out is None or d.dataset_split is not None else held_out
    if d.prompts is None:  # the held-out prompts gspo train evaluates on
        return held_out_prompts(d.task, d.eval_prompts, config.seed, d.task_levels)
    return load_prompts_file(d.prompts, d.task, env=d.env is not None)


def evaluate(model, tokenizer, questions: list[dict], config: EvalConfig,
             sampler=None) -> tuple[dict, list]:  # fmt: skip
    """(summary, records): score greedy and sampled completions of every question, through
    the same episodes as training (gspo.train.episodes: one completion, or --env's turns).
    Asked ``sequences_per_call // (1 + n)`` questions at a time, so that the bar (stderr)
    counts every completion and shows the time left."""
    from tqdm import tqdm

    from gspo.train import episodes
    from gspo.train.rewards import load_rewards
    from gspo.train.tasks import get

    task, d = get(config.data.task), config.data
    reward_fn = load_rewards(d.reward, d.reward_weights) if d.reward else task.reward
    collect = episodes.build(d, config.sampling, sampler, tokenizer, model, reward_fn)
    per_call = max(1, config.sequences_per_call // (1 + config.n))
    greedy, greedy_rewards, turns, sampled, sampled_rewards = [], [], [], [], []
    with tqdm(total=len(questions) * (1 + config.n), unit="seq", file=sys.stderr,
              desc="gspo eval", disable=not config.progress, leave=False) as bar:  # fmt: skip
        for start in range(0, len(questions), per_call):
            chunk = questions[start : start + per_call]
            rollout = collect.rollout(chunk, group_size=1, greedy=True)
            greedy += rollout.completions
            greedy_rewards += collect.score(rollout)
            turns = None if rollout.episodes is None else turns + rollout.episodes  # --env
            if config.n:
                sampled_rollout = collect.rollout(chunk, group_size=config.n, greedy=False)
                sampled += sampled_rollout.completions
                sampled_rewards += collect.score(sampled_rollout)
            bar.update(len(chunk) * (1 + config.n))
    records, correct_at = [], config.correct_at
    for i, question in enumerate(questions):
        samples = sampled[i * config.n : (i + 1) * config.n]
        rewards = sampled_rewards[i * config.n : (i + 1) * config.n]
        # the task's checks read its own fields (arith: format, last number == "answer"); a
        # user's reward scores rows that need not have them
        checks = {} if d.reward else task.eval_metrics(question, greedy[i])
        records.append({
            "question": question.get("question", question.get("prompt", question)),
            "answer": question.get("answer"),
            "category": str(question.get("category", "all")),
            "greedy": greedy[i], "greedy_reward": greedy_rewards[i],
            "greedy_correct": greedy_rewards[i] >= correct_at,
            **{f"greedy_{name}": value for name, value in checks.items()},
            "samples": samples, "sample_rewards": rewards,
            "samples_correct": sum(r >= correct_at for r in rewards),
        })  # fmt: skip
        if turns is not None:  # the greedy episode, turn by turn
            records[-1].update(greedy_turns=turns[i]["turns"],
                               greedy_tool_calls=turns[i]["tool_calls"],
                               greedy_truncated=turns[i]["truncated"],
                               **({"greedy_tool_errors": turns[i]["tool_errors"]}
                                  if "tool_errors" in turns[i] else {}))  # fmt: skip
    summary = {**summarize(records, config.n), "correct_at": correct_at}
    _warn_if_nothing_is_correct(greedy_rewards + sampled_rewards, correct_at)
    if turns is not None:  # greedy episodes: how the model used the environment
        summary.update(episodes.episode_metrics(turns),
                       truncated_frac=sum(e["truncated"] for e in turns) / len(turns))
    return summary, records


def _warn_if_nothing_is_correct(rewards: Sequence[float], correct_at: float) -> None:
    # A reward on another scale (a judge's 0..10, a weighted sum below 1) would read as
    # accuracy 0 with no other sign.
    best = max(rewards, default=0.0)
    if 0.0 < best < correct_at:
        print(f"gspo eval: warning: no completion reached --correct-at {correct_at:g} (the "
              f"highest reward was {best:g}); if a right answer scores otherwise, set "
              "--correct-at to its reward", file=sys.stderr)  # fmt: skip


def summarize(records: Sequence[dict], n: int) -> dict:
    """Overall and per-category metrics from the per-question records."""
    groups = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
    summary = _metrics(records, n)
    if len(groups) > 1:
        summary["by_category"] = {cat: _metrics(rows, n) for cat, rows in sorted(groups.items())}
    return summary


# The summary's name for each rate of a task's eval_metrics (the share of greedy completions
# for which the check holds).
CHECK_NAMES = {"format": "format_rate", "last_number_correct": "last_number_accuracy"}


def _metrics(rows: Sequence[dict], n: int) -> dict:
    out = {"questions": len(rows),
           "greedy_accuracy": sum(r["greedy_correct"] for r in rows) / len(rows)}  # fmt: skip
    for check_name, name in CHECK_NAMES.items():
        values = [r[f"greedy_{check_name}"] for r in rows if f"greedy_{check_name}" in r]
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
    from gspo.train.console import session

    try:
        config = parse_config(argv)
        with session(quiet=not build_parser().parse_args(argv).verbose):
            summary = run(config)
    except ValueError as err:
        print(f"gspo eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not a file of ours: the traceback says where
            raise
        print(f"gspo eval: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(table(summary, config.n))
    print(f"correct: reward >= {config.correct_at:g} (--correct-at)")
    if "turns_per_episode" in summary:
        source = f"--env {config.data.env}" if config.data.env else f"--tools {config.data.tools}"
        print(f"{source}, greedy episodes: tool-call rate "
              f"{summary['tool_call_rate']:.3f}, turns per episode "
              f"{summary['turns_per_episode']:.2f}, truncated {summary['truncated_frac']:.3f}")
    if "tool_errors" in summary:
        print(f"tool calls {summary['tool_calls']:.2f} and tool errors "
              f"{summary['tool_errors']:.2f} per greedy episode")
    print(json.dumps(summary))
    return 0


# What `gspo eval` reads from a training config, so that a model is asked exactly as it
# was trained (held-out questions come from the same seed and split either way): the model,
# the task's name and levels and prompt filter, and every sampling option. A run's
# --prompts/--dataset (and so its --reward) are not taken: training held out only their last
# rows. Nor is --generation-batch-size, a memory setting sized for the training batch (a
# run's 0, all at once, would generate every question's n samples in one call).
SHARED_WITH_TRAIN = ("model", "tiny_layers", "tiny_hidden", "task", "task_levels",
                     "max_prompt_tokens", "env", "max_turns", "chat_template", "tools",
                     "tool_parser", "tool_time_limit",
                     *(f.name for f in dataclasses.fields(SamplingConfig)
                       if f.name != "generation_batch_size"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gspo eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", metavar="FILE", help="a `gspo train` config file (JSON or TOML): its model, "
        "task, levels, system prompt, max new tokens, temperature and engine (rollout)")
    parser.add_argument(
        "--run", metavar="RUN_DIR", help="a training run: its config.json as with --config, "
        "its trained model (RUN_DIR/model), completions to RUN_DIR/eval-completions.jsonl")
    add_arguments(parser, EvalConfig, aliases=EvalConfig.aliases)
    parser.add_argument("-n", dest="n", type=int, default=argparse.SUPPRESS, help="same as --n")
    parser.add_argument("--verbose", action="store_true", help="show every library's and "
                        "engine's output; by default it goes to OUT's name with .library.log")
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
    """The fields of a `gspo train` config file that `gspo eval` shares (SHARED_WITH_TRAIN),
    checked as `gspo train` would check them; those the file leaves out take `gspo train`'s
    defaults (a recipe without max_new_tokens trained with 6, and is asked with 6, not
    with eval's own default)."""
    if not Path(path).is_file():
        raise ValueError(f"config file {str(path)!r} not found")
    values = coerce(TrainConfig, load_file(path), str(path))
    trained = to_dict(TrainConfig(**values))  # every check gspo train makes (ValueError)
    return {k: v for k, v in trained.items() if k in SHARED_WITH_TRAIN}


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written (ValueError naming it) by opening it for
    appending; a file made only by this check is removed again."""
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} cannot be written ({err.strerror or err}); give "
                         "a writable path") from None  # fmt: skip
    if not existed:
        out.unlink()


def run(config: EvalConfig) -> dict:
    """Load the model, answer the questions, write the completions; returns the summary.
    Inside `gspo eval` (quiet unless --verbose) library output goes to ``--out``'s name with
    ``.library.log`` (gspo.train.console)."""
    from gspo.train.console import to_log

    questions = load_questions(config)
    out = Path(config.out)
    check_writable(out)  # before the model loads and every question is asked
    with to_log(out.with_suffix(".library.log")):
        return _run(config, questions)


def _run(config: EvalConfig, questions: list[dict]) -> dict:
    import torch

    from gspo.train import data, models
    from gspo.train.distributed import pick_device
    from gspo.train.engines.registry import engine_class

    torch.manual_seed(config.seed)
    m = config.policy
    model, tokenizer = models.load(m.model, layers=m.tiny_layers, hidden=m.tiny_hidden,
                                   seed=config.seed)  # fmt: skip
    models.use_chat_template(tokenizer, m.chat_template)
    # the rule gspo train applies at start: --max-prompt-tokens, and the model's positions
    (questions,), _, longest = data.fit([questions], tokenizer, model, config,
                                        labels=("question",))  # fmt: skip
    if not questions:
        raise ValueError(f"--max-prompt-tokens {config.data.max_prompt_tokens} drops every "
                         "question; raise it")  # fmt: skip
    device = pick_device(config.device)
    model.to(device).eval()
    sampler = engine_class(config.sampling.rollout).for_eval(
        model, tokenizer, config.sampling, device=device, seed=config.seed,
        batch_size=config.sequences_per_call,
        prompt_tokens=data.engine_prompt_tokens(config, longest))  # fmt: skip
    start = time.perf_counter()
    try:
        summary, records = evaluate(model, tokenizer, questions, config, sampler)
    finally:
        sampler.close()
    seconds = round(time.perf_counter() - start, 1)
    summary = {"model": m.model, "task": config.data.task, "engine": config.sampling.rollout,
               **summary, "seconds": seconds, "completions": config.out}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return summary
