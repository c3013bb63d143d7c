"""The opt-in fast mode (`segment --foreground-crop`, SegmentOptions.foreground_crop) against the
exact mode and MONAI, per case (issue 14 item 3); called by `benchmarks/inference/run.sh fast`.

For each case: ours exact, ours fast and MONAI's bundle inference, one fresh process each, in
rotating order for ROUNDS rounds; medians of the `total` each side reports (bench.py), the
fast mode's speed-up over the exact mode and over MONAI, and the agreement of the fast label map
with the exact one: Dice per region (TC = labels 1 and 4, WT = 1, 2 and 4, ET = 4; 1.0 where both
are empty) and the count of differing voxels. The exact label map's equality with MONAI's is
checked as in `compare` (compare.py).

Environment: as bench.py, plus CASES: `name=t1c,t1,t2,flair` entries separated by spaces.
Writes $DATA/fast.jsonl, prints Markdown.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np

import bench

REGIONS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}


def agreement(a_path, b_path):
    a = np.asarray(nib.load(a_path).dataobj)
    b = np.asarray(nib.load(b_path).dataobj)
    dice = {}
    for region, labels in REGIONS.items():
        ma, mb = np.isin(a, labels), np.isin(b, labels)
        total = int(ma.sum() + mb.sum())
        dice[region] = 1.0 if total == 0 else 2.0 * int((ma & mb).sum()) / total
    return {"dice": dice, "differing_voxels": int((a != b).sum()), "voxels": int(a.size),
            "foreground_exact": int((a > 0).sum()), "foreground_fast": int((b > 0).sum())}


def main(rounds):
    cases = [c.split("=", 1) for c in os.environ["CASES"].split()]
    log = open(bench.DATA / "fast.jsonl", "w")
    results = []
    for name, paths in cases:
        bench.IMAGES = paths.split(",")
        exact_out, fast_out = str(bench.DATA / "exact-seg.nii.gz"), str(bench.DATA / "fast-seg.nii.gz")
        sides = ["exact", "fast", "monai"]
        rows = {s: [] for s in sides}
        for i in range(rounds):
            for side in sides[i % 3:] + sides[:i % 3]:
                sys.stderr.write(f"== {name} round {i + 1}/{rounds}: {side} (load {bench.load():.2f})\n")
                if side == "exact":
                    r = bench.run_ours(out=exact_out)
                elif side == "fast":
                    r = bench.run_ours(["--foreground-crop"], out=fast_out)
                else:
                    r = bench.run_monai()
                r.update(case=name, side=side, round=i + 1)
                rows[side].append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
        agree = agreement(exact_out, fast_out)
        monai_cmp = json.loads(subprocess.run([bench.PY, str(bench.HERE / "compare.py"), exact_out,
                                               str(bench.DATA / "monai-seg.nii.gz")],
                                              capture_output=True, text=True, check=True).stdout)
        med = {s: bench.med(rows[s], lambda r: r["total_s"]) for s in sides}
        rss = {s: bench.med(rows[s], lambda r: r["peak_rss_kib"]) / 1024 for s in sides}
        res = {"case": name, "median_total_s": med, "peak_rss_mib": rss, "agreement": agree,
               "exact_vs_monai_differing_voxels": monai_cmp["differing_voxels"]}
        log.write(json.dumps(res) + "\n")
        results.append(res)
    print(f"{rounds} round(s) per case, sides in rotating order, fresh processes; medians of each side's total"
          f" (ours: ORT session creation to label map written; MONAI: load to label map written, 2 threads).\n")
    print("| case | exact | fast | MONAI | fast vs exact | fast vs MONAI | exact vs MONAI | peak RSS exact / fast / MONAI"
          " | Dice TC / WT / ET (fast vs exact) | differing voxels | exact = MONAI label map |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|")
    for r in results:
        m, a, rss = r["median_total_s"], r["agreement"], r["peak_rss_mib"]
        d = a["dice"]
        print(f"| {r['case']} | {m['exact']:.2f} s | {m['fast']:.2f} s | {m['monai']:.2f} s | {m['exact'] / m['fast']:.2f}×"
              f" | **{m['monai'] / m['fast']:.2f}×** | {m['monai'] / m['exact']:.2f}× | {rss['exact']:.0f} / {rss['fast']:.0f} /"
              f" {rss['monai']:.0f} MiB | {d['TC']:.4f} / {d['WT']:.4f} / {d['ET']:.4f} | {a['differing_voxels']} of"
              f" {a['voxels']} | {'yes' if r['exact_vs_monai_differing_voxels'] == 0 else str(r['exact_vs_monai_differing_voxels']) + ' differ'} |")


if __name__ == "__main__":
    main(int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 1)
