"""models.load refuses what would train wrong numbers with exit 0 (issue 16, item 5): a
checkpoint that leaves weights uninitialised (transformers fills them at random and goes
on), and a model whose forward computes other log-probs than the trainer's path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gspo.train import models
from gspo.train.tiny import tiny_model, tiny_tokenizer


def _untied_without_head(path):
    """An HF directory whose config says the LM head is its own weight, but whose
    checkpoint has no lm_head.weight (as when the head was tied at save time)."""
    model, tok = tiny_model(layers=1, hidden=32, seed=0), tiny_tokenizer()
    model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    tok.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_checkpoint_missing_the_untied_head_is_refused(tmp_path):
    _untied_without_head(tmp_path)
    with pytest.raises(ValueError, match=r"uninitialised \(lm_head.weight\)"):
        models.load(str(tmp_path))


def test_gspo_train_exits_2_naming_the_tensor_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from gspo.train.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _untied_without_head(model_dir)
    monkeypatch.chdir(tmp_path)
    code = main(["--model", str(model_dir), "--run-dir", "run", "--steps", "1",
                 "--no-progress", "--no-plot"])  # fmt: skip
    assert code == 2
    assert "lm_head.weight" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_complete_checkpoint_loads_and_its_logprobs_check_passes(tmp_path):
    model, tok = tiny_model(layers=1, hidden=32, seed=0), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = models.load(str(tmp_path))
    assert models.check_logprobs(loaded, "dir") < 1e-5


def test_a_forward_that_transforms_logits_is_refused_with_the_difference():
    """model(ids).logits doubled by a hook (as an architecture with a logit multiplier the
    trainer does not know): the trainer's log-probs would be those of the unscaled head."""
    model = tiny_model(layers=1, hidden=32, seed=0)

    def doubled(module, args, kwargs, out):
        out.logits = out.logits * 2
        return out

    model.register_forward_hook(doubled, with_kwargs=True)
    with pytest.raises(ValueError, match=r"differ .* by up to \d"):
        models.check_logprobs(model, "doubled")


def test_the_check_leaves_the_rng_and_the_modes_alone():
    model = tiny_model(layers=1, hidden=32, seed=0).train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    torch.manual_seed(3)
    before = torch.get_rng_state()
    models.check_logprobs(model, "tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert [m.training for m in model.modules()] == modes
