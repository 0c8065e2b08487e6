# dlpipe's entry points. `make demo` and `make test` are the README's quick start; both set up
# what they need first (scripts/setup is idempotent and quick once done).
SHELL := /bin/bash
CARGO ?= cargo
# One build profile for the demo, the tests and the benchmarks, so nothing is compiled twice.
PROFILE_FLAGS := --release

.PHONY: setup build demo test lint bench fuzz soak services-stop clean-data dist dist-cuda image

setup:
	scripts/setup

build: setup
	$(CARGO) build $(PROFILE_FLAGS) --workspace --bins

demo: build
	scripts/demo

# The relocatable release, dist/dlpipe-<version>-linux-x86_64.tar.gz: the binary, the libtorch
# libraries it loads (found through $ORIGIN/../lib), models, configs, dashboards and docs
# (README "Deploy"). dist-cuda also carries libtorch_cuda and the CUDA libraries.
dist: setup
	scripts/dist

dist-cuda: setup
	scripts/dist --cuda

# The container image dlpipe:<version> (Dockerfile) from that release, built with buildah.
image: setup
	scripts/image

test: setup
	scripts/kafka start
	scripts/s3 start
	scripts/gcs start
	scripts/azure start
	CARGO=$(CARGO) scripts/test

# Coverage-guided fuzzing (cargo-fuzz, libFuzzer, stable Rust) of the record parsers and of image
# decoding with preprocessing, FUZZ_SECONDS per target; a crash leaves its input in
# fuzz/artifacts/. `make test` runs a short mutation-fuzzing pass of the same code (tests/fuzz.rs).
FUZZ_SECONDS ?= 120
fuzz:
	scripts/fuzz $(FUZZ_SECONDS)

# Recovery under SIGKILL at random points, SOAK_RUNS seeds per test (`make test` runs 3, drawn
# anew each run; DLPIPE_SOAK_SEED=N starts them at N): every
# record keeps its prediction and the classifier ends bit-identical to an uninterrupted run.
# Then Kafka brokers failing (a 3-node cluster of the test's own) under an at-least-once
# pipeline, and under both delivery modes at once (`make test` runs the exactly-once one).
SOAK_RUNS ?= 50
soak: setup
	scripts/kafka start
	DLPIPE_SOAK_RUNS=$(SOAK_RUNS) $(CARGO) test $(PROFILE_FLAGS) --test recovery -- --nocapture --test-threads 1
	$(CARGO) test $(PROFILE_FLAGS) --test kafka_failover -- --ignored --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(PROFILE_FLAGS) --workspace --all-targets -- -D warnings

services-stop:
	scripts/kafka stop
	scripts/prometheus stop
	scripts/s3 stop
	scripts/gcs stop
	scripts/azure stop
