"""Which settings of `gspo train` compose: the refusals that read more than one concern.

TrainConfig calls `check_pairs` after each concern has checked its own fields; a pair that
would be silently wrong together is refused here with the reason and the fix (ValueError,
exit 2 on the command line). docs/settings.md's table names, for each pair of features, the
test that runs them together or the refusal below.
"""

from __future__ import annotations

from gspo.config import check


def check_pairs(config) -> None:
    """Refuse the combinations that cannot run together (ValueError naming the option).

    ``config`` is the TrainConfig being built (not imported here: it imports this module)."""
    n_seq = config.run.prompts_per_step * config.run.group_size
    fix = f"it must divide prompts_per_step * group_size = {n_seq}"
    check(n_seq % config.optim.minibatches == 0, "minibatches", config.optim.minibatches, fix)
    # vLLM schedules its own batches (within --vllm-memory): a batch size it would
    # ignore is refused. (gspo eval keeps its default for hf and says vLLM ignores it.)
    check(config.sampling.generation_batch_size == 0 or config.sampling.rollout == "hf",
          "generation_batch_size", config.sampling.generation_batch_size,
          f"--rollout {config.sampling.rollout} schedules its own batches (size its KV "
          "cache with --vllm-memory, or the server's options); drop it or use --rollout "
          "hf")  # fmt: skip
    limit, buffer = config.sampling.max_new_tokens, config.batch.overlong_penalty
    check(buffer <= limit, "overlong_penalty", buffer,
          f"the buffer is the last tokens before --max-new-tokens {limit}: use 1 to "
          f"{limit}, or 0 for no penalty")  # fmt: skip
    # Under FSDP every generate() is a collective, but episodes end after different
    # numbers of turns on each rank: refused rather than left to hang.
    check(
        config.data.env is None or not config.run.fsdp,
        "env",
        config.data.env,
        "multi-turn episodes run under DDP or one process, not --fsdp: drop --fsdp",
    )
    check(
        config.data.tools is None or not config.run.fsdp,
        "tools",
        config.data.tools,
        "multi-turn episodes run under DDP or one process, not --fsdp: drop --fsdp",
    )
    # One step off-policy, a step's prompts are sampled before the step before it has
    # ended: where a refill round (--dynamic-sampling) takes its prompts from the data
    # stream depends on how many rounds that earlier step needed, which is not known
    # yet. (--env runs its episodes on the sampler thread: gspo.train.overlap.)
    check(not config.run.async_rollouts or not config.batch.dynamic_sampling,
          "dynamic_sampling", config.batch.dynamic_sampling,
          "with --async-rollouts a step's prompts are drawn before the step before it "
          "knows how many refill rounds it needs, so the data position of a refill is "
          "unknown; drop one of them")  # fmt: skip
    check(
        not config.run.async_rollouts or config.data.tools is None,
        "tools",
        config.data.tools,
        "function tools do not run with --async-rollouts yet: drop one of them",
    )
    # The KL reference is the model before the warm start; a user would expect the
    # warm-started one (SFT, then RL with KL to the SFT model): refused, not surprising.
    check(config.warm.warm_start is None or config.objective.kl_coef == 0, "warm_start",
          config.warm.warm_start, "the KL reference would be the model before the warm "
          "start, not the warm-started one: use --kl-coef 0 with it")  # fmt: skip
    # worked episodes are rendered with the run's tools; with several --env classes each
    # row's class has its own, and a worked episode names none
    check(config.warm.warm_start is None or "," not in (config.data.env or ""), "warm_start",
          config.warm.warm_start, "with several --env classes each episode has its own "
          "class's tools, which a worked episode does not name: warm-start a run of one "
          "class")  # fmt: skip
    _check_async(config)
    config._resolve_old_logprobs()
    # Under --dtype bf16 the policy is the bf16 computation (autocast over fp32 master
    # weights); the samplers compute otherwise (HF generate and vLLM in fp32; vLLM's own
    # bf16 is further still), so their log-probs are not the old policy's: measured on
    # SmolLM2 (arith, 32 tokens, on-policy samples) k3 8.3e-4 (bf16 vLLM: 1.9e-3) and
    # sequence ratios 0.968..1.018, against 4e-11 in fp32; GSPO's clip range
    # (1 - 0.003, 1 + 0.004) would cut on-policy samples.
    check(config.objective.old_logprobs != "sampler" or config.optim.dtype == "fp32",
          "old_logprobs", config.objective.old_logprobs,
          "under --dtype bf16 the sampler's log-probs are not the bf16 policy's (they "
          "differ by ~1e-3 k3, past GSPO's clip range): use --old-logprobs trainer, or "
          "--dtype fp32")  # fmt: skip


def _check_async(config) -> None:
    run, rollout = config.run, config.sampling.rollout
    if not run.async_rollouts or rollout != "hf":
        return
    # The HF engine samples the policy module itself; ahead of the trainer it needs a copy
    # of its own (gspo.train.overlap), which is a plain replica of the HF model.
    for name, value, unset, why in (
        ("fsdp", run.fsdp, False, "the sampler's copy would be a whole model per rank"),
        ("lora_r", config.optim.lora_r, 0, "the sampler's copy would hold the adapters"),
        ("keep_dropout", config.optim.keep_dropout, False,
         "dropout draws from the RNG the HF sampler thread draws from at the same time"),
    ):  # fmt: skip
        check(value == unset, name, value, f"with --async-rollouts and --rollout hf {why}: "
              "use --rollout vllm (it holds its own weights), or drop the option")  # fmt: skip
