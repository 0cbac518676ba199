# One-command set-up for a fresh machine: `make demo` runs the demo, `make test` runs the tests
# (`make test-fast` all but the slow ones: the everyday loop, see CONTRIBUTING.md).
# Each creates .venv at the project root and install blockkd into it (PyTorch from the package registry).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-fast lint bench-speed bench-accuracy bench-tune bench-heldout bench-sensitivity bench-lm data venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

FORTUNES := /usr/share/games/fortunes/science

# Real data from Debian's packages where apt is available: Fashion-MNIST (else blockkd downloads it) and the
# fortune files of the offline text task (configs/fortunes, tests/test_text.py).
data:
	@if { [ ! -f $(FMNIST) ] || [ ! -f $(FORTUNES) ]; } && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q >/dev/null && \
		$$SUDO apt-get install -y -q dataset-fashion-mnist fortunes >/dev/null; fi

demo: venv data
	$(VENV)/bin/blockkd demo

test: venv data
	$(VENV)/bin/python -m pytest tests

test-fast: venv data
	$(VENV)/bin/python -m pytest tests -m "not slow"

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

bench-speed: venv
	$(PY) benchmarks/speed.py

bench-accuracy: venv data
	$(PY) benchmarks/accuracy.py

bench-tune: venv data
	$(PY) benchmarks/tune.py

# The settings nothing was chosen on (issue 29), one table each: all 60k Fashion-MNIST images on a 4-epoch
# schedule, students of other families (issue 35; 3 seeds, many hours on a CPU: --resume goes on after a stop),
# a CNN -> ViT pair, the text task (its teacher pre-trained first, once). 5 seeds where a run takes under 10
# minutes on a 2-core CPU.
bench-heldout: venv data
	$(PY) benchmarks/accuracy.py --recipes configs/fashion_mnist_full --seeds 0 1 2 --jobs 2 --out results/accuracy-full.json
	$(PY) benchmarks/accuracy.py --recipes configs/fashion_mnist_full --methods ce kd dkd dist --seeds 3 4 --jobs 2 \
		--append --out results/accuracy-full.json
	$(PY) benchmarks/hetero.py --jobs 2 --resume
	$(PY) benchmarks/accuracy.py --recipes configs/fashion_mnist_vit --jobs 2 --out results/accuracy-vit.json
	$(PY) benchmarks/fortunes_mlm.py
	$(PY) benchmarks/accuracy.py --recipes configs/fortunes --jobs 2 --out results/text.json

bench-sensitivity: venv data
	$(PY) benchmarks/sensitivity.py

# The fortunes language-model benchmark (issues 33-34): the table of results/lm_fortunes.md.
bench-lm: venv data
	$(PY) benchmarks/lm_fortunes.py --methods ce forward_kl reverse_kl jsd blockkd gkd forward_kl-cached-k8 \
		forward_kl-cached forward_kl-cached-k128 --seeds 0 1 2
