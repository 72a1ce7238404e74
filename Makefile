# strata — the commands. `make demo` runs the main job, `make test` the tests;
# both work alone on a fresh Debian machine (they install what is missing).

PYTHON ?= /usr/bin/python3
BUILD ?= build
JOBS ?= 2
CMAKE_FLAGS ?=
PYTEST_FLAGS ?=

DEB_PACKAGES := cmake g++ make ninja-build libopenblas0-pthread liburing-dev libnuma-dev \
  libgtest-dev nlohmann-json3-dev libxxhash-dev pybind11-dev python3-pybind11 python3-torch \
  python3-pytest python3-numpy python3-tqdm python3-matplotlib python3-dev python3-setuptools \
  python3-venv python3-pip fio util-linux clang-format ccache

export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: all deps build demo cuda format format-check test test-cpp test-python test-stress test-sanitize test-tsan fuzz bench clean info

all: build

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make deps: installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	  else \
	    echo "make deps: missing packages; run as root:"; \
	    echo "  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DPython_EXECUTABLE=$(PYTHON) $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

# The demo builds only what it runs: the core library and the Python module (no
# tests, benches or CUDA objects). DEMO_SECONDS / DEMO_STEPS shorten it. torch's
# OpenMP threads sleep between operations unless the environment says otherwise
# (OMP_WAIT_POLICY; docs/performance.md, "torch's OpenMP threads").
DEMO_SECONDS ?= 180
DEMO_STEPS ?= 300
demo: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) --target _C -j $(JOBS)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} \
	  $(PYTHON) examples/finetune_gpt.py --config examples/configs/nvme.json --out demo_out \
	  --max-seconds $(DEMO_SECONDS) --steps $(DEMO_STEPS)

# The CUDA side (csrc/cuda), on demand: reconfigures $(BUILD) with it, so the
# Python module can update on a GPU; needs nvcc (/usr/local/cuda), never a GPU.
NVCC ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) nvcc)
cuda: deps
	cmake -S . -B $(BUILD) -G Ninja -DPython_EXECUTABLE=$(PYTHON) -DSTRATA_WITH_CUDA=ON \
	  -DCMAKE_CUDA_COMPILER=$(NVCC) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

# clang-format over every tracked C++/CUDA file; `make format` rewrites them.
FORMAT_FILES = $(shell git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
format-check:
	@echo "clang-format --dry-run --Werror over $(words $(FORMAT_FILES)) tracked C++/CUDA files"
	@clang-format --dry-run --Werror $(FORMAT_FILES) && echo "clang-format: clean"

format:
	clang-format -i $(FORMAT_FILES)

test: build test-cpp test-python

test-cpp:
	cd $(BUILD) && ctest -L unit --output-on-failure -j $(JOBS)

test-python:
	$(PYTHON) -m pytest -q -m "not stress and not slow" tests/python $(PYTEST_FLAGS)

test-stress: build
	cd $(BUILD) && ctest -L stress --output-on-failure
	$(PYTHON) -m pytest -q -m "stress or slow" tests/python $(PYTEST_FLAGS)

# C++ unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (CUDA off).
test-sanitize: deps
	cmake -S . -B build-asan -G Ninja -DSTRATA_SANITIZE=address,undefined -DSTRATA_WITH_CUDA=OFF \
	  -DSTRATA_BUILD_PYTHON=OFF -DSTRATA_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=Debug
	cmake --build build-asan -j $(JOBS)
	cd build-asan && ctest -L unit --output-on-failure -j $(JOBS)

test-tsan: deps
	cmake -S . -B build-tsan -G Ninja -DSTRATA_SANITIZE=thread -DSTRATA_WITH_CUDA=OFF \
	  -DSTRATA_BUILD_PYTHON=OFF -DSTRATA_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build build-tsan -j $(JOBS)
	cd build-tsan && ctest -L unit --output-on-failure -j $(JOBS)

# libFuzzer on the config parser (clang, outside CI): make fuzz FUZZ_SECONDS=600
FUZZ_SECONDS ?= 600
fuzz: deps
	@dpkg-query -W -f='$${Status}' libclang-rt-14-dev 2>/dev/null | grep -q 'install ok installed' || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev >/dev/null
	CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DSTRATA_FUZZ=ON -DSTRATA_BUILD_PYTHON=OFF \
	  -DSTRATA_BUILD_TESTS=OFF -DSTRATA_BUILD_BENCH=OFF -DSTRATA_WITH_CUDA=OFF -DSTRATA_CORE_DIRS="common;config"
	cmake --build build-fuzz -j $(JOBS) --target fuzz_config
	mkdir -p build-fuzz/corpus_config
	build-fuzz/bin/fuzz_config -dict=tests/cpp/fuzz/fuzz_config.dict -max_total_time=$(FUZZ_SECONDS) \
	  -print_final_stats=1 -artifact_prefix=build-fuzz/ build-fuzz/corpus_config tests/cpp/fuzz/corpus_config

bench: build
	$(BUILD)/bin/strata-bench-adam --sizes 16M --threads 0
	$(BUILD)/bin/strata-bench-io --size 1G --block-size 1M --queue-depth 32
	$(BUILD)/bin/strata-bench-pool

info: build
	$(PYTHON) -m strata info

clean:
	rm -rf $(BUILD) build-asan build-tsan build-fuzz python/strata/_C*.so
