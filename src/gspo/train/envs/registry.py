"""The environment registry: ``--env``'s built-in names. Entries are import paths, so listing
them (``gspo train --help``) imports nothing heavy; ``--env module:Class`` needs no entry."""

from __future__ import annotations

ENVS: dict[str, str] = {
    "calculator": "gspo.train.envs.calculator:Calculator",  # <calc>...</calc>, exact values
}


def register(name: str, path: str) -> None:
    """Make ``name`` a built-in of ``--env``: ``path`` is ``"module:Class"``."""
    ENVS[name] = path


def names() -> tuple[str, ...]:
    return tuple(ENVS)
