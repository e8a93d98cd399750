"""gspo: Group Sequence Policy Optimisation.

The public API. Names load lazily so that ``from gspo import sequence_objective``
(the pure-Python reference) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "sequence_objective": "gspo.reference",
    "explain_objective": "gspo.reference",
    "advantages": "gspo.advantages",
    "gspo_loss": "gspo.loss",
    "token_logprobs": "gspo.chunked",
    "naive_token_logprobs": "gspo.logprobs",
    "gspo_loss_from_hidden": "gspo.chunked",
    "causal_lm_logprobs": "gspo.causal_lm",
    "CausalLMLogprobs": "gspo.causal_lm",
}

__all__ = [
    "CausalLMLogprobs",
    "__version__",
    "advantages",
    "causal_lm_logprobs",
    "explain_objective",
    "gspo_loss",
    "gspo_loss_from_hidden",
    "naive_token_logprobs",
    "sequence_objective",
    "token_logprobs",
]

if TYPE_CHECKING:  # for type checkers and IDEs only
    from gspo.advantages import advantages
    from gspo.causal_lm import CausalLMLogprobs, causal_lm_logprobs
    from gspo.chunked import gspo_loss_from_hidden, token_logprobs
    from gspo.logprobs import naive_token_logprobs
    from gspo.loss import gspo_loss
    from gspo.reference import explain_objective, sequence_objective


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'gspo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
