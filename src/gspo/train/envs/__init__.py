"""Environments: multi-turn episodes behind reset / step / reward (docs/environments.md).

    base.py        the contract, EnvError, and the loader of ``--env`` (a name or module:Class)
    registry.py    the built-in environments by name: register(name, path), names()
    calculator.py  ``<calc>EXPRESSION</calc>`` answered exactly (its own evaluator, no eval)

The episode runner that renders turns into token ids is gspo.train.episodes.
"""

from __future__ import annotations

from gspo.train.envs.base import EnvError, load_env
from gspo.train.envs.registry import ENVS, names, register

__all__ = ["ENVS", "EnvError", "load_env", "names", "register"]
