#!/usr/bin/env bash
# The demo's fast recipe for every training seed: `bratsctl demo`'s job (12 training + 4
# validation synthetic 32³ cases, dataset seed 100; SegResNet 8 filters, 3 levels, dropout 0.2;
# Adam lr 5e-3, cosine; 25 epochs; validation every 5) run offline with `brats-trainer train`,
# for seeds 0..N-1, and a table of the best validation Dice per region and seed. A region
# "collapses" when its best Dice stays below 0.05.
#
# With --monai, MONAI's recipe is trained on the same datalist with the same hyper-parameters
# and seed right after ours (monai_learning.py, tests/monai/.venv), and the summary says whether
# we collapse a region in no more seeds than MONAI and reach at least its mean best Dice.
#
#   benchmarks/trainer/seeds.sh [SEEDS=5] [--monai] [--first K]   (≈ 1–2 min per seed and side on 2 cores)
#
# --first K runs seeds K..K+SEEDS-1 (to extend an earlier sweep).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
seeds=5
monai=0
first=0
while [ $# -gt 0 ]; do
  case $1 in
    --monai) monai=1 ;;
    --first) first=$2; shift ;;
    *) seeds=$1 ;;
  esac
  shift
done
bash scripts/bootstrap.sh >/dev/null
cargo build -q -p brats-trainer -p brats-preprocessor --bins
py=tests/monai/.venv/bin/python
if [ $monai = 1 ] && [ ! -x "$py" ]; then tests/monai/setup.sh; fi
work=$(mktemp -d /tmp/brats-seeds.XXXXXX)
trap 'rm -rf "$work"' EXIT
./target/debug/brats-preprocess synth --out "$work/data" --shape 32,32,32 --seed 100 --count 16 --validation 4 >/dev/null
model='{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1]}'
printf '%-7s %-5s %-8s %-8s %-8s %-8s %-7s %s\n' impl seed tc wt et mean seconds collapsed
: >"$work/rows"
row() { # impl seed tc wt et mean seconds
  local collapsed
  collapsed=$(awk -v tc="$3" -v wt="$4" -v et="$5" 'BEGIN {
    c = ""; if (tc < 0.05) c = c " TC"; if (wt < 0.05) c = c " WT"; if (et < 0.05) c = c " ET"; print (c == "" ? "-" : c) }')
  printf '%-7s %-5s %-8.4f %-8.4f %-8.4f %-8.4f %-7.0f %s\n' "$@" "$collapsed"
  [ "$collapsed" = "-" ] && collapsed=""
  echo "$1 $6 $collapsed" >>"$work/rows"
}
for ((seed = first; seed < first + seeds; seed++)); do
  start=$(date +%s)
  ./target/debug/brats-trainer train --datalist "$work/data/datalist.json" --epochs 25 --lr 5e-3 \
    --crop 32,32,32 --val-roi 32,32,32 --val-interval 5 --devices cpu --seed "$seed" --model "$model" \
    --out "$work/run-$seed" >"$work/run-$seed.log" 2>&1 || { echo "ours, seed $seed failed: $(tail -3 "$work/run-$seed.log")"; continue; }
  took=$(($(date +%s) - start))
  # metrics.csv: epoch,loss,lr,dice_tc,dice_wt,dice_et,dice_mean,seconds; best of each column.
  read -r tc wt et mean < <(awk -F, 'NR > 1 && $7 != "" { for (c = 4; c <= 7; c++) if ($c > b[c]) b[c] = $c }
    END { print b[4] + 0, b[5] + 0, b[6] + 0, b[7] + 0 }' "$work/run-$seed/metrics.csv")
  row ours "$seed" "$tc" "$wt" "$et" "$mean" "$took"
  if [ $monai = 1 ]; then
    out=$("$py" benchmarks/trainer/monai_learning.py --datalist "$work/data/datalist.json" --seed "$seed" \
      --epochs 25 --lr 5e-3 --crop 32 --val-interval 5 --threads 2)
    read -r tc wt et mean took < <("$py" -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["tc"], r["wt"], r["et"], r["mean"], r["seconds"])' "$out")
    row MONAI "$seed" "$tc" "$wt" "$et" "$mean" "$took"
  fi
done
if [ $monai = 1 ]; then
  awk '{ n[$1]++; sum[$1] += $2; if (NF > 2) collapsed[$1]++ }
    END {
      printf "ours: %d seed(s) with a collapsed region, mean best Dice %.4f; MONAI: %d, %.4f\n",
        collapsed["ours"], sum["ours"] / n["ours"], collapsed["MONAI"], sum["MONAI"] / n["MONAI"]
      ok = collapsed["ours"] <= collapsed["MONAI"] && sum["ours"] / n["ours"] >= sum["MONAI"] / n["MONAI"]
      print (ok ? "we learn as MONAI learns: no more collapses, mean at least MONAI'"'"'s" : "NOT MET")
    }' "$work/rows"
fi
