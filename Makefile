# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU wheel on this machine; a plain `torch` would pull CUDA.
STAMP_DEV := $(VENV)/.installed-dev
STAMP_RUN := $(VENV)/.installed-run

.PHONY: demo test lint clean bench-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml setup.py mobilemoe/native/q4_experts.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[export]'
	touch $@

$(STAMP_DEV): pyproject.toml setup.py mobilemoe/native/q4_experts.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/mobilemoe demo

test: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP_DEV)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-out

# The benchmark peer, in its own environment (never part of `make test`): llama-cpp-python
# compiles llama.cpp (15-20 min on 2 cores). GGML_NATIVE=ON would enable AMX, whose int8
# matmul segfaults here on batches of more than one token, so the ISA is spelled out.
BENCH_VENV := .venv-bench
BENCH_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF

bench-env: $(BENCH_VENV)/.installed
$(BENCH_VENV)/.installed: benchmarks/requirements-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(BENCH_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BENCH_VENV)/bin/pip install -r benchmarks/requirements-bench.txt
	touch $@

# The Hugging Face route as a peer (benchmarks/optimum_peer.py), in its own environment (never
# part of `make test`): optimum-onnx needs transformers < 4.58, the main venv has transformers 5.
OPTIMUM_VENV := .venv-optimum

.PHONY: bench-optimum-env
bench-optimum-env: $(OPTIMUM_VENV)/.installed
$(OPTIMUM_VENV)/.installed: benchmarks/requirements-optimum.txt
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/pip install -r benchmarks/requirements-optimum.txt
	touch $@
