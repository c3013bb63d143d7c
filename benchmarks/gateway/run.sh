#!/usr/bin/env bash
# DIMSE ingest: dcmtk storescu sends one full-size study (4 series × 155 slices, 620 files,
# generated from the real BraTS case by scripts/dicom/make_study.py) to our C-STORE SCP
# (brats-gateway serve) and, in the same run, to dcmtk's storescp (the reference), alternating,
# with 1 and 4 parallel associations. Prints files/s and MB/s per side and the ratio.
#   benchmarks/gateway/run.sh [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
py=.deps/venv/bin/python
case=../shared/data/real/BraTS-GLI-00001-000
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# The dev profile is optimised (opt-level 2): the test build serves.
cargo build -q -p brats-gateway
gw=target/debug/brats-gateway
$py scripts/dicom/make_study.py --case "$case" --out "$work/study" --variant plain >/dev/null
files=$(find "$work/study/dicom" -type f | wc -l)
bytes=$(du -sb "$work/study/dicom" | cut -f1)
port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }

ours_port=$(port); ref_port=$(port)
cat >"$work/gateway.toml" <<TOML
spool_dir = "$work/spool"
jobs_root = "file:$work/jobs"
[server]
listen = "127.0.0.1:0"
metrics_listen = ""
[dimse]
listen = "127.0.0.1:$ours_port"
ae_title = "BRATS"
min_free_mb = 1
[study]
stable_after_s = 3600.0
max_wait_s = 3600.0
[model]
onnx = "tests/fixtures/onnx/pointwise_head.onnx"
TOML
RUST_LOG=warn $gw serve --config "$work/gateway.toml" 2>"$work/gateway.log" &
mkdir -p "$work/ref"
# dcmtk sets TCP_NODELAY only when the variable is set; without it every store waits ~40 ms
# (Nagle against delayed ACK). Give the reference its best case.
TCP_NODELAY=1 storescp -aet BRATS -od "$work/ref" "$ref_port" 2>/dev/null &
wait_port "$ours_port"; wait_port "$ref_port"

# send PORT PARALLEL: seconds to send the study over PARALLEL associations (series split).
send() {
  local start end
  start=$(date +%s.%N)
  if [ "$2" = 1 ]; then
    storescu -aec BRATS +sd +r 127.0.0.1 "$1" "$work/study/dicom"
  else
    (for d in "$work"/study/dicom/*/; do storescu -aec BRATS +sd +r 127.0.0.1 "$1" "$d" & done; wait)
  fi
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}
printf '%-10s %-6s %10s %10s %10s\n' side assoc seconds files/s MB/s
for parallel in 1 4; do
  for r in $(seq "$rounds"); do
    for side in ours storescp; do
      p=$ours_port; [ $side = storescp ] && p=$ref_port
      s=$(send "$p" "$parallel")
      printf '%-10s %-6s %10.2f %10.1f %10.1f\n' $side "$parallel" "$s" "$(echo "$files / $s" | bc -l)" "$(echo "$bytes / 1048576 / $s" | bc -l)"
    done
  done
done
echo "study: $files files, $((bytes / 1048576)) MB; machine: $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
