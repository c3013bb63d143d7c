#!/usr/bin/env bash
# The demo's fast recipe for every training seed: `bratsctl demo`'s job (12 training + 4
# validation synthetic 32³ cases, dataset seed 100; SegResNet 8 filters, 3 levels; Adam lr 5e-3,
# cosine; 25 epochs; validation every 5) run offline with `brats-trainer train`, for seeds
# 0..N-1, and a table of the best validation Dice per region and seed. A region "collapses"
# when its best Dice stays below 0.05.
#
#   benchmarks/trainer/seeds.sh [SEEDS=5]        (≈ 3 min per seed on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
seeds=${1:-5}
bash scripts/bootstrap.sh >/dev/null
cargo build -q -p brats-trainer -p brats-preprocessor --bins
work=$(mktemp -d /tmp/brats-seeds.XXXXXX)
trap 'rm -rf "$work"' EXIT
./target/debug/brats-preprocess synth --out "$work/data" --shape 32,32,32 --seed 100 --count 16 --validation 4 >/dev/null
model='{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1]}'
printf '%-5s %-8s %-8s %-8s %-8s %-7s %s\n' seed tc wt et mean seconds collapsed
for ((seed = 0; seed < seeds; seed++)); do
  start=$(date +%s)
  ./target/debug/brats-trainer train --datalist "$work/data/datalist.json" --epochs 25 --lr 5e-3 \
    --crop 32,32,32 --val-roi 32,32,32 --val-interval 5 --devices cpu --seed "$seed" --model "$model" \
    --out "$work/run-$seed" >"$work/run-$seed.log" 2>&1 || { echo "seed $seed failed: $(tail -3 "$work/run-$seed.log")"; continue; }
  took=$(($(date +%s) - start))
  # metrics.csv: epoch,loss,lr,dice_tc,dice_wt,dice_et,dice_mean,seconds; best of each column.
  awk -F, -v seed="$seed" -v took="$took" 'NR > 1 && $7 != "" {
      for (c = 4; c <= 7; c++) if ($c > best[c]) best[c] = $c }
    END {
      collapsed = ""
      if (best[4] < 0.05) collapsed = collapsed " TC"; if (best[5] < 0.05) collapsed = collapsed " WT"
      if (best[6] < 0.05) collapsed = collapsed " ET"
      printf "%-5s %-8.4f %-8.4f %-8.4f %-8.4f %-7s %s\n", seed, best[4], best[5], best[6], best[7], took, (collapsed == "" ? "-" : collapsed)
    }' "$work/run-$seed/metrics.csv"
done
