"""Shared-prefix packing: each group's prompt runs once, its G responses attend to it.

A rollout batch holds G contiguous rows per prompt. The plain forward runs every row's
prompt again (``G * (P + R)`` tokens per group); here a group becomes one packed row::

    [prompt (P_g real tokens)] [response 1 (R_1)] [response 2 (R_2)] ... [response G]

with a block attention mask (a prompt token sees the prompt causally; a token of response i
sees the whole prompt and response i causally, never another response) and position ids
that restart at P_g for every response. Each token then has the same keys, values and
position as in its own row of the plain forward, so the log-probs are the same, and the
gradients of all G responses flow into the one prompt pass (Prefix Grouper,
arXiv 2506.05433). Padding is gone too: only the real tokens are packed (left padding of the
prompt, and response slots after EOS, are dropped); rows are padded at their tail to the
longest packed row, and a padding slot attends only to itself (no empty softmax row, so no
NaN reaches the backward).

The position ids equal what the plain path builds from the attention mask (cumsum - 1 over
the row's real tokens), so absolute (GPT-2) and rotary positions are the same.

"Group" means a run of adjacent rows whose first ``prompt_len`` columns (ids where the mask
is 1, and the mask) are identical: found from the data, so a micro-batch that cuts a group
in two, or two groups with the same prompt, stay exact.

Shapes: B rows, L = prompt_len + T columns, S packed rows (one per group), N packed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Model types whose decoder takes position ids for its positions (rotary or learned
# absolute) and builds its attention from the mask it is given: packing is exact for them.
# ALiBi models (Bloom, MPT, Falcon with alibi) derive positions from key indices instead,
# and others may have masks of their own; they run the plain path.
SHARED_PREFIX_MODELS = frozenset(
    {"qwen2", "qwen3", "llama", "mistral", "gpt2", "gemma", "phi3", "olmo", "olmo2"}
)


@dataclass
class Packed:
    """One packed row per group.

    input_ids [S, N]; position_ids [S, N]; segment [S, N] long (0 prompt, i response i,
    -1 tail padding); source [B, L] long: the flat index (row * N + position) of each
    original token in the packed batch, -1 where the original is padding.

    For attention without an N x N mask (gspo.prefix_attention): rows [M, Lr] long, one row
    per response (M responses), the flat packed indices of its group's prompt then its own
    tokens, tail-padded with the row's last real index, so causal attention over a row is
    exactly that response's attention; back [S, N] long, the flat index (row * Lr + column)
    in ``rows`` whose output each packed position takes (a prompt token's from its group's
    first response row; a padding slot's from any slot, its output is never read).
    """

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    source: Tensor
    rows: Tensor
    back: Tensor

    @property
    def tokens(self) -> int:
        """Tokens the decoder runs on: S x N (tail padding included)."""
        return self.input_ids.numel()

    @property
    def keep(self) -> Tensor:
        """[S, N, N] bool, True = query position may attend to key position: the dense
        block mask (a prompt token sees the prompt causally, a response token the prompt
        and itself causally; a padding slot sees only itself). The reference the maskless
        attention is tested against; N^2 memory, so built only when asked for."""
        n = self.segment.shape[1]
        q, kk = self.segment[:, :, None], self.segment[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        keep = causal & (q >= 0) & ((kk == 0) | (kk == q))
        return keep | torch.eye(n, dtype=torch.bool, device=q.device)  # padding sees itself


def groups(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> list[slice]:
    """Runs of adjacent rows with the same prompt (ids where the mask is 1, and the mask)."""
    mask = attention_mask[:, :prompt_len] != 0
    prompt = torch.where(mask, input_ids[:, :prompt_len], -1)
    same = (prompt[1:] == prompt[:-1]).all(dim=1).tolist()
    out, start = [], 0
    for i, s in enumerate(same, start=1):
        if not s:
            out.append(slice(start, i))
            start = i
    out.append(slice(start, input_ids.shape[0]))
    return out


def packed_lengths(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> list[int]:
    """Packed row length of each group: its prompt's real tokens once, every response's."""
    real = attention_mask != 0
    return [int(real[g.start, :prompt_len].sum()) + int(real[g, prompt_len:].sum())
            for g in groups(input_ids, attention_mask, prompt_len)]  # fmt: skip


def pack(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Packed:
    """The packed batch of ``input_ids`` [B, L] (module docstring)."""
    b, n_cols = input_ids.shape
    device = input_ids.device
    real = attention_mask != 0
    spans = groups(input_ids, attention_mask, prompt_len)
    rows = []  # per group: (token columns of the prompt, [(row, response columns)])
    for g in spans:
        prompt_cols = real[g.start, :prompt_len].nonzero()[:, 0]
        responses = [(r, prompt_len + real[r, prompt_len:].nonzero()[:, 0])
                     for r in range(g.start, g.stop)]  # fmt: skip
        rows.append((g.start, prompt_cols, responses))
    length = max(len(p) + sum(len(c) for _, c in rs) for _, p, rs in rows)
    s = len(rows)
    ids = input_ids.new_zeros(s, length)
    pos = torch.zeros(s, length, dtype=torch.long, device=device)
    seg = torch.full((s, length), -1, dtype=torch.long, device=device)  # 0 prompt, i response
    source = torch.full((b, n_cols), -1, dtype=torch.long, device=device)
    for k, (first, prompt_cols, responses) in enumerate(rows):
        n_p = len(prompt_cols)
        ids[k, :n_p] = input_ids[first, prompt_cols]
        pos[k, :n_p] = torch.arange(n_p, device=device)
        seg[k, :n_p] = 0
        at = n_p
        for i, (r, cols) in enumerate(responses, start=1):
            n = len(cols)
            ids[k, at : at + n] = input_ids[r, cols]
            pos[k, at : at + n] = torch.arange(n_p, n_p + n, device=device)
            seg[k, at : at + n] = i
            source[r, prompt_cols] = k * length + torch.arange(n_p, device=device)
            source[r, cols] = k * length + torch.arange(at, at + n, device=device)
            at += n
    rows, back = _rows(rows, length, device)
    return Packed(input_ids=ids, position_ids=pos, segment=seg, source=source,
                  rows=rows, back=back)  # fmt: skip


def _rows(groups_cols, length: int, device) -> tuple[Tensor, Tensor]:
    """(rows [M, Lr], back [S, N]) of Packed from each group's (first row, prompt columns,
    [(row, response columns)]), in packed positions."""
    spans = []  # per response: (group, prompt length, start, end) in packed positions
    for k, (_, prompt_cols, responses) in enumerate(groups_cols):
        at = n_p = len(prompt_cols)
        for _, cols in responses:
            spans.append((k, n_p, at, at + len(cols)))
            at += len(cols)
    width = max(n_p + end - start for _, n_p, start, end in spans)
    rows = torch.empty(len(spans), width, dtype=torch.long)
    back = torch.zeros(len(groups_cols), length, dtype=torch.long)
    first = set()
    for m, (k, n_p, start, end) in enumerate(spans):
        index = torch.cat([torch.arange(n_p), torch.arange(start, end)]) + k * length
        rows[m, : len(index)] = index
        rows[m, len(index) :] = index[-1]  # causal: a tail slot is never a real token's key
        back[k, start:end] = m * width + torch.arange(n_p, n_p + end - start)
        if k not in first:  # the prompt's outputs: the same in every row of the group
            first.add(k)
            back[k, :n_p] = m * width + torch.arange(n_p)
    return rows.to(device), back.to(device)


def cheaper(model: torch.nn.Module, plain: tuple[int, int], packed: tuple[int, int],
            rows: tuple[int, int] | None = None) -> bool:
    """Whether the packed forward (S rows of N) costs fewer FLOPs than the plain one (B rows
    of L), per layer: each token's weight products (2 x the layer's weights) plus the
    attention's two products, 4 H per query-key pair the kernel computes. The plain rows
    and a dense block mask compute every pair (a mask keeps SDPA from skipping any: L^2,
    N^2). ``rows`` = (M, Lr) prices the maskless attention instead (gspo.prefix_attention:
    M gathered rows of Lr under causal SDPA, which computes about the lower half, Lr^2 / 2;
    the plain rows are then priced at their causal half too, so a batch that shares nothing
    does not pack).

    With the dense mask, packing wins when prompts are long next to responses (the recipe:
    P = 60, R = 20, G = 8 packs 8 x 80 tokens into about 220) and loses with long responses,
    whose packed row's N^2 grows past the G x L^2 it saves; with ``rows`` the attention
    costs no more than the plain rows', so sharing the prompt's weight products decides."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config  # fmt: skip
    hidden = config.hidden_size
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    weights = sum(p.numel() for n, p in model.named_parameters()
                  if ".layers." in n or ".h." in n) / max(layers, 1)  # fmt: skip
    (b, length), (s, n) = plain, packed
    if rows is None:
        attention, plain_attention = 4 * hidden * s * n * n, 4 * hidden * b * length**2
    else:  # the plain rows priced at the causal half too: pack only for a real saving
        attention, plain_attention = 2 * hidden * rows[0] * rows[1] ** 2, 2 * hidden * b * length**2
    return s * n * 2 * weights + attention < b * length * 2 * weights + plain_attention


def attention_mask_4d(keep: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """[S, 1, N, N] in the form the model's attention takes: bool for SDPA (True = attend),
    additive for eager (0 or the dtype's minimum, as transformers builds it)."""
    keep = keep[:, None]
    if implementation in ("sdpa", "gspo_sdpa"):
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, torch.finfo(dtype).min
    )


def unsupported(model: torch.nn.Module, length: int | None = None) -> str | None:
    """Why packing would not be exact for ``model`` (None: it is).

    Exact needs: a model type in SHARED_PREFIX_MODELS, SDPA or eager attention (FlashAttention
    and flex take no 4D mask), every layer full attention, and no sliding window shorter
    than the packed ``length`` (checked only when given; transformers measures windows in
    key indices, which packing moves).
    """
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(text, "model_type", None)
    if kind not in SHARED_PREFIX_MODELS:
        return f"model type {kind!r} is not one packing is known exact for"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "gspo_sdpa", "eager"):
        return f"attention implementation {implementation!r} takes no 4D mask"
    layer_types = getattr(text, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return "some layers are not full attention"
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and length and length > window:
        return f"sliding window {window} shorter than the packed rows ({length})"
    return None
