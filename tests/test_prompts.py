"""Chat templates at start: a template that fails is one line naming the prompt and the flag
to change (exit 2), and a conversation that ends with an assistant message is continued.

The tokenizers are real ones built here (the built-in character tokenizer with a template
attached; nothing is downloaded). Measured on main before the fix: a Gemma-style template
with --system-prompt ended `gspo train` in a 51-line Jinja traceback and exit 1, and the
prefill below rendered as '<user>q</user><assistant>Answer:</assistant><assistant>'.
"""

from __future__ import annotations

import dataclasses

import pytest

from gspo.train.config import TrainConfig
from gspo.train.data import fit_prompts
from gspo.train.rollout import encode_prompts, render_prompt
from gspo.train.tiny import tiny_model, tiny_tokenizer

# Gemma's template refuses a system message with raise_exception; the rest is a plain
# role-tagged transcript (Gemma's own also checks that roles alternate).
GEMMA_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TRANSCRIPT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tokenizer(template: str):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained trace
    return message


# ---------------------------------------------------------------- a template that raises


def test_a_template_that_refuses_the_system_prompt_names_the_prompt_and_the_flag():
    tok = tokenizer(GEMMA_LIKE)
    assert render_prompt(tok, "what is 2 plus 2?") == "<user>what is 2 plus 2?</user><assistant>"
    message = one_line_error(lambda: encode_prompts(tok, [{"prompt": "what is 2 plus 2?"}],
                                                    system_prompt="Be brief."))  # fmt: skip
    assert "'what is 2 plus 2?'" in message  # the prompt
    assert "System role not supported" in message  # the template's own reason
    assert "drop --system-prompt" in message  # the flag to change


def test_a_conversation_the_template_refuses_names_the_prompt_and_the_data():
    # Two user messages in a row: the system prompt is not the cause, so not the fix.
    tok = tokenizer(GEMMA_LIKE)
    prompt = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for system in (None, "Be brief."):
        message = one_line_error(lambda s=system: render_prompt(tok, prompt, s))
        assert "roles must alternate" in message and "'content': 'b'" in message
        assert "--prompts / --dataset" in message and "--system-prompt" not in message


def test_a_template_that_cannot_be_rendered_is_one_line_too():
    # An undefined filter is a Jinja error raised while the template compiles.
    tok = tokenizer("{{ messages | no_such_filter }}")
    message = one_line_error(lambda: render_prompt(tok, "sum 07:"))
    assert "'sum 07:'" in message and "no_such_filter" in message and "(--model)" in message


def test_template_errors_surface_when_prompts_are_first_fitted():
    """data.fit_prompts encodes every prompt at start (before any step), so the error is
    raised there, as a ValueError that `gspo train` prints in one line with exit 2."""
    tok = tokenizer(GEMMA_LIKE)
    model = tiny_model(layers=1, hidden=32)
    pool = [{"prompt": "sum 07:"}, {"prompt": "sum 12:"}]
    config = TrainConfig(system_prompt="Be brief.")
    message = one_line_error(lambda: fit_prompts(pool, pool[:1], tok, model, config))
    assert "'sum 07:'" in message and "drop --system-prompt" in message
    kept, held, dropped, _ = fit_prompts(pool, pool[:1], tok, model,
                                      dataclasses.replace(config, system_prompt=None))  # fmt: skip
    assert (kept, held, dropped) == (pool, pool[:1], 0)


def test_gspo_train_exits_2_with_one_line(tmp_path, capsys):
    from gspo.train.cli import main

    model_dir = tmp_path / "gemma-like"
    tiny_model(layers=1, hidden=32).save_pretrained(model_dir)
    tokenizer(GEMMA_LIKE).save_pretrained(model_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    rc = main(["--model", str(model_dir), "--system-prompt", "Be brief.", "--steps", "1",
               "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gspo train: error: "), err
    assert "System role not supported" in lines[0] and "drop --system-prompt" in lines[0]


# ---------------------------------------------------------------- prefill


def test_a_final_assistant_message_is_continued_not_closed():
    """TRL's conversational format: messages ending with an assistant message are a prefill
    the model continues. The text is the whole conversation's render cut right after that
    message's content; the bug closed it and opened an empty turn instead
    ('...<assistant>Answer:</assistant><assistant>')."""
    tok = tokenizer(TRANSCRIPT)
    prompt = [{"role": "user", "content": "what is 2 plus 2?"},
              {"role": "assistant", "content": "Answer:"}]  # fmt: skip
    text = render_prompt(tok, prompt)
    assert text == "<user>what is 2 plus 2?</user><assistant>Answer:"
    closed = tok.apply_chat_template(prompt, tokenize=False)
    assert closed.startswith(text) and closed[len(text) :] == "</assistant>"
    # The system prompt still goes first; the ids the engines feed are this text's.
    with_system = render_prompt(tok, prompt, "Be brief.")
    assert with_system == f"<system>Be brief.</system>{text}"
    ids = encode_prompts(tok, [{"prompt": prompt}], "Be brief.")
    assert ids == [tok(with_system, add_special_tokens=False)["input_ids"]]
    # A conversation ending with a user message still opens the assistant's turn.
    assert render_prompt(tok, prompt[:1]) == "<user>what is 2 plus 2?</user><assistant>"


def test_a_template_that_cannot_continue_a_message_is_one_line():
    # This template upper-cases what it prints, so the final message cannot be found in the
    # text to continue; transformers' own error spans several lines and quotes the render.
    tok = tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer:"}]
    message = one_line_error(lambda: render_prompt(tok, prompt))
    assert "end the prompt's messages with a user message" in message
