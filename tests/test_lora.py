"""LoRA through PEFT (gspo.train.lora): the adapters' gradients are those of a hand-built
low-rank model, only the adapters move, the KL reference is the base model without a copy
of it, samplers get W + s B A without the policy being merged in place, a stopped and
resumed LoRA run equals a straight one, and the outputs load (the adapter with PEFT or
`gspo eval`, --merge's directory with transformers alone)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from gspo.causal_lm import CausalLMLogprobs
from gspo.train import lora, models
from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main, parse_config
from gspo.train.config import TrainConfig
from gspo.train.loop import train
from gspo.train.models import enable_grad_checkpointing
from gspo.train.tiny import tiny_model
from gspo.train.update import minibatch_loss, response_logprobs, update
from test_train_e2e import TINY, rows
from test_train_update import (
    assert_same_grads,
    checkpointing_grads,
    ragged_batch,
    rollout_of,
    sequence_logp,
)

LORA = TrainConfig(lora_r=4, lora_alpha=6.0)  # s = alpha / r = 1.5


def lora_model(config=LORA, *, dtype=torch.float32, hidden=32, seed=0, b_std=0.1):
    """A tiny Qwen2 with adapters, B drawn at random (PEFT starts it at 0, where the
    gradient of A is 0 and the merged weights are the base's: too easy to pass)."""
    model = lora.wrap(tiny_model(layers=1, hidden=hidden, seed=seed), config).to(dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * b_std)
    return model


def adapted_layers(model) -> dict[str, torch.nn.Module]:
    """{HF module name: PEFT LoRA layer} of the model inside the PeftModel."""
    inner = model.get_base_model()
    return {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A")}


# ---------------------------------------------------------------- what is adapted and trained


def test_default_targets_are_the_decoders_linear_layers_and_only_they_train():
    model = lora_model()
    names = sorted(name.rsplit(".", 1)[1] for name in adapted_layers(model))
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7
    # the optimizer the loop builds gets exactly these
    engine = CausalLMLogprobs(model)
    params = [p for p in engine.parameters() if p.requires_grad]
    assert len(params) == len(trainable)


def test_named_targets_adapt_only_those():
    model = lora.wrap(tiny_model(layers=1, hidden=32), dataclasses.replace(
        LORA, lora_targets=("q_proj", "v_proj")))  # fmt: skip
    assert sorted(n.rsplit(".", 1)[1] for n in adapted_layers(model)) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "targets, message",
    [(("nope",), r"--lora-targets 'nope': Target modules \{'nope'\} not found"),
     (("lm_head",), r"matches lm_head \(Linear\); LoRA here adapts linear layers of the "
                    r"decoder only, not embeddings or the LM head"),
     (("embed_tokens",), r"matches model.embed_tokens \(Embedding\)")],
    ids=["not-found", "lm-head", "embeddings"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT's, then ours
def test_bad_targets_are_named(targets, message):
    config = dataclasses.replace(LORA, lora_targets=targets)
    with pytest.raises(ValueError, match=message):
        lora.wrap(tiny_model(layers=1, hidden=32), config)


@pytest.mark.parametrize(
    "change, message",
    [({"lora_r": -1}, "--lora-r / lora_r = -1 is invalid: use a positive rank, or 0"),
     ({"merge": True}, "--merge / merge = True is invalid: it applies to LoRA adapters only: "
                       "add --lora-r R"),
     ({"lora_alpha": 8.0}, "--lora-alpha / lora_alpha = 8.0 is invalid: it applies to LoRA"),
     ({"lora_targets": ("q_proj",)}, "--lora-targets / lora_targets = ('q_proj',) is invalid: "
                                     "it applies to LoRA"),
     ({"lora_r": 4, "lora_alpha": 0.0}, "--lora-alpha / lora_alpha = 0.0 is invalid: use a "
                                        "finite value > 0"),
     ({"lora_r": 4, "lora_targets": (" ",)}, "--lora-targets / lora_targets = (' ',) is "
                                             "invalid: give module names"),
     ({"lora_r": 4, "lora_dropout": 1.0, "keep_dropout": True}, "--lora-dropout / "
                                                                "lora_dropout = 1.0 is invalid: "
                                                                "use [0, 1)"),
     ({"lora_r": 4, "lora_dropout": 0.1}, "--lora-dropout / lora_dropout = 0.1 is invalid: "
                                          "dropout acts only when the model trains with it: "
                                          "add --keep-dropout")],
    ids=["negative-r", "merge-without-lora", "alpha-without-lora", "targets-without-lora",
         "zero-alpha", "blank-target", "dropout-1", "dropout-without-keep-dropout"],
)  # fmt: skip
def test_config_errors_name_the_flag(change, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        TrainConfig(**change)


def test_cli_merge_without_lora_exits_2(tmp_path, capsys):
    assert main([*TINY, "--merge", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--merge / merge = True is invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- gradients and the update


def test_lora_gradients_match_a_hand_built_low_rank_model():
    """float64. By hand: the base model with each adapted weight replaced by the explicit
    W + (alpha / r) B @ A (torch.func.functional_call), A and B copied from the PEFT model;
    the GSPO loss (clipping active, KL on) backpropagated to A and B must give PEFT's
    gradients to rounding. A wrong scale (alpha instead of alpha / r) is off by 4x, a
    transposed product or a missing adapter by far more."""
    config = dataclasses.replace(LORA, kl_coef=0.1)
    model = lora_model(config, dtype=torch.float64)
    _, rollout, adv = ragged_batch()
    layers = adapted_layers(model)
    peft_engine = CausalLMLogprobs(model)
    with torch.no_grad():
        logp, _ = response_logprobs(peft_engine, rollout, temperature=1.0)
    shift = torch.linspace(-0.01, 0.01, len(rollout))[:, None].double()
    logp_old = torch.where(rollout.response_mask, logp + shift, 0.0)  # some ratios clip
    ref_logp = torch.where(rollout.response_mask, logp - 0.1, 0.0)

    def loss_of(logprobs):
        loss, metrics = minibatch_loss(logprobs, rollout, logp_old=logp_old, adv=adv,
                                       ref_logp=ref_logp, config=config, world_size=1)  # fmt: skip
        return loss, metrics

    loss, metrics = loss_of(peft_engine)
    loss.backward()
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1

    base = tiny_model(layers=1, hidden=32, seed=0).double().requires_grad_(False)
    plain = CausalLMLogprobs(base)
    s = config.lora_alpha / config.lora_r
    a = {n: m.lora_A["default"].weight.detach().clone().requires_grad_() for n, m in layers.items()}
    b = {n: m.lora_B["default"].weight.detach().clone().requires_grad_() for n, m in layers.items()}

    def by_hand(*args, **kwargs):
        weights = {f"model.{n}.weight": base.get_submodule(n).weight + s * b[n] @ a[n]
                   for n in layers}  # fmt: skip
        return torch.func.functional_call(plain, weights, args, kwargs)

    loss_hand, _ = loss_of(by_hand)
    loss_hand.backward()
    torch.testing.assert_close(loss_hand, loss, rtol=1e-12, atol=1e-15)
    for n, layer in layers.items():
        for mine, peft_param in ((a[n], layer.lora_A["default"].weight),
                                 (b[n], layer.lora_B["default"].weight)):  # fmt: skip
            assert mine.grad.abs().max() > 1e-6, n  # non-trivial: B != 0 gives A a gradient
            torch.testing.assert_close(peft_param.grad, mine.grad, rtol=1e-9, atol=1e-13, msg=n)


def test_an_update_moves_only_the_adapters():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, rollout, adv = ragged_batch(torch.float32)
    config = dataclasses.replace(LORA, minibatches=2, lr=1e-2)
    engine = CausalLMLogprobs(model)
    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    update(engine, None, optimizer, scheduler, rollout, adv, config=config)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # bit-identical base weights


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["adv+1", "adv-1"])
def test_one_update_moves_the_log_prob_with_the_advantage(sign):
    """As test_train_update's direction test, with the adapters alone trainable and B = 0 at
    the start (PEFT's init: only B gets a gradient on the first step)."""
    model = lora.wrap(tiny_model(layers=1, hidden=32, seed=0), LORA)
    ids = torch.randint(4, 50, (1, 9), generator=torch.Generator().manual_seed(1))
    rollout = rollout_of(ids, [5])
    config = dataclasses.replace(LORA, minibatches=1, lr=1e-3, max_grad_norm=1e9)
    engine = CausalLMLogprobs(model)
    before = sequence_logp(engine, rollout)
    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = update(engine, None, optimizer, scheduler, rollout, torch.tensor([sign]),
                     config=config)  # fmt: skip
    after = sequence_logp(engine, rollout)
    assert history[0]["clip_frac_low"] + history[0]["clip_frac_high"] == 0.0
    assert sign * float(after - before) > 0.01, (float(before), float(after))


def test_grad_checkpointing_gives_the_same_adapter_gradients():
    """transformers' non-reentrant checkpointing under PEFT, embeddings frozen (no
    enable_input_require_grads needed): equal gradients in float64, layers recomputed."""
    _, rollout, adv = ragged_batch()

    def build(checkpointing):
        model = lora_model(dtype=torch.float64)
        if checkpointing:
            enable_grad_checkpointing(model, keep_dropout=False)
        return model, rollout, adv

    grads, calls = checkpointing_grads(build, LORA,
                                       lambda m: m.get_base_model().model.layers[0].mlp)  # fmt: skip
    assert calls == [1, 2]
    assert_same_grads(grads)


def test_lora_dropout_acts_only_in_train_mode():
    """--lora-dropout with --keep-dropout: the adapters' input dropout is on while the model
    trains (two forwards differ) and off in eval mode, where the old log-probs and the
    sampler run; grad checkpointing without --keep-dropout keeps the model in eval mode."""
    config = dataclasses.replace(LORA, lora_dropout=0.5, keep_dropout=True)
    model = lora_model(config, b_std=1.0)
    ids = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    engine = CausalLMLogprobs(model)
    with torch.no_grad():
        model.train()
        assert not torch.equal(engine(ids, mask), engine(ids, mask))
        model.eval()
        assert torch.equal(engine(ids, mask), engine(ids, mask))
    enable_grad_checkpointing(model, keep_dropout=False)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    with torch.no_grad():
        assert torch.equal(engine(ids, mask), engine(ids, mask))


# ---------------------------------------------------------------- the KL reference


def live_parameter_count() -> int:
    """Elements of every nn.Parameter alive in this process."""
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases
        warnings.simplefilter("ignore", FutureWarning)
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))


def test_reference_is_the_base_model_and_keeps_no_copy_of_it():
    """Under LoRA the reference's log-probs stay the initial model's after updates (the
    adapters disabled), and building it creates no parameters; full fine-tuning's frozen
    copy doubles them (which shows the count would see a copy)."""
    config = dataclasses.replace(LORA, kl_coef=0.1, minibatches=2, lr=1e-2)
    _, rollout, adv = ragged_batch(torch.float32)
    initial = CausalLMLogprobs(tiny_model(layers=1, hidden=32, seed=0))
    want, _ = response_logprobs(initial, rollout, temperature=1.0)

    model = lora.wrap(tiny_model(layers=1, hidden=32, seed=0), config)
    engine = CausalLMLogprobs(model)
    full = tiny_model(layers=1, hidden=32, seed=0)
    count = live_parameter_count()
    policy = models.LoraPolicy(model, None, config.optim, None, kl=True)
    frozen, ref = policy.frozen, policy.reference(engine, "cpu")
    assert frozen is None and live_parameter_count() == count
    frozen = models.build(dataclasses.replace(config, lora_r=0, lora_alpha=None,
                                              tiny_layers=1, tiny_hidden=32)).frozen
    assert live_parameter_count() == count + sum(p.numel() for p in full.parameters())

    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(2):
        history = update(engine, ref, optimizer, scheduler, rollout, adv, config=config)
    assert history[-1]["kl_ref"] > 0
    with torch.no_grad():
        moved, _ = response_logprobs(engine, rollout, temperature=1.0)
        got, _ = response_logprobs(ref, rollout, temperature=1.0)
    assert (moved - want).abs().max() > 1e-3  # the policy left the reference
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the base's very computation
    assert all(not m.disable_adapters for m in adapted_layers(model).values())  # back on


# ---------------------------------------------------------------- weights for the sampler


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=16))  # fmt: skip


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_merged_params_equal_merge_and_unload_and_leave_the_policy_as_it_was(kind):
    """W + s B A in fresh tensors under the base model's names equals PEFT's own
    merge_and_unload on a deep copy (GPT-2: Conv1D weights are [in, out], B A transposed),
    tied embeddings once, as full_params gives them; the policy's tensors are bit-identical
    after two syncs (no merge/unmerge drift)."""
    from gspo.train import distributed as dd

    if kind == "gpt2":
        model = lora.wrap(tiny_gpt2(), LORA)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1)
    else:
        model = lora_model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    got = dict(lora.merged_params(model))
    got_again = dict(lora.merged_params(model))
    want = dict(dd.full_params(copy.deepcopy(model).merge_and_unload()))
    assert list(got) == list(want)  # the same names, in the same order
    assert not any("lora" in n or "base_layer" in n for n in got)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(got_again[name], got[name]), name
    plain = tiny_gpt2() if kind == "gpt2" else tiny_model(layers=1, hidden=32, seed=0)
    adapted = [n for n in got if not torch.equal(got[n], plain.state_dict()[n])]
    assert len(adapted) == {"gpt2": 4, "qwen2": 7}[kind]  # every adapted weight differs
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# ---------------------------------------------------------------- runs, resume, outputs

COMMON = [*TINY, "--lora-r", "4", "--lr", "1e-2", "--warmup-steps", "0", "--steps", "5",
          "--checkpoint-every", "10", "--seed", "3", "--kl-coef", "0.05"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A straight LoRA run of 5 steps (with --merge), and one stopped after 2 and resumed."""
    base = tmp_path_factory.mktemp("lora-runs")
    straight, stopped = base / "straight", base / "stopped"
    train(parse_config([*COMMON, "--merge", "--run-dir", str(straight)])[0])
    summary = train(parse_config([*COMMON, "--merge", "--run-dir", str(stopped)])[0],
                    stop_after=2)  # fmt: skip
    assert summary["step"] == 2 and not summary["finished"]
    assert main(["--resume", str(stopped)]) == 0
    return straight, stopped


def test_resume_equals_straight_run(lora_runs):
    straight, stopped = lora_runs
    a = load_file(straight / "model" / "adapter_model.safetensors")
    b = load_file(stopped / "model" / "adapter_model.safetensors")
    assert set(a) == set(b) and len(a) == 2 * 7
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert all(a[n].abs().max() > 0 for n in a if "lora_B" in n)  # B moved off its zero init
    ra, rb = rows(straight), rows(stopped)
    assert [r["step"] for r in rb] == list(range(6))
    for x, y in zip(ra, rb, strict=True):
        assert x.get("reward_mean") == y.get("reward_mean")
        assert x.get("eval_reward") == y.get("eval_reward")
        if "kl_ref" in x:  # the reference (base, adapters off) is rebuilt alike on resume
            assert y["kl_ref"] == pytest.approx(x["kl_ref"], rel=1e-4, abs=1e-9)


def test_checkpoints_hold_the_adapter_not_the_base(lora_runs):
    straight, _ = lora_runs
    [saved] = list_checkpoints(straight)
    files = {p.name for p in saved.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer", "trainer.pt",
            "rank0.pt", "tokenizer.json"} <= files  # fmt: skip
    assert "model.safetensors" not in files
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)  # none = 2 r
    final = load_file(straight / "model" / "adapter_model.safetensors")
    last = load_file(saved / "adapter_model.safetensors")
    assert all(torch.equal(final[n], last[n]) for n in final)


def test_resuming_across_full_and_lora_is_refused(lora_runs, tmp_path):
    from gspo.train.models import load_model_weights

    straight, _ = lora_runs
    [saved] = list_checkpoints(straight)
    with pytest.raises(ValueError, match="holds a LoRA adapter, not a whole model"):
        load_model_weights(tiny_model(layers=1, hidden=32), saved)
    tiny_model(layers=1, hidden=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a whole model, not a LoRA adapter"):
        lora.load_adapter(lora.wrap(tiny_model(layers=1, hidden=32), LORA), tmp_path)
    other = lora.wrap(tiny_model(layers=1, hidden=32), dataclasses.replace(LORA, lora_r=8))
    with pytest.raises(ValueError, match="its adapter has r 4, this run's --lora-r gives 8"):
        lora.load_adapter(other, saved)


def test_outputs_load_adapter_with_peft_and_gspo_merged_with_transformers(lora_runs):
    """RUN_DIR/model (the adapter) on its base through PEFT, the same through gspo's loader
    (what `gspo eval --model RUN_DIR/model` runs), and RUN_DIR/merged through transformers
    alone: one set of log-probs, to float32 merge rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo.train.models import load as load_model_and_tokenizer

    straight, _ = lora_runs
    ids = torch.randint(4, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    peft_model = PeftModel.from_pretrained(tiny_model(layers=1, hidden=32, seed=3),
                                           straight / "model")  # fmt: skip
    with torch.no_grad():
        want = CausalLMLogprobs(peft_model.eval())(ids, mask)
        merged = AutoModelForCausalLM.from_pretrained(straight / "merged").eval()
        loaded, tok = load_model_and_tokenizer(str(straight / "model"), layers=0, hidden=0,
                                               seed=0)  # fmt: skip
        base = CausalLMLogprobs(tiny_model(layers=1, hidden=32, seed=3))(ids, mask)
        for model in (merged, loaded.eval()):
            torch.testing.assert_close(CausalLMLogprobs(model)(ids, mask), want, rtol=0,
                                       atol=1e-5)  # fmt: skip
    assert (want - base).abs().max() > 1e-3  # the adapter changed the model
    assert all(p.requires_grad for p in loaded.parameters())  # trains whole as --model
    assert tok.decode(tok("sum 09:")["input_ids"]) == "sum 09:"
    merged_tok = AutoTokenizer.from_pretrained(straight / "merged")
    assert merged_tok.decode(merged_tok("sum 09:")["input_ids"]) == "sum 09:"
    base_file = json.loads((straight / "model" / lora.BASE_FILE).read_text())
    assert base_file == {"model": "tiny", "tiny_layers": 1, "tiny_hidden": 32, "seed": 3}


def test_adapter_config_names_a_directory_base(tmp_path, monkeypatch):
    """--model DIR: adapter_config.json's base_model_name_or_path and gspo-base.json give DIR
    as an absolute path, so PEFT (AutoPeftModelForCausalLM) and gspo find it from anywhere."""
    from gspo.train.models import load as load_model_and_tokenizer
    from gspo.train.tiny import tiny_tokenizer

    tiny_model(layers=1, hidden=32).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer("base", layers=0, hidden=0, seed=0)
    wrapped = lora.wrap(model, dataclasses.replace(LORA, model="base"))
    where = str((tmp_path / "base").resolve())
    assert wrapped.peft_config["default"].base_model_name_or_path == where
    assert wrapped.gspo_base["model"] == where


def test_gspo_eval_takes_the_adapter_directory(lora_runs, tmp_path, capsys):
    from gspo.train.evaluate import main as eval_main

    straight, _ = lora_runs
    code = eval_main(["--model", str(straight / "model"), "--task", "digitsum",
                      "--questions", "4", "-n", "0", "--max-new-tokens", "4", "--engine", "hf",
                      "--out", str(tmp_path / "c.jsonl")])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["questions"] == 4


def test_lora_with_microbatches_bf16_and_grad_checkpointing_runs(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--lora-r", "4", "--dtype", "bf16", "--max-tokens-per-microbatch", "24",
            "--grad-checkpointing", "--kl-coef", "0.1", "--steps", "2", "--no-plot",
            "--run-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    metrics = rows(run)[1:]
    assert all(r["kl_ref"] >= 0 and r["grad_norm"] > 0 for r in metrics)
    assert metrics[-1]["kl_ref"] > 0


# ---------------------------------------------------------------- vLLM


def test_vllm_samples_the_merged_policy_after_a_lora_update():
    """vLLM starts from the merged weights (B != 0 already) and, after an update and
    load_weights(sampler_weights), samples what the trainer scores; without the sync its
    log-probs are stale."""
    from gspo.train import distributed as dd
    from gspo.train import engines
    from gspo.train.tiny import tiny_tokenizer
    from test_engines import PROMPTS, max_diff, tolerance, trainer_logp

    config = TrainConfig(temperature=0.7, max_new_tokens=8, prompts_per_step=4, group_size=4,
                         minibatches=1, tiny_hidden=128, rollout="vllm", vllm_memory=0.05,
                         lora_r=8, lr=1e-2, warmup_steps=0)  # fmt: skip
    model = lora_model(config, hidden=128)
    policy = models.LoraPolicy(model, tiny_tokenizer(), config.optim, None, kl=False)
    engine = engines.build(config.sampling, policy, dd.World(), None, seed=config.seed)
    try:
        first = engine.sample(PROMPTS, group_size=4, greedy=False)
        assert max_diff(trainer_logp(model, first), first.logp_sampler,
                        first.response_mask) <= tolerance(model, first)  # fmt: skip
        logprobs = CausalLMLogprobs(model)
        optimizer = torch.optim.AdamW([p for p in logprobs.parameters() if p.requires_grad],
                                      lr=config.lr)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        update(logprobs, None, optimizer, scheduler, first, torch.linspace(-1, 1, len(first)),
               config=config)  # fmt: skip
        stale = engine.sample(PROMPTS, group_size=4, greedy=False)
        assert max_diff(trainer_logp(model, stale), stale.logp_sampler,
                        stale.response_mask) > 100 * tolerance(model, stale)  # fmt: skip
        engine.load_weights(lora.merged_params(model))
        fresh = engine.sample(PROMPTS, group_size=4, greedy=False)
        assert max_diff(trainer_logp(model, fresh), fresh.logp_sampler,
                        fresh.response_mask) <= tolerance(model, fresh)  # fmt: skip
    finally:
        engine.close()
