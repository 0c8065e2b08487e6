# dlpipe's entry points. `make demo` and `make test` are the README's quick start; both set up
# what they need first (scripts/setup is idempotent and quick once done).
SHELL := /bin/bash
CARGO ?= cargo
# One build profile for the demo, the tests and the benchmarks, so nothing is compiled twice.
PROFILE_FLAGS := --release

.PHONY: setup build demo test lint bench fuzz soak services-stop clean-data

setup:
	scripts/setup

build: setup
	$(CARGO) build $(PROFILE_FLAGS) --workspace --bins

demo: build
	scripts/demo

test: setup
	scripts/kafka start
	$(CARGO) test $(PROFILE_FLAGS) --workspace --no-fail-fast -- --show-output

# Mutation fuzzing of the record parser and the image decoder, FUZZ_SECONDS per target
# (`make test` runs a short pass of each). A crash prints DLPIPE_FUZZ_SEED to reproduce it.
FUZZ_SECONDS ?= 120
fuzz: setup
	DLPIPE_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test $(PROFILE_FLAGS) --test fuzz -- --nocapture --test-threads 2

# Recovery under SIGKILL at random points, SOAK_RUNS seeds per test (`make test` runs 5): every
# record keeps its prediction and the classifier ends bit-identical to an uninterrupted run.
SOAK_RUNS ?= 50
soak: setup
	scripts/kafka start
	DLPIPE_SOAK_RUNS=$(SOAK_RUNS) $(CARGO) test $(PROFILE_FLAGS) --test recovery -- --nocapture --test-threads 1

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(PROFILE_FLAGS) --workspace --all-targets -- -D warnings

services-stop:
	scripts/kafka stop
	scripts/prometheus stop
