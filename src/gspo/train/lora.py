"""LoRA through PEFT: low-rank adapters on the decoder's linear layers, the base frozen.

A targeted linear layer ``y = x W^T + b`` (W [out, in]) computes

    y = x (W + s B A)^T + b,      A [r, in], B [out, r], s = lora_alpha / lora_r

with A Kaiming-uniform and B zero at the start (PEFT's init: the wrapped model starts as
the base model), and only A and B train. What the trainer does with it:

- the policy is ``peft.get_peft_model(model)`` (``wrap``); the optimizer gets A and B only;
- the KL reference is the same model with its adapters disabled (``reference_logprobs``):
  the base weights never change, so no second copy of them is kept;
- the rollout engine that holds its own weights (vLLM) gets ``W + s B A`` under the base
  model's names, computed into fresh tensors one layer at a time (``merged_params``):
  the policy is never merged in place, so repeated syncs cannot drift its weights
  (a bf16 merge + unmerge does not give W back);
- checkpoints hold the adapter (``adapter_model.safetensors`` + ``adapter_config.json``,
  PEFT's ``save_pretrained``), resume loads the base model and then the adapter;
- ``RUN_DIR/model`` is the adapter (+ tokenizer, + ``gspo-base.json`` naming the base so
  that ``gspo eval --model RUN_DIR/model`` rebuilds it); ``--merge`` adds ``RUN_DIR/merged``.

Only PEFT's mechanics live here; gspo.train.models.LoraPolicy puts them behind the same
calls as full fine-tuning, so that the loop reads the same with or without LoRA.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from gspo.train import distributed as dd
from gspo.train import gguf
from gspo.train.rollout import eval_mode

ADAPTER = "default"  # PEFT's name for the one adapter we train
BASE_FILE = "gspo-base.json"  # in an adapter directory: how to rebuild its base model
INSTALL_HINT = "--lora-r needs PEFT: `pip install 'gspo[train]'` (or `pip install peft`)"


def alpha(config) -> float:
    """--lora-alpha, or 2 r when none: the scale s = alpha / r is then 2 at any rank."""
    return float(config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r)


def wrap(model, config):
    """``model`` with LoRA adapters (a ``peft.PeftModel``) as ``config`` (a TrainConfig)
    asks: rank ``lora_r``, ``lora_alpha``, ``lora_targets``, ``lora_dropout``.

    The adapters' initial values come from ``config.seed`` alone, so every rank builds
    the same ones and the caller's random stream is left as it was."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ValueError(f"{INSTALL_HINT}; import failed: {err}") from None
    targets = list(config.lora_targets) or "all-linear"  # PEFT's: not the output layer
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=alpha(config),
                             lora_dropout=config.lora_dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")  # fmt: skip
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(config.seed)
        # GPT-2's Conv1D: PEFT switches to fan_in_fan_out itself (merged_params follows it)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        try:
            peft_model = get_peft_model(model, lora_config)
        except ValueError as err:  # e.g. "Target modules {'qkv'} not found in the base model"
            raise ValueError(f"--lora-targets {' '.join(config.lora_targets)!r}: {err}") from None
    _check_layers(peft_model, config)
    # adapter_config.json names the base directory, so that PEFT alone finds it too
    # (AutoPeftModelForCausalLM); the built-in tiny model has none.
    source = Path(getattr(model.config, "_name_or_path", "") or "")
    found = str(source.resolve()) if str(source) and source.is_dir() else None
    peft_model.peft_config[ADAPTER].base_model_name_or_path = found
    peft_model.gspo_base = base_description(config)  # written beside the adapter
    return peft_model


def _check_layers(peft_model, config) -> None:
    """Adapters on linear layers of the decoder only. On the embeddings or the LM head
    (often one tied tensor) a merged update would untie them, and vLLM and from_pretrained
    would silently re-tie them to one of the two."""
    from peft.tuners.lora import Linear

    inner = peft_model.get_base_model()
    shared = [inner.get_input_embeddings(), inner.get_output_embeddings()]
    for name, module in inner.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        if not isinstance(module, Linear) or any(m in (module, module.base_layer)
                                                 for m in shared):  # fmt: skip
            kind = type(module.get_base_layer()).__name__
            raise ValueError(
                f"--lora-targets {' '.join(config.lora_targets)!r} matches {name} ({kind}); "
                "LoRA here adapts linear layers of the decoder only, not embeddings or the LM "
                "head: name others, or give none for every linear layer"
            )


class AdapterDisabled:
    """Calls ``logprobs`` with the PEFT model's adapters switched off: the base model's
    log-probs (``peft.PeftModel.disable_adapter``), in eval mode (the reference runs
    without dropout, as the frozen copy of full fine-tuning does). Holds no weights of its
    own."""

    def __init__(self, logprobs, peft_model):
        self.logprobs, self.peft_model = logprobs, peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter(), eval_mode(self.peft_model):
            return self.logprobs(*args, **kwargs)


# ---------------------------------------------------------------- weights for the sampler


def merged_params(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of the base model with the adapters merged, under the base
    model's own names (``model.layers.0.self_attn.q_proj.weight``), one at a time.

    Equals ``copy.deepcopy(peft_model).merge_and_unload().state_dict()`` (tied weights
    once, as ``dd.full_params``): for an adapted layer ``W + s (B @ A)`` (transposed for
    GPT-2's Conv1D, whose W is [in, out]) in a fresh tensor; every other tensor as it is.
    The policy's own tensors are never written. Under FSDP2 every rank must run this
    (each full tensor is an all-gather).
    """
    inner = peft_model.get_base_model()
    layers = {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, value in dd.full_params(inner):
            module, _, leaf = name.rpartition(".")
            if ".lora_" in name:  # lora_A.default.weight, lora_B.default.weight
                continue
            if module.endswith(".base_layer"):
                module = module.removesuffix(".base_layer")
                if leaf == "weight":
                    value = value + _delta(layers[module]).to(value.dtype)
            yield f"{module}.{leaf}", value


def _delta(layer) -> torch.Tensor:
    """s B A of one adapted layer, as a full tensor in W's layout."""
    a, b = (_full(getattr(layer, part)[ADAPTER].weight) for part in ("lora_A", "lora_B"))
    delta = (b @ a) * layer.scaling[ADAPTER]
    return delta.T if layer.fan_in_fan_out else delta


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


# ---------------------------------------------------------------- save and load


def adapter_state_dict(model, world: dd.World) -> dict[str, torch.Tensor] | None:
    """The adapter's A and B as full tensors on rank 0 (None elsewhere): what a checkpoint
    saves of a LoRA policy."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = _full(p)  # a collective under FSDP2: every rank, the same order
            if world.main:
                state[name] = value.cpu().clone()
    return state if world.main else None


def save_adapter(model, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (from ``adapter_state_dict``) as PEFT's adapter directory
    (adapter_model.safetensors + adapter_config.json, which ``peft.PeftModel.from_pretrained``
    loads onto the base) with ``BASE_FILE`` naming the base."""
    directory = Path(directory)
    # save_embedding_layers=False: "auto" would look the base model up on the Hub
    model.save_pretrained(directory, state_dict=state, safe_serialization=True,
                          save_embedding_layers=False)  # fmt: skip
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    if getattr(model, "gspo_base", None):
        (directory / BASE_FILE).write_text(json.dumps(model.gspo_base, indent=1) + "\n")


def load_adapter(model, path: Path) -> None:
    """Load a checkpoint's adapter into ``model`` (a PeftModel) in place, after checking
    that its rank, alpha and targets are this run's."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise ValueError(f"checkpoint {path} holds a whole model, not a LoRA adapter; resume "
                         "it without --lora-r (as its run was started)")  # fmt: skip
    saved = json.loads((path / "adapter_config.json").read_text())
    built = model.peft_config[ADAPTER]
    for key, flag in (("r", "lora_r"), ("lora_alpha", "lora_alpha"),
                      ("target_modules", "lora_targets")):  # fmt: skip
        mine = getattr(built, key)
        theirs = saved.get(key)
        if isinstance(mine, set | list | tuple):
            mine, theirs = sorted(mine), sorted(theirs or [])
        if mine != theirs:
            raise ValueError(f"checkpoint {path}: its adapter has {key} {theirs}, this run's "
                             f"--{flag.replace('_', '-')} gives {mine}; resume with the run's "
                             "own LoRA settings")  # fmt: skip
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"),
                                       adapter_name=ADAPTER)  # fmt: skip
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path}: the adapter does not fit the model: missing "
                         f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}")  # fmt: skip


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_base(path: Path) -> dict:
    """How to rebuild an adapter directory's base model: ``BASE_FILE``, or else PEFT's
    ``base_model_name_or_path``."""
    path = Path(path)
    base_file = path / BASE_FILE
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        base = {"model": json.loads((path / "adapter_config.json").read_text())
                .get("base_model_name_or_path")}  # fmt: skip
    if not base.get("model"):
        raise ValueError(f"--model {str(path)!r} is a LoRA adapter whose base model is not "
                         f"recorded (no {BASE_FILE}, no base_model_name_or_path); load it "
                         "with peft onto its base yourself")  # fmt: skip
    return base


def merge_adapter(model, path: Path):
    """``model`` (the base) with the adapter of ``path`` merged in, as a plain model whose
    parameters all train (PEFT leaves the base frozen; as ``--model`` it trains whole)."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ValueError(f"--model {str(path)!r} is a LoRA adapter; {INSTALL_HINT}; "
                         f"import failed: {err}") from None
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.requires_grad_(True)


def base_description(config) -> dict:
    """``BASE_FILE``'s content: what ``gspo.train.models.load`` needs to rebuild the base
    (a path made absolute, so the adapter still finds it from another directory)."""
    model = config.model
    if model != "tiny" and model not in gguf.PACKAGED:
        model = str(Path(model).resolve())
    return {"model": model, "tiny_layers": config.tiny_layers,
            "tiny_hidden": config.tiny_hidden, "seed": config.seed}  # fmt: skip
