"""Per-reply facts: an episode records each reply's span and why it stopped, and why the
episode ended; --mask-truncated, --overlong-penalty and truncated_frac read those facts, for
one reply or many, and tool_call_rate counts only answers the model saw.

The bugs these pin (issue 23, all on the code before the facts): truncation was read at the
response column ``response_mask.sum() - 1``, which in an episode is an environment token
(every episode below was dropped); the overlong penalty compared the sum of all replies with
the one-reply limit; the episodes' own ``truncated_frac`` overwrote the batch's; a call on
the last allowed turn, never answered, counted in ``tool_call_rate``.

A scripted sampler writes fixed replies (the tiny tokenizer: no chat template, so the
environment's "more:" is appended as "\\nmore:\\n"), so every number is worked by hand."""

from __future__ import annotations

import torch

from gspo.train import distributed as dd
from gspo.train import episodes
from gspo.train.config import TrainConfig
from gspo.train.rollout import Continuation, stop_reason
from gspo.train.sampling import collect, concerns, reply_length, truncated
from gspo.train.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
MODEL = tiny_model(layers=1, hidden=32, seed=0)
EOS = TOK.eos_token_id
X, Y = TOK.convert_tokens_to_ids("1"), TOK.convert_tokens_to_ids("2")


class TwoReplies:
    """Answers the first reply with "more:", ends the episode after the second."""

    def __init__(self, **fields):
        self.prompt, self.replies = fields["prompt"], 0

    def reset(self):
        return self.prompt

    def step(self, reply):
        self.replies += 1
        return None if self.replies == 2 else "more:"

    def reward(self):
        return 1.0


class Scripted:
    """Replies from a script, per row and turn (``script[row][turn]``), as continue_ids would
    return them (generate_from: the pre-facts engine API, for running this on old code)."""

    def __init__(self, script, max_new_tokens):
        self.script, self.turn, self.max_new_tokens = script, 0, max_new_tokens

    def continue_ids(self, ids, *, n, greedy, seed=None):
        return [Continuation(ids=r, logp=[-0.5] * len(r),
                             stop=stop_reason(len(p), r, eos=[EOS],
                                              max_new_tokens=self.max_new_tokens, max_len=None))
                for p, r in zip(ids, self._next(len(ids)), strict=True)]  # fmt: skip

    def generate_from(self, ids, *, greedy):
        return [(c.ids, c.logp) for c in self.continue_ids(ids, n=1, greedy=greedy)]

    def more(self, live):
        return live

    def _next(self, live):
        rows = [s[self.turn] for s in self.script if len(s) > self.turn][:live]
        self.turn += 1
        return rows


# Four episodes of two replies each (--max-new-tokens 4):
#   0: [X X X X] (cut, answered)  [X EOS]           last reply ends at EOS: not truncated
#   1: [X EOS]                    [X X X X] (cut)   last reply cut: truncated
#   2: [X EOS]                    [Y Y EOS]         longest reply 3
#   3: [X EOS]                    [Y EOS]           longest reply 2
SCRIPT = [[[X] * 4, [X, EOS]], [[X, EOS], [X] * 4], [[X, EOS], [Y, Y, EOS]], [[X, EOS], [Y, EOS]]]


def _batch(max_turns=3, **change):
    config = TrainConfig(env="test_episode_facts:TwoReplies", max_turns=max_turns,
                         max_new_tokens=4, prompts_per_step=2, group_size=2, minibatches=1,
                         **change)  # fmt: skip
    sampler = Scripted(SCRIPT, 4)
    run = episodes.build(config.data, config.sampling, sampler, TOK, MODEL, None)
    pool = [{"prompt": "sum 07:", "id": 0}, {"prompt": "sum 12:", "id": 1}]
    return collect(lambda prompts, group_size, greedy: run.rollout(prompts, group_size=group_size,
                                                                  greedy=greedy),
                   pool, position=0, **concerns(config), world=dd.World(), score=run.score,
                   eos=[EOS], pad_id=TOK.pad_token_id), run  # fmt: skip


def test_each_reply_has_its_span_and_stop_reason_and_the_episode_its_end():
    batch, _ = _batch()
    r = batch.rollout
    env = len(TOK("\nmore:\n", add_special_tokens=False)["input_ids"])
    assert r.replies[0] == [(0, 4, "max_new_tokens"), (4 + env, 4 + env + 2, "eos")]
    assert r.replies[1] == [(0, 2, "eos"), (2 + env, 2 + env + 4, "max_new_tokens")]
    assert r.ends == ["done"] * 4
    for row, spans in enumerate(r.replies):  # the spans are exactly the model's tokens
        mask = torch.zeros(r.response_mask.shape[1], dtype=torch.bool)
        for start, end, _ in spans:
            mask[start:end] = True
        assert torch.equal(mask, r.response_mask[row])


def test_mask_truncated_drops_the_episodes_whose_last_reply_was_cut():
    """Only episode 1 is truncated (its last reply ran to --max-new-tokens); the old rule
    read an environment token at column mask.sum() - 1 and dropped all four."""
    batch, _ = _batch(mask_truncated=True)
    assert truncated(batch.rollout, [EOS]).tolist() == [False, True, False, False]
    assert batch.keep.tolist() == [True, False, True, True]
    assert batch.metrics["truncated_frac"] == 0.25 and batch.metrics["loss_frac"] == 0.75


def test_max_turns_cut_is_truncated_and_its_unanswered_call_is_no_tool_call():
    """--max-turns 1: the environment would answer every first reply, so every episode is
    cut (end "max_turns", truncated) and no model saw an answer: tool_call_rate 0 (the old
    code said 1.0)."""
    batch, run = _batch(max_turns=1, mask_truncated=True)
    assert batch.rollout.ends == ["max_turns"] * 4
    assert batch.metrics["truncated_frac"] == 1.0
    metrics = run.metrics(batch.rollout)
    assert metrics["tool_call_rate"] == 0.0 and metrics["cut_frac"] == 1.0
    assert "truncated_frac" not in metrics  # one key, one meaning: the batch's
    full, run = _batch(max_turns=3)
    assert run.metrics(full.rollout)["tool_call_rate"] == 1.0  # every first call answered


def test_overlong_penalty_reads_the_longest_reply_against_the_one_reply_limit():
    """--overlong-penalty 2, --max-new-tokens 4: penalty 0 up to 2 tokens, (2 - L) / 2 up to
    4. Longest replies 4, 4, 3, 2 -> -1, -1, -0.5, 0. The old code summed the replies
    (6, 6, 5, 4 tokens: -1, -1, -1, -1)."""
    batch, _ = _batch(overlong_penalty=2)
    assert reply_length(batch.rollout).tolist() == [4, 4, 3, 2]
    assert list(batch.rewards) == [0.0, 0.0, 0.5, 1.0]
    assert batch.metrics["overlong_penalty"] == (-1 - 1 - 0.5 + 0) / 4
