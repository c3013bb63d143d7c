# The two commands: `make demo` (the main job on embedded defaults) and `make test` (every test).
# Both bootstrap the native dependencies (.deps/, see scripts/bootstrap.sh) when missing.
CARGO ?= cargo

.PHONY: all bootstrap build demo test lint fmt bench clean-deps

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

bench: bootstrap
	bash benchmarks/run.sh

clean-deps:
	rm -rf .deps
