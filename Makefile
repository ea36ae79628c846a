# Every target creates / updates the virtual environment it needs (.venv), so a fresh
# clone needs nothing but `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench venv clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` would resolve to a newer multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# moshi without its stale pins (torch<2.10, huggingface-hub<1.0, safetensors<0.8): see README.
	$(PIP) install -q --no-deps moshi==0.2.13
	$(PIP) install -q -c constraints.txt -e '.[dev,omni,kernels]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ttt-speech demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	# kernel launches per layer (what a GPU launches), PyTorch path vs Triton kernels vs moshi's layer
	$(PY) scripts/bench_launches.py --out runs/bench/launches.json
	$(PY) scripts/bench_ttt.py
	# waits for the load average left by bench_ttt to settle, then Moshi-7B's width
	$(PY) scripts/bench_width.py --out runs/bench/width.json --plot runs/bench/width.png
	# bytes per rank, DDP vs FSDP (torchrun on gloo), and Moshi-7B's table
	$(PY) scripts/bench_memory.py --out runs/bench/memory.json
	# serving: per-frame latency through the real server and client, TTT vs unpatched
	$(PY) scripts/bench_serve.py --out runs/bench/serve.json

clean:
	rm -rf $(VENV) .pytest_cache
