"""The objectives of ``gspo_loss``: one module each, registered in ``registry``.

Each module builds an ``Objective`` record (its batched loss, options and defaults, the
advantages it takes, its divisor and token-level metrics, the trainer's defaults) and
registers it when imported; ``registry.names()`` imports them all. docs/objectives.md says
how to add one.
"""

from gspo.objectives.registry import Inputs, Objective, get, names, register

__all__ = ["Inputs", "Objective", "get", "names", "register"]
