# The two commands: `make demo` (the main job on embedded defaults) and `make test` (every test).
# Both bootstrap the native dependencies (.deps/, see scripts/bootstrap.sh) when missing.
CARGO ?= cargo

.PHONY: all bootstrap build demo test lint fmt images check-compose check-manifests bench bench-preprocess bench-inference bench-trainer clean-deps

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --workspace --bins

demo: build
	./target/debug/bratsctl demo --dir demo-out

# The compose end-to-end test (tests/compose.rs) runs inside cargo test wherever Docker answers.
test: bootstrap
	bash scripts/check-manifests.sh
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

lint: bootstrap
	$(CARGO) fmt --all -- --check
	bash scripts/check-deps.sh
	.deps/venv/bin/python scripts/check_compose.py --self-test
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The container images (release binaries), built with no registry: scripts/images.sh, deploy/docker/.
images: bootstrap
	bash scripts/images.sh

check-compose: bootstrap
	.deps/venv/bin/python scripts/check_compose.py --self-test

# Kubernetes manifests (deploy/k8s/): rendered with kubectl kustomize, validated against the
# Kubernetes schemas, policy-checked, and the checks proven on planted faults (no cluster needed).
check-manifests: bootstrap
	bash scripts/check-manifests.sh

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
