"""`gspo train`: GSPO fine-tuning of Hugging Face causal LMs.

cli.py          the command: flags generated from gspo.config.TrainConfig
loop.py         the training loop, top to bottom (launch commands in its docstring)
tiny.py         the built-in random Qwen2 and character tokenizer (no downloads)
rewards.py      tasks, reward functions and their checks, the data order
rollout.py      prompts -> G sampled completions with generate(), EOS masks
update.py       old log-probs once, then minibatch GSPO steps (+ k3 KL)
checkpoint.py   atomic checkpoints and resume
distributed.py  DDP / FSDP2 under torchrun, rank sharding, metric reductions
plot.py         reward.png and the GSPO-vs-GRPO comparison
"""
