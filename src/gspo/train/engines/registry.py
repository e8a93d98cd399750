"""The engine registry: ``--rollout``'s choices are its keys. Entries are import paths, so
listing the choices (``gspo train --help``) imports no engine and no torch."""

from __future__ import annotations

import importlib

ENGINES: dict[str, str] = {
    "hf": "gspo.train.engines.hf:HFEngine",  # transformers generate() on the policy itself
    "vllm": "gspo.train.engines.vllm:VLLMEngine",  # a vLLM engine in process, synced weights
    # vLLM servers started by `gspo serve`, weights pushed after each step
    "vllm-server": "gspo.train.engines.vllm_server:ServerEngine",
}


def register(name: str, path: str) -> None:
    """Make ``name`` a choice of ``--rollout``: ``path`` is ``"module:Class"``."""
    ENGINES[name] = path


def names() -> tuple[str, ...]:
    return tuple(ENGINES)


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise ValueError(f"--rollout {name!r}: use one of {list(ENGINES)}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
