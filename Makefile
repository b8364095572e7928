# Every target creates and uses the local virtual environment .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are installed first and explicitly: on the reference machine these exact
# releases are served from local disk; elsewhere pip fetches them from PyPI.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export MEDISTILL_DATA_DIR ?= $(abspath ../shared/data)
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test,export]'
	# medmnist's INFO table only, read by a test (its dependencies, pandas and scikit-image, are not needed)
	$(BIN)/pip install -q --no-deps medmnist==3.0.2
	touch $@

venv: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests -n auto --dist worksteal

demo: $(BIN)/.installed
	$(BIN)/python -m medistill.commands.demo --out demo_runs

bench: $(BIN)/.installed
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) demo_runs runs
