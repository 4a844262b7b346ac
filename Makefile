# Quick start: `make demo`, `make test`. Everything installs into .venv in this folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOROVOD_STAMP := $(VENV)/.horovod
DEMO_DIR ?= runs/demo

.PHONY: install horovod demo test bench clean

install: $(STAMP)

# The stamp depends on the files that define the install, so a second `make install` is a no-op.
$(STAMP): constraints.txt setup.cfg setup.py pyproject.toml sharding/kernels/csrc/cpu_tbe.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu==1.8.0 \
		torchmetrics tensordict pyre-extensions tqdm numpy pyarrow tomli-w pytest triton matplotlib \
		onnx onnxscript onnxruntime
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu, which must never land on a CPU machine.
	$(PIP) install -q --no-deps -c constraints.txt torchrec==1.8.0
	# Builds distrec's C++ CPU kernel in place (setup.py; optional: the install goes on if it fails).
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/distrec doctor
	touch $(STAMP)

# Horovod 0.28.1 is built from source (~6 min on 2 cores, once: the wheel is cached in ~/.cache/distrec).
horovod: $(HOROVOD_STAMP)

$(HOROVOD_STAMP): $(STAMP) launch/install_horovod.sh
	launch/install_horovod.sh $(VENV)
	touch $(HOROVOD_STAMP)

demo: install
	$(VENV)/bin/distrec data synth --config configs/demo.toml --out $(DEMO_DIR)/data
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m distrec.train --config configs/demo.toml \
		--data.path=$(DEMO_DIR)/data --logging.dir=$(DEMO_DIR)/logs --checkpoint.dir=$(DEMO_DIR)/ckpt

test: install horovod
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
