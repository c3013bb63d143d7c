#!/usr/bin/env bash
# Checks the Kubernetes manifests (deploy/k8s/) without a cluster, in five timed parts:
#   configs   deploy/k8s/base/config/*.toml are copies of deploy/*.toml, and the tls component's
#             configurations are deploy/<service>.toml plus deploy/security.toml's sections
#   render    `kubectl kustomize` of the base and every overlay
#   schemas   kubernetes-validate --strict (unknown fields, wrong types) against the Kubernetes
#             schemas of the oldest and newest versions we claim, without network (unshare -rn)
#   policy    scripts/check_manifests.py: limits, non-root, read-only root, probes, policies...
#   self-test the same checks on a copy of the base with planted faults, each of which must fail
#   training  deploy/k8s/training/ (the Kubeflow Trainer runtime) against Kubeflow's models
# One line per finding; exit 1 on any. Needs kubectl and .deps/venv (make bootstrap) only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=.deps/venv/bin/python
versions=(1.29.0 1.37.0)
k8s=deploy/k8s
targets=(base)
for d in "$k8s"/overlays/*/; do d=${d%/}; targets+=("overlays/${d##*/}"); done

die() { echo "check-manifests: $*" >&2; exit 1; }
command -v kubectl >/dev/null || die "kubectl is not installed (it renders the manifests with kubectl kustomize)"
[ -x "$py" ] || die "$py is missing: run make bootstrap"
"$py" -c 'import yaml, kubernetes_validate' 2>/dev/null \
  || die "PyYAML or kubernetes-validate is missing from .deps/venv: run make bootstrap"

# The validator reads bundled schemas only; without a network namespace it provably cannot
# fetch any (unshare -rn: a user namespace, no root needed).
if unshare -rn true 2>/dev/null; then offline=(unshare -rn); else
  offline=(); echo "check-manifests: note: unshare -rn is not permitted here; validating with the network present"
fi
validate=("${offline[@]}" "$root/.deps/venv/bin/kubernetes-validate" --strict --quiet)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
t0=$(date +%s%N)
part() { # name, then the command; prints its time, records a failure
  local name=$1 start rc=0
  shift
  start=$(date +%s%N)
  "$@" || rc=$?
  local ms=$((($(date +%s%N) - start) / 1000000))
  if [ "$rc" = 0 ]; then echo "check-manifests: $name ok ($ms ms)"; else
    echo "check-manifests: $name FAILED ($ms ms)"; failed=1; fi
}

render() {
  local t ok=0
  for t in "${targets[@]}"; do
    kubectl kustomize "$k8s/$t" -o "$tmp/${t//\//_}.yaml" || { echo "$k8s/$t: kubectl kustomize failed"; ok=1; }
  done
  return $ok
}

schemas() {
  local v ok=0
  for v in "${versions[@]}"; do
    (cd "$tmp" && "${validate[@]}" -k "$v" ./*.yaml) || ok=1
  done
  return $ok
}

# deploy/k8s/training/: the Kubeflow Trainer runtime, against Kubeflow Trainer's API models (a CRD
# kind the Kubernetes schemas lack), with the validator's own planted-fault self-test; the
# trainer's RBAC (components/kubeflow, also in overlays/kubeflow's rendering) against the schemas. (The TrainJobs the trainer renders
# are checked by crates/brats-trainer/tests/render.rs.)
training() {
  local ok=0 v
  kubectl kustomize "$k8s/training" -o "$tmp/training.yaml" || { echo "$k8s/training: kubectl kustomize failed"; return 1; }
  for v in "${versions[@]}"; do
    "${validate[@]}" -k "$v" "$k8s/components/kubeflow/trainer-rbac.yaml" || ok=1
  done
  "$py" scripts/k8s/validate_trainjob.py "$tmp/training.yaml" || ok=1
  # The self-test plants faults in a runtime and a TrainJob: the trainer's golden rendering.
  "$py" scripts/k8s/validate_trainjob.py --self-test "$k8s/training/cluster-training-runtime.yaml" \
    crates/brats-trainer/tests/golden/trainjob.json >/dev/null || ok=1
  return $ok
}

part configs "$py" scripts/check_manifests.py configs
part render render
part "schemas (Kubernetes ${versions[*]})" schemas
part policy "$py" scripts/check_manifests.py policy "$tmp"/*.yaml
part self-test "$py" scripts/check_manifests.py selftest --validate "${validate[@]}" -k "${versions[-1]}"
part training training
echo "check-manifests: total $((($(date +%s%N) - t0) / 1000000)) ms"
[ "$failed" = 0 ] || die "FAILED (the lines above say what)"
echo "check-manifests: all passed (${#targets[@]} renderings: ${targets[*]}; rendered and validated, not run on a cluster)"
