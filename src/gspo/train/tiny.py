"""The built-in model: a small random Qwen2 and a character-level tokenizer, built in code.

Nothing here downloads anything. The tokenizer is a Hugging Face ``PreTrainedTokenizerFast``
over a ``tokenizers`` WordLevel vocabulary of single characters, so ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` round-trip it like any other tokenizer.
"""

from __future__ import annotations

import string

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Specials first so their ids are fixed (0..3); then every character a task can print.
CHARS = string.digits + string.ascii_lowercase + " =:+-*,.?!()"
VOCAB = [PAD, BOS, EOS, UNK, *CHARS]


def tiny_tokenizer():
    """A character-level fast tokenizer: each character is one token, no BOS added.

    It is byte-level BPE with no merges: characters are spelled as GPT-2 byte symbols (a
    space is "Ġ"). That is exactly what ``Qwen2Tokenizer`` expects, and ``AutoTokenizer``
    loads a directory whose config.json says ``qwen2`` with that class whatever
    tokenizer_config.json says; a plain WordLevel vocab would lose its spaces on reload.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {_byte_symbol(tok): i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation appends on the right
        clean_up_tokenization_spaces=False,
    )
    return tok


def _byte_symbol(token: str) -> str:
    """The GPT-2 byte-level spelling of a one-character token (specials stay as they are)."""
    if len(token) != 1:
        return token
    return _BYTE_SYMBOLS[token]


def _byte_symbols() -> dict[str, str]:
    # GPT-2's table: printable bytes map to themselves, the rest (space included) are shifted
    # past 255 so that every byte is a visible character.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = chr(b)
        else:
            table[chr(b)] = chr(256 + shift)
            shift += 1
    return table


_BYTE_SYMBOLS = _byte_symbols()


def tiny_model(*, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM; the same seed gives the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=VOCAB.index(PAD),
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        use_cache=True,
    )
    # fork_rng: building the model must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model
