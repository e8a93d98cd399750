"""Multi-turn episodes with thinking-model templates and SentencePiece-style tokenizers
(docs/environments.md, "Turns in token ids"): an episode is the model's own tokens as
sampled plus each environment message as the template renders it after the model's turn,
tokenized in context, never re-rendered.

tests/data/tiny-qwen3.jinja is Qwen3's template logic in the tiny tokenizer's alphabet:
past think blocks dropped, an empty think block before a final assistant turn, tool
results as user turns. Such a template does not render a conversation as the beginning of
its continuation, which the episodes used to require (it was refused at start)."""

from __future__ import annotations

import json

import pytest

from gspo.train.cli import main
from gspo.train.episodes import Turns
from gspo.train.tiny import tiny_tokenizer
from test_train_e2e import REPO, TINY, rows
from test_train_envs import Digits

QWEN3 = str(REPO / "tests" / "data" / "tiny-qwen3.jinja")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


class Thinks(Digits):
    """Digits, but the first reply is answered with two tool results (rendered by
    tiny-qwen3 as one user turn)."""

    def step(self, reply):
        self.replies.append(reply)
        if len(self.replies) == 2:
            return None
        return [{"role": "tool", "name": "count", "content": str(len(reply))},
                {"role": "tool", "name": "count", "content": "0"}]  # fmt: skip


def _metaspace_tokenizer():
    """A BPE tokenizer with a Metaspace pre-tokenizer, prepend_scheme "first" (as current
    Llama/Mistral conversions): only the first piece of an input gets a word boundary "▁",
    so a text tokenized alone starts with one that it does not have after a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["user assistant what is two plus three the answer is five", "calc 2 + 3 = 5",
              "more please"] * 20  # fmt: skip
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789+=\n ▁")
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, initial_alphabet=alphabet,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", pad_token="</s>")  # fmt: skip
    tok.chat_template = CHATML
    return tok


def test_a_metaspace_tokenizer_gets_no_token_the_template_rendering_lacks():
    """Two environment turns: the episode's ids equal the ids of the template's own
    rendering of the whole conversation; each environment text tokenized alone would have
    one "▁" more (the issue's 152 tokens where the rendering has 150)."""
    tok = _metaspace_tokenizer()
    turns = Turns(tok, None, [tok.eos_token_id])
    conversation = [{"role": "user", "content": "what is two plus three"},
                    {"role": "assistant", "content": "calc 2 + 3"},
                    {"role": "user", "content": "2 + 3 = 5"},
                    {"role": "assistant", "content": "calc 5"},
                    {"role": "user", "content": "5 = 5"},
                    {"role": "assistant", "content": "the answer is five"}]  # fmt: skip

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    first = conversation[0]["content"]
    episode = turns.first_ids([first])[0]
    extras, alone = [], []
    for k in (1, 3, 5):
        # the model's reply as sampled: the ids the rendering has there (in context)
        context = tok.apply_chat_template(conversation[:k], tokenize=False,
                                          add_generation_prompt=True)  # fmt: skip
        assert ids(context) == episode
        reply = ids(context + conversation[k]["content"] + "<|im_end|>")[len(episode) :]
        episode = episode + reply
        if k < 5:
            later, message = conversation[1 : k + 1], conversation[k + 1]["content"]
            extras.append(turns.env_ids(first, later, reply, message))
            alone.append(ids(turns.env_text(first, later, reply, message)))
            episode = episode + extras[-1]
    whole = ids(tok.apply_chat_template(conversation, tokenize=False))
    assert episode == whole[:-1]  # the rendering's last "\n" follows the episode's end
    for extra, own in zip(extras, alone, strict=True):
        assert tok.convert_ids_to_tokens(extra)[0] == "\n"
        assert own == [tok.convert_tokens_to_ids("▁"), *extra]  # what alone would add


def test_qwen3_style_episode_keeps_the_models_past_think_blocks():
    """The episode is what the model saw while it sampled: its past think blocks stay,
    which the template's own rendering of the same conversation drops (what a served
    model would see at inference); a tool result is the user turn the template makes of
    it, after the model's turn."""
    tok = tiny_tokenizer()
    tok.chat_template = open(QWEN3, encoding="utf-8").read()
    eos = tok.eos_token_id
    turns = Turns(tok, None, [eos])
    turns.check()  # refused at start before (not a prefix of its continuation)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    first = "sum 07:"
    reply1, reply2 = ids("(think)hm(end)43") + [eos], ids("(think)ok(end)52") + [eos]
    tools = [{"role": "tool", "name": "count", "content": "7"},
             {"role": "tool", "name": "count", "content": "8"}]  # fmt: skip
    later = [{"role": "assistant", "content": "(think)hm(end)43"}]
    extra = turns.env_ids(first, later, reply1, tools)
    episode = turns.first_ids([first])[0] + reply1 + extra + reply2
    assert tok.decode(episode) == (
        "user: sum 07:</s> assistant: (think)hm(end)43</s> "
        "user: (tool 7) (tool 8)</s> assistant: (think)ok(end)52</s>"
    )
    # a user message after the reply: the template now drops that reply's think block
    extra = turns.env_ids(first, later, reply1, "more:")
    episode = turns.first_ids([first])[0] + reply1 + extra + reply2
    assert tok.decode(episode) == (
        "user: sum 07:</s> assistant: (think)hm(end)43</s> "
        "user: more:</s> assistant: (think)ok(end)52</s>"
    )
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": first}, *later, {"role": "user", "content": "more:"},
         {"role": "assistant", "content": "(think)ok(end)52"}], tokenize=False)  # fmt: skip
    assert rendered == (
        "user: sum 07:</s> assistant: 43</s> user: more:</s> assistant: (think)ok(end)52</s> "
    )


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_qwen3_style_template_trains_through_env_with_on_policy_ratio_1(tmp_path, engine):
    """Two replies per episode with tool results between them, through tiny-qwen3: one
    minibatch per step, so the ratio of the update is exactly 1 (old log-probs of the same
    episodes), and the sampler's log-probs of the model's tokens are the trainer's
    (rounding apart): the tokens trained are the ones sampled, in the context sampled."""
    args = [*TINY]
    if engine == "vllm":
        pytest.importorskip("vllm")
        from test_train_vllm import TINY as VLLM

        args = [*VLLM]
    run = tmp_path / "run"
    assert main([*args, "--steps", "2", "--no-plot", "--minibatches", "1", "--env",
                 "test_thinking_templates:Thinks", "--chat-template", QWEN3,
                 "--run-dir", str(run)]) == 0  # fmt: skip
    for r in rows(run)[1:]:
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r
        assert r["turns_per_episode"] == 2 and r["tool_call_rate"] == 1.0, r
        assert r["mismatch_max_abs"] < (1e-5 if engine == "hf" else 1e-4), r
    turns = json.loads((run / "samples.jsonl").read_text().splitlines()[0])["completions"][0]
    assert [t["role"] for t in turns["turns"]] == ["user", "assistant", "tool", "tool",
                                                   "assistant"]  # fmt: skip
