"""A step's batch (gspo.train.sampling): dynamic sampling refills tied groups and stops at
the round limit, tied groups and truncated completions never reach the loss (exactly zero
gradient, the loss of the kept sequences alone), loo advantages survive a refill, the soft
overlong penalty at its boundaries, and a resumed dynamic-sampling run equals a straight one."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from gspo.advantages import advantages
from gspo.causal_lm import CausalLMLogprobs
from gspo.loss import gspo_loss
from gspo.objectives import names
from gspo.train import distributed as dd
from gspo.train.cli import parse_config
from gspo.train.config import TrainConfig, TrainWarning
from gspo.train.loop import train
from gspo.train.report import step_metrics
from gspo.train.rewards import Scores
from gspo.train.rollout import Rollout
from gspo.train.sampling import collect, concerns, overlong_penalty, tied_groups, truncated
from gspo.train.tiny import tiny_model
from gspo.train.update import minibatch_loss, response_logprobs, update
from test_train_distributed import run_and_resume

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = 2, 0
G = 4

# ---------------------------------------------------------------- the soft overlong penalty


def test_overlong_penalty_matches_hand_values_at_the_boundaries():
    """L = 6 new tokens, buffer C = 2 (DAPO eq. 13): free up to L - C = 4 tokens; 5 is half
    way into the buffer, (4 - 5) / 2 = -0.5; 6 = L is (4 - 6) / 2 = -1; past L stays -1.
    A buffer measured from 0 instead of L - C would give -2.5 at 5; an off-by-one (start at
    L - C - 1) would give -0.5 at 4."""
    length = torch.tensor([0, 1, 4, 5, 6, 7])
    got = overlong_penalty(length, limit=6, buffer=2)
    assert got.tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -1.0]
    # buffer = L: the penalty starts at the first token, -1/6 per token
    got = overlong_penalty(torch.tensor([0, 1, 3, 6]), limit=6, buffer=6)
    torch.testing.assert_close(got, torch.tensor([0.0, -1 / 6, -0.5, -1.0]))
    # buffer 1: only a completion at the limit is punished
    assert overlong_penalty(torch.tensor([5, 6]), limit=6, buffer=1).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(length, limit=6, buffer=0)


def test_overlong_penalty_is_checked_against_max_new_tokens():
    with pytest.raises(ValueError, match="--overlong-penalty.*--max-new-tokens 6"):
        TrainConfig(overlong_penalty=7, max_new_tokens=6)
    with pytest.raises(ValueError, match="--max-sampling-rounds.*add --dynamic-sampling"):
        TrainConfig(max_sampling_rounds=3)
    with pytest.raises(ValueError, match="--max-sampling-rounds"):
        TrainConfig(max_sampling_rounds=0, dynamic_sampling=True)
    assert TrainConfig(dynamic_sampling=True).batch.rounds == 4
    assert TrainConfig().batch.rounds == 1


# ---------------------------------------------------------------- a sampler made of rules


def fake_rollout(prompts: list[dict], group_size: int, lengths: list[int], T: int = 4) -> Rollout:
    """B = len(prompts) * G rows, prompt length 2; response i is ``lengths[i]`` tokens, the
    last an EOS when shorter than T (a row of length T has no EOS: truncated)."""
    rows = [p for p in prompts for _ in range(group_size)]
    B = len(rows)
    response = torch.full((B, T), PAD)
    for i, n in enumerate(lengths):
        response[i, :n] = 10 + i % 7
        if n < T:
            response[i, n - 1] = EOS
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.cat([torch.full((B, 2), 5), response], dim=1)
    return Rollout(prompts=rows, input_ids=ids,
                   attention_mask=torch.cat([torch.ones(B, 2, dtype=torch.long), mask.long()], 1),
                   response_mask=mask, prompt_len=2, completions=[str(n) for n in lengths],
                   logp_sampler=None)  # fmt: skip


class RuleSampler:
    """Prompt ``{"id": k}``: its group's rewards tie when ``k % tie_every != 0`` (the score
    function reads the completion, which holds the row's length). Lengths cycle 1, 2, 3."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, *, group_size, greedy):
        self.calls.append([p["id"] for p in prompts])
        return fake_rollout(
            list(prompts), group_size, [1 + i % 3 for i in range(len(prompts) * group_size)]
        )


def rule_score(informative):
    """Rewards 0, 1, 0, 1 in the groups of prompts ``informative(id)``; all 0 elsewhere."""

    def score(rollout: Rollout) -> list[float]:
        return [float(i % 2) if informative(p["id"]) else 0.0
                for i, p in enumerate(rollout.prompts)]  # fmt: skip

    return score


POOL = [{"prompt": f"p{k}", "id": k} for k in range(64)]


def stream(config, start: int, count: int) -> list[int]:
    from gspo.train.tasks import prompts_at

    return [p["id"] for p in prompts_at(POOL, config.run.seed, start, count)]


def test_dynamic_sampling_refills_until_full():
    """4 prompts a step, every third prompt id informative: rounds of 4 stream prompts until
    4 informative groups are in hand. The batch is exactly the first 4 informative ones in
    stream order, all in the loss; consumed = rounds x 4; tied_frac = tied / sampled."""
    config = TrainConfig(prompts_per_step=4, group_size=G, minibatches=1, dynamic_sampling=True,
                         max_sampling_rounds=10)  # fmt: skip
    sampler = RuleSampler()
    batch = collect(sampler.sample, POOL, position=8, **concerns(config), world=dd.World(),
                    score=rule_score(lambda k: k % 3 == 0), eos=[EOS], pad_id=PAD)  # fmt: skip
    ids = stream(config, 8, 40)
    informative = [k for k in ids if k % 3 == 0][:4]
    rounds = next(r for r in range(1, 11) if sum(k % 3 == 0 for k in ids[: 4 * r]) >= 4)
    assert len(sampler.calls) == rounds > 1
    assert [c for call in sampler.calls for c in call] == ids[: 4 * rounds]
    assert [p["id"] for p in batch.rollout.prompts[::G]] == informative
    assert batch.consumed == 4 * rounds and batch.metrics["prompts_consumed"] == 4 * rounds
    assert batch.metrics["sampling_rounds"] == rounds
    sampled = ids[: 4 * rounds]
    assert batch.metrics["tied_frac"] == sum(k % 3 != 0 for k in sampled) / len(sampled)
    assert batch.metrics["informative_groups"] == 4
    assert bool(batch.keep.all()) and len(batch.rollout) == 4 * G
    assert not any(tied_groups(batch.rewards, G))  # no tied group in the batch


def test_dynamic_sampling_stops_at_the_round_limit_and_says_so():
    """2 of the first 8 stream prompts informative, 2 rounds at most: the step trains on
    those 2 (keep True), fills the other slots with tied groups kept out of the loss, and
    warns."""
    config = TrainConfig(prompts_per_step=4, group_size=G, minibatches=1, dynamic_sampling=True,
                         max_sampling_rounds=2)  # fmt: skip
    ids = stream(config, 0, 12)
    found = [ids[1], ids[5]]
    sampler = RuleSampler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collect(sampler.sample, POOL, position=0, **concerns(config), world=dd.World(),
                        score=rule_score(lambda k: k in found or k == ids[9]), eos=[EOS],
                        pad_id=PAD, step=5)  # fmt: skip
    assert len(sampler.calls) == 2 and batch.consumed == 8
    assert [p["id"] for p in batch.rollout.prompts[::G]][: len(found)] == found
    keep = batch.keep.view(4, G)
    assert keep[: len(found)].all() and not keep[len(found) :].any()
    assert batch.metrics["informative_groups"] == len(found)
    assert tied_groups(batch.rewards, G) == [False] * len(found) + [True] * (4 - len(found))
    message = [str(w.message) for w in caught if w.category is TrainWarning]
    assert message and f"step 5: {len(found)} of 4 groups" in message[0]


def test_loo_advantages_after_a_refill_equal_a_direct_computation():
    """Groups from different rounds, different prompt and response widths, joined: each
    row's loo advantage is r_i - mean of the other G-1 rewards of its group, by hand."""
    config = TrainConfig(prompts_per_step=4, group_size=G, minibatches=1, dynamic_sampling=True,
                         max_sampling_rounds=10)  # fmt: skip

    def score(rollout):  # rewards that differ within and across groups
        return [float((p["id"] * 7 + i * 3) % 5) for i, p in enumerate(rollout.prompts)]

    def tie_some(rollout):
        values = score(rollout)
        return [v if p["id"] % 2 else 1.0 for v, p in zip(values, rollout.prompts, strict=True)]

    batch = collect(RuleSampler().sample, POOL, position=3, **concerns(config), world=dd.World(),
                    score=tie_some, eos=[EOS], pad_id=PAD)  # fmt: skip
    assert batch.metrics["sampling_rounds"] > 1
    got = advantages(torch.tensor(batch.rewards, dtype=torch.float64), group_size=G, norm="loo")
    want = []
    for k in range(0, len(batch.rewards), G):
        group = list(batch.rewards[k : k + G])
        want += [r - (sum(group) - r) / (G - 1) for r in group]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert any(a != 0 for a in want)


def test_truncated_and_mask_truncated_keep():
    """Rows of length T = 4 have no EOS: truncated; --mask-truncated keeps them out."""
    config = TrainConfig(prompts_per_step=2, group_size=G, minibatches=1, mask_truncated=True,
                         max_new_tokens=4)  # fmt: skip

    class Sampler:
        def sample(self, prompts, *, group_size, greedy):
            return fake_rollout(list(prompts), group_size, [4, 1, 2, 4, 3, 4, 4, 2])

    batch = collect(Sampler().sample, POOL, position=0, **concerns(config), world=dd.World(),
                    score=lambda r: [0.0, 1.0] * 4, eos=[EOS], pad_id=PAD)  # fmt: skip
    cut = [True, False, False, True, False, True, True, False]
    assert truncated(batch.rollout, [EOS]).tolist() == cut
    assert batch.keep.tolist() == [not c for c in cut]
    assert batch.metrics["truncated_frac"] == 0.5 and batch.metrics["loss_frac"] == 0.5
    # a response that is exactly T tokens with its EOS last is not truncated
    r = fake_rollout([{"prompt": "x"}], 1, [4])
    r.input_ids[0, -1] = EOS
    assert truncated(r, [EOS]).tolist() == [False]


def test_overlong_penalty_is_added_to_the_reward():
    config = TrainConfig(prompts_per_step=2, group_size=G, minibatches=1, max_new_tokens=4,
                         overlong_penalty=2)  # fmt: skip

    class Sampler:
        def sample(self, prompts, *, group_size, greedy):
            return fake_rollout(list(prompts), group_size, [1, 2, 3, 4] * 2)

    batch = collect(Sampler().sample, POOL, position=0, **concerns(config), world=dd.World(),
                    score=lambda r: [1.0] * 8, eos=[EOS], pad_id=PAD)  # fmt: skip
    # L = 4, C = 2: lengths 1, 2 free; 3 -> -0.5; 4 -> -1
    assert list(batch.rewards) == [1.0, 1.0, 0.5, 0.0] * 2
    assert batch.metrics["overlong_penalty"] == -0.375


# ---------------------------------------------------------------- never in the loss


def batch_of(dtype=torch.float64):
    model = tiny_model(layers=1, hidden=32, seed=0).to(dtype)
    gen = torch.Generator().manual_seed(3)
    lengths = [4, 2, 4, 3, 1, 4, 2, 3]
    rollout = fake_rollout([{"prompt": "a"}, {"prompt": "b"}], G, lengths)
    rollout.input_ids[:, 2:] = torch.where(
        rollout.response_mask, torch.randint(4, 50, (8, 4), generator=gen), PAD
    )
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.9, -1.2, 0.1, 0.4], dtype=dtype)
    return model, rollout, adv


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", names())
def test_dropped_sequences_get_zero_gradient_and_the_loss_is_gspo_loss_over_the_kept(loss):
    """float64: with keep, minibatch_loss equals gspo_loss on the kept rows alone (its own
    divisor: the kept count), the gradient equals that of a batch holding only the kept
    rows, and d loss / d logp is exactly 0 on every dropped row. Keeping the dropped rows
    with their advantage zeroed instead would divide by 8, not 5: the loss 5/8 as large."""
    model, rollout, adv = batch_of()
    keep = torch.tensor([False, True, False, True, True, False, True, True])
    config = TrainConfig(minibatches=1, loss=loss)
    engine = CausalLMLogprobs(model)
    with torch.no_grad():
        logp_old = response_logprobs(engine, rollout, temperature=1.0)[0] + 0.01
    loss, metrics = minibatch_loss(engine, rollout, logp_old=logp_old, adv=adv, ref_logp=None,
                                   config=config, world_size=1, num_sequences=5, keep=keep)  # fmt: skip
    logp = response_logprobs(engine, rollout, temperature=1.0)[0]
    want, _ = gspo_loss(logp[keep], logp_old[keep], rollout.response_mask[keep],
                        advantages=adv[keep], **config.objective.gspo_loss_options())  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    got = grads(model, minibatch_loss(engine, rollout, logp_old=logp_old, adv=adv, ref_logp=None,
                                      config=config, world_size=1, num_sequences=5,
                                      keep=keep)[0])  # fmt: skip
    idx = keep.nonzero().squeeze(1)
    only = Rollout(prompts=[rollout.prompts[i] for i in idx], input_ids=rollout.input_ids[idx],
                   attention_mask=rollout.attention_mask[idx],
                   response_mask=rollout.response_mask[idx], prompt_len=2,
                   completions=[rollout.completions[i] for i in idx])  # fmt: skip
    ref = grads(model, minibatch_loss(engine, only, logp_old=logp_old[idx], adv=adv[idx],
                                      ref_logp=None, config=config, world_size=1)[0])  # fmt: skip
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # d loss / d logp on the dropped rows: exactly zero
    logp = response_logprobs(engine, rollout, temperature=1.0)[0].detach().requires_grad_()
    part, _ = gspo_loss(logp[keep], logp_old[keep], rollout.response_mask[keep],
                        advantages=adv[keep])  # fmt: skip
    part.backward()
    assert torch.equal(logp.grad[~keep], torch.zeros_like(logp.grad[~keep]))
    assert logp.grad[keep].abs().sum() > 0


def test_update_without_any_kept_sequence_makes_no_step_and_reports_nan():
    model, rollout, adv = batch_of()
    config = TrainConfig(minibatches=2, mask_truncated=True, lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    keep = torch.tensor([False] * 4 + [True, False, True, False])
    history = update(CausalLMLogprobs(model), None, optimizer, scheduler, rollout, adv,
                     config=config, keep=keep)  # fmt: skip
    # the skipped minibatch has no loss and no gradient norm (NaN), not 0 (which the step's
    # mean would halve: the old record said loss = history[1]'s / 2, grad_norm likewise)
    assert all(math.isnan(history[0][k]) for k in ("loss", "grad_norm", "clip_frac_low"))
    assert history[1]["loss"] != 0.0 and history[1]["ratio_mean"] == pytest.approx(1.0)
    record = step_metrics(1, Scores([0.0] * 8), rollout, history, 0.0, 1e-2, dd.World())
    assert record["loss"] == history[1]["loss"] and record["grad_norm"] == history[1]["grad_norm"]
    assert record["skipped_minibatch_frac"] == 0.5
    assert scheduler.last_epoch == 2  # the schedule advanced on both minibatches
    moved = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert moved  # only the second minibatch stepped; with nothing kept anywhere: none
    model2, rollout2, adv2 = batch_of()
    start = {k: v.clone() for k, v in model2.state_dict().items()}
    optimizer = torch.optim.AdamW(model2.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    update(CausalLMLogprobs(model2), None, optimizer, scheduler, rollout2, adv2, config=config,
           keep=torch.zeros(8, dtype=torch.bool))  # fmt: skip
    assert all(torch.equal(start[k], v) for k, v in model2.state_dict().items())


def updated(config, keep, budget=0):
    model, rollout, adv = batch_of()
    config = config.replace(max_tokens_per_microbatch=budget)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = update(CausalLMLogprobs(model), None, optimizer, scheduler, rollout, adv,
                     config=config, keep=keep)  # fmt: skip
    return model.state_dict(), history


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
@pytest.mark.parametrize("budget", [4, 9, 13])
def test_kept_sequences_in_micro_batches_give_the_whole_minibatch_update(
    budget, loss, float64_norm
):
    """float64, 2 minibatches of 4, 5 of 8 kept: micro-batches of at most ``budget`` padded
    tokens (pieces with no kept row included) give the unsplit update's weights to 1e-10
    and its metrics. (float64_norm: micro-batches split groups whose prompt runs once.)"""
    config = TrainConfig(minibatches=2, lr=1e-2, max_grad_norm=0.5, mask_truncated=True,
                         loss=loss)  # fmt: skip
    keep = torch.tensor([False, True, False, True, True, False, True, True])
    want, want_hist = updated(config, keep)
    got, got_hist = updated(config, keep, budget)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-10, msg=name)
    for a, b in zip(got_hist, want_hist, strict=True):
        for key in ("loss", "grad_norm", "ratio_max", "entropy", "adv_std"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_keeping_every_sequence_is_the_plain_update():
    """--dynamic-sampling on a batch whose groups all differ (keep all True) updates exactly
    as the plain trainer: the same divisor, the same weights bit for bit."""
    plain, _ = updated(TrainConfig(minibatches=2, lr=1e-2), None)
    dynamic, _ = updated(TrainConfig(minibatches=2, lr=1e-2, dynamic_sampling=True),
                         torch.ones(8, dtype=torch.bool))  # fmt: skip
    for name in plain:
        assert torch.equal(plain[name], dynamic[name]), name


# ---------------------------------------------------------------- a real run, resumed


TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "2", "--no-progress", "--no-plot",
        "--checkpoint-every", "10", "--seed", "2", "--dynamic-sampling",
        "--max-sampling-rounds", "3", "--mask-truncated", "--overlong-penalty", "2"]  # fmt: skip


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_dynamic_sampling_equals_the_straight_run(tmp_path):
    """5 steps straight vs 2 steps, stop, resume: the same prompts consumed (data position
    counts every round), the same rewards, rounds and losses step by step."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_config([*TINY, "--steps", "5", "--run-dir", str(straight)])[0])
    summary = train(parse_config([*TINY, "--steps", "5", "--run-dir", str(stopped)])[0],
                    stop_after=2)  # fmt: skip
    assert summary["step"] == 2 and not summary["finished"]
    # the checkpoint's data position counts every prompt sampled, refill rounds included
    from gspo.train.checkpoint import list_checkpoints, load_trainer_state

    saved = load_trainer_state(list_checkpoints(stopped)[-1])
    assert saved["data_position"] == sum(r.get("prompts_consumed", 0) for r in rows(stopped))
    train(parse_config(["--resume", str(stopped)])[0])
    a, b = rows(straight), rows(stopped)
    assert [r["step"] for r in b] == list(range(6))
    assert max(r.get("sampling_rounds", 0) for r in a) > 1  # the refill acted in this run
    for x, y in zip(a, b, strict=True):
        for key in (
            "reward_mean",
            "reward_all_mean",
            "sampling_rounds",
            "prompts_consumed",
            "tied_frac",
            "truncated_frac",
            "loss",
            "eval_reward",
            "informative_groups",
        ):
            # a step whose minibatches were all skipped has no loss (NaN) in either run
            same_nan = x.get(key) != x.get(key) and y.get(key) != y.get(key)
            assert x.get(key) == y.get(key) or same_nan, (x["step"], key)


# ---------------------------------------------------------------- two ranks


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_fill_their_own_groups_and_resume_exactly(tmp_path, fsdp):
    """Under torchrun every rank samples every round (FSDP2's generate is a collective) and
    fills its own quota, so both hold 2 groups x 4 each step and agree on the rounds; the
    run resumed from step 2 reproduces the straight one."""
    extra = ["--fsdp"] if fsdp else []
    # pairs tie more often than fours (both without a digit: 0 and 0); no penalty, which
    # would make rewards differ by length
    args = [*TINY[: TINY.index("--overlong-penalty")], *extra, "--group-size", "2"]
    straight, resumed = run_and_resume(tmp_path, args)
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == list(range(5))
    for x, y in zip(a, b, strict=True):
        for key in ("reward_mean", "sampling_rounds", "prompts_consumed", "loss", "tied_frac"):
            # a step whose minibatches were all skipped has no loss (NaN) in either run
            same_nan = x.get(key) != x.get(key) and y.get(key) != y.get(key)
            assert x.get(key) == y.get(key) or same_nan, (x["step"], key)
    assert all(r["prompts_consumed"] == 4 * r["sampling_rounds"] for r in a[1:])
    assert max(r["sampling_rounds"] for r in a[1:]) > 1  # a refill happened on two ranks


@pytest.mark.parametrize("on", ["task", "shaped"])
def test_dynamic_sampling_filters_on_the_task_s_score_before_the_penalty(on):
    """Every answer wrong (task reward 0), lengths 1, 2, 3: --overlong-penalty 2 at
    --max-new-tokens 3 gives 0, -0.5, -1, so each group's shaped rewards differ. DAPO and
    verl filter on the task's score: no group is informative, and none reaches the loss
    (it used to train on all of them: on length alone). ``shaped`` keeps that behaviour."""
    config = TrainConfig(prompts_per_step=4, group_size=G, minibatches=1, max_new_tokens=3,
                         overlong_penalty=2, dynamic_sampling=True, max_sampling_rounds=2,
                         dynamic_sampling_on=on)  # fmt: skip
    with pytest.warns(TrainWarning) if on == "task" else contextlib.nullcontext():
        batch = collect(RuleSampler().sample, POOL, position=0, **concerns(config),
                        world=dd.World(), score=rule_score(lambda k: False), eos=[EOS],
                        pad_id=PAD)  # fmt: skip
    assert min(batch.rewards) < 0  # the penalty is in the rewards either way
    if on == "task":
        assert batch.metrics["informative_groups"] == 0 and batch.metrics["tied_frac"] == 1.0
        assert batch.metrics["sampling_rounds"] == 2 and not bool(batch.keep.any())
    else:
        assert batch.metrics["informative_groups"] == 4 and batch.metrics["tied_frac"] == 0.0
        assert batch.metrics["sampling_rounds"] == 1 and bool(batch.keep.all())


def test_dynamic_sampling_on_needs_dynamic_sampling():
    with pytest.raises(ValueError, match="--dynamic-sampling-on"):
        TrainConfig(dynamic_sampling_on="shaped")
    with pytest.raises(ValueError):
        TrainConfig(dynamic_sampling=True, dynamic_sampling_on="length")
