# The two commands: `make demo` (the main job on embedded defaults) and `make test` (every test).
# Both bootstrap the native dependencies (.deps/, see scripts/bootstrap.sh) when missing.
CARGO ?= cargo

.PHONY: all bootstrap build demo test lint fmt bench bench-preprocess bench-inference bench-trainer clean-deps

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --workspace --bins

demo: build
	./target/debug/bratsctl demo --dir demo-out

test: bootstrap
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

lint: bootstrap
	$(CARGO) fmt --all -- --check
	bash scripts/check-deps.sh
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Each benchmark runs ours and MONAI side by side (benchmarks/README.md); `bench` runs all three.
bench: bench-preprocess bench-inference bench-trainer

bench-preprocess: bootstrap
	bash benchmarks/run.sh

bench-inference: bootstrap
	bash benchmarks/inference/run.sh compare

bench-trainer: bootstrap
	bash benchmarks/trainer/run.sh

clean-deps:
	rm -rf .deps
