#!/usr/bin/env bash
# Records the brats.v1 contract of a release as the baseline the breaking-change check compares
# against (crates/brats-proto/tests/contract.rs): a FileDescriptorSet of proto/brats/v1/*.proto
# as it is at git revision REV, written to proto/released/brats-v1.binpb.
# Usage: scripts/release-proto.sh REV        (e.g. a release tag; run `make bootstrap` first)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:?usage: scripts/release-proto.sh REV}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/brats/v1"
for f in common preprocess trainer inference; do
  git -C "$root" show "$rev:proto/brats/v1/$f.proto" >"$work/brats/v1/$f.proto"
done
"$root/.deps/protoc/bin/protoc" -I "$work" -I "$root/.deps/protoc/include" --include_imports --include_source_info \
  -o "$root/proto/released/brats-v1.binpb" "$work"/brats/v1/*.proto
echo "$rev $(git -C "$root" rev-parse "$rev")" >"$root/proto/released/REVISION"
echo "wrote proto/released/brats-v1.binpb from $rev"
