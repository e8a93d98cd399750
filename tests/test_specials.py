"""Special tokens in completions: rewards read the user's added special tokens, not the
model's own BOS / EOS / pad / UNK (rollout's module docstring states the rule).

Measured on main before the fix: the completion [7, </answer>, EOS] reached the reward as
'7' (decode with skip_special_tokens=True drops every special token), so a reward that
checks for '</answer>' scored 0.0 on every sample; now it reads '7</answer>' and scores 1.0.
"""

from __future__ import annotations

import torch

from gspo.train.engines.hf import generate
from gspo.train.rewards import score
from gspo.train.rollout import assemble
from gspo.train.tiny import tiny_model, tiny_tokenizer


def tokenizer_with_answer_tag():
    """The built-in tokenizer plus '</answer>' and '<tool>' declared as added special tokens
    (as a user would with tokenizer.add_special_tokens before saving the model)."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["</answer>", "<tool>"]})
    return tok


def ids(tok, *pieces):
    """Token ids of text pieces and special tokens, in order, no BOS added."""
    out = []
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
        elif piece in tok.get_added_vocab():
            out.append(tok.convert_tokens_to_ids(piece))
        else:
            out += tok(piece, add_special_tokens=False)["input_ids"]
    return out


def ends_with_tag(prompts, completions, **_):
    return [float(c.endswith("</answer>")) for c in completions]


def test_added_special_tokens_reach_the_reward():
    tok = tokenizer_with_answer_tag()
    eos = tok.eos_token_id
    responses = [
        ids(tok, "7", "</answer>", eos),  # the format the reward asks for
        ids(tok, "7", eos),  # no tag: must score 0
        ids(tok, "<tool>", "2+2", "</answer>", eos, "9"),  # after EOS: masked, not text
    ]
    r = assemble(tok, [{"prompt": "q"}] * 3, [[5]] * 3, responses, None, eos=[eos])
    assert r.completions == ["7</answer>", "7", "<tool>2+2</answer>"]
    # The bug's texts were ['7', '7', '2+2']: this reward gave [0, 0, 0].
    assert score(ends_with_tag, r.prompts, r.completions) == [1.0, 0.0, 1.0]


def test_the_models_own_markers_are_removed():
    """BOS, pad and UNK written mid-response carry no text, and every EOS id of the model
    ends the response (a second EOS id, e.g. Qwen's <|im_end|> next to <|endoftext|>, here
    the added '<tool>', is not text either)."""
    tok = tokenizer_with_answer_tag()
    bos, eos, pad, unk = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id
    tool = tok.convert_tokens_to_ids("<tool>")
    responses = [
        ids(tok, bos, "1", pad, "2", unk, "3", "</answer>", eos),
        ids(tok, "4", "</answer>", tool, "5"),  # '<tool>' is an EOS id in this run
    ]
    r = assemble(tok, [{"prompt": "q"}] * 2, [[5]] * 2, responses, None, eos=[eos, tool])
    assert r.completions == ["123</answer>", "4</answer>"]
    assert r.response_mask.sum(dim=1).tolist() == [8, 3]  # the EOS itself is a chosen token


def test_the_hf_engine_hands_the_tag_to_the_reward():
    """Through generate (the HF engine; vLLM's samples go through the same assemble): a
    model whose head always picks '</answer>' writes it, and the reward sees it."""
    tok = tokenizer_with_answer_tag()
    model = tiny_model(layers=1, hidden=32)
    model.resize_token_embeddings(len(tok))  # room for the added token
    tag = tok.convert_tokens_to_ids("</answer>")
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tag] = 10.0
    model.lm_head = head
    r = generate(model, tok, [{"prompt": "sum 07:"}], group_size=2, max_new_tokens=3,
                 greedy=True)  # fmt: skip
    assert r.completions == ["</answer>" * 3] * 2
    assert score(ends_with_tag, r.prompts, r.completions) == [1.0, 1.0]
