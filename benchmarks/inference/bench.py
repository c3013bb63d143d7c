"""Driver of the CPU inference benchmark (issue 4 item 8); called by benchmarks/inference/run.sh.

  bench.py compare --rounds N   ours (`brats-inference segment`) and MONAI (monai_inference.py)
                                alternately, N rounds, one fresh process each; medians, ratio,
                                stage breakdown, peak RSS (/usr/bin/time -v), label-map check
  bench.py options [--roi X,Y,Z] ONNX Runtime session options, ours only, one run each

Environment: BIN (brats-inference), PY (MONAI venv python), DATA (work dir), MODEL, MODEL_IN
(instance-norm export), IMAGES (4 paths, space-separated); optional BEFORE_BIN + BEFORE_MODEL: a
third side in `compare` (e.g. an earlier binary and its export), run in the same rounds. The order
of the sides rotates from round to round. Writes $DATA/*.jsonl, prints Markdown.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = os.environ["BIN"]
PY = os.environ["PY"]
DATA = Path(os.environ["DATA"])
MODEL = os.environ["MODEL"]
MODEL_IN = os.environ.get("MODEL_IN")
BEFORE_BIN = os.environ.get("BEFORE_BIN")
BEFORE_MODEL = os.environ.get("BEFORE_MODEL")
IMAGES = os.environ["IMAGES"].split()
STAGES = ["decompress", "convert", "normalise", "inference", "postprocess", "encode"]


def timed(cmd):
    """Runs cmd under /usr/bin/time -v; returns (stdout, wall s, peak RSS KiB, user s, sys s)."""
    tf = DATA / "time.txt"
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", "-o", str(tf)] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    t = tf.read_text()
    g = lambda pat: float(re.search(pat, t).group(1))  # noqa: E731
    return p.stdout, wall, int(g(r"Maximum resident set size \(kbytes\): (\d+)")), g(r"User time \(seconds\): ([\d.]+)"), g(r"System time \(seconds\): ([\d.]+)")


def run_ours(extra=(), model=MODEL, out=None, logits=None, binary=BIN):
    out = out or str(DATA / "ours-seg.nii.gz")
    cmd = [binary, "segment", "--model", model, "--image", *IMAGES, "--out", out, *extra]
    if logits:
        cmd += ["--logits", logits]
    stdout, wall, rss, user, sys_ = timed(cmd)
    m = re.search(r"timing\s+(.*)", stdout)
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", m.group(1))}
    total = float(re.search(r" in ([\d.]+) s", stdout).group(1))  # model load .. label map written
    return {"side": "ours", "stages_s": stages, "total_s": total, "wrote_in_s": total, "process_wall_s": wall,
            "peak_rss_kib": rss, "cpu_s": user + sys_, "user_s": user, "sys_s": sys_, "args": list(extra)}


def run_monai(logits=None):
    cmd = [PY, str(HERE / "monai_inference.py"), *IMAGES, "--out", str(DATA / "monai-seg.nii.gz"), "--threads", "2"]
    if logits:
        cmd += ["--logits", logits]
    stdout, wall, rss, user, sys_ = timed(cmd)
    r = json.loads(stdout.strip().splitlines()[-1])
    r.update(total_s=r["stages_s"]["total"], process_wall_s=wall, peak_rss_kib=rss, cpu_s=user + sys_, user_s=user, sys_s=sys_)
    return r


def load():
    return os.getloadavg()[0]


def med(rows, f):
    return statistics.median(f(r) for r in rows)


def compare(rounds):
    ours, monai, before = [], [], []
    sides = ["ours", "monai"] + (["before"] if BEFORE_BIN and BEFORE_MODEL else [])
    log = open(DATA / "compare.jsonl", "w")
    for i in range(rounds):
        last = i == rounds - 1
        for side in sides[i % len(sides):] + sides[:i % len(sides)]:
            la = load()
            sys.stderr.write(f"== round {i + 1}/{rounds}: {side} (load {la:.2f})\n")
            if side == "ours":
                r = run_ours(logits=str(DATA / "ours-logits.safetensors") if last else None)
                ours.append(r)
            elif side == "before":
                r = run_ours(model=BEFORE_MODEL, binary=BEFORE_BIN, out=str(DATA / "before-seg.nii.gz"))
                r["side"] = "before"
                before.append(r)
            else:
                r = run_monai(logits=str(DATA / "monai-logits.safetensors") if last else None)
                monai.append(r)
            r["round"], r["load_before"] = i + 1, la
            log.write(json.dumps(r) + "\n")
            log.flush()
    cmp = subprocess.run([PY, str(HERE / "compare.py"), str(DATA / "ours-seg.nii.gz"), str(DATA / "monai-seg.nii.gz"),
                          str(DATA / "ours-logits.safetensors"), str(DATA / "monai-logits.safetensors")],
                         capture_output=True, text=True, check=True).stdout
    (DATA / "compare-labels.json").write_text(cmp)
    report(ours, monai, json.loads(cmp), before)


def report_from_files():
    """Re-prints the table from $DATA/compare.jsonl and $DATA/compare-labels.json."""
    rows = [json.loads(line) for line in open(DATA / "compare.jsonl")]
    for r in rows:
        if r["side"] == "ours" and "wrote_in_s" in r:
            r["total_s"] = r["wrote_in_s"]
    report([r for r in rows if r["side"] == "ours"], [r for r in rows if r["side"] == "monai"],
           json.loads((DATA / "compare-labels.json").read_text()), [r for r in rows if r["side"] == "before"])


def report(ours, monai, c, before=()):
    rounds = len(ours)
    mib = lambda k: k / 1024  # noqa: E731
    sides = [("ours", ours), ("MONAI", monai)] + ([("before", before)] if before else [])
    s = lambda rows, k: med(rows, lambda r: r["stages_s"].get(k, 0.0))  # noqa: E731
    row = lambda label, f: print(f"| {label} | " + " | ".join(f(rows) for _, rows in sides) + " |")  # noqa: E731
    print(f"{rounds} rounds, sides in rotating order; medians. Ours: `brats-inference segment` (ORT CPU, default session options);"
          f" MONAI {monai[0]['monai']} / torch {monai[0]['torch']}, 2 threads."
          + (" Before: BEFORE_BIN with BEFORE_MODEL." if before else "") + "\n")
    print("| stage | " + " | ".join(f"{n} (median)" for n, _ in sides) + " |\n|---|" + "---:|" * len(sides))
    stage = lambda rows, k: f"{s(rows, k):.2f} s"  # noqa: E731
    row("decompress + convert (ours) / `LoadImaged` (MONAI)",
        lambda rows: f"{s(rows, 'load'):.2f} s" if rows is monai else f"{s(rows, 'decompress') + s(rows, 'convert'):.2f} s")
    row("normalise", lambda rows: stage(rows, "normalise"))
    row("inference (sliding window, 1 window 240×240×160)", lambda rows: stage(rows, "inference"))
    row("postprocess (sigmoid, threshold, label map, volumes)", lambda rows: stage(rows, "postprocess"))
    row("encode + write label map", lambda rows: stage(rows, "encode"))
    row("**total** (ours incl. ORT session creation)", lambda rows: f"**{med(rows, lambda r: r['total_s']):.2f} s**")
    row("whole process wall (incl. start, imports, model build)", lambda rows: f"{med(rows, lambda r: r['process_wall_s']):.2f} s")
    row("CPU time user + sys, whole process", lambda rows: f"{med(rows, lambda r: r['cpu_s']):.1f} s")
    row("peak RSS (`/usr/bin/time` max RSS)", lambda rows: f"{mib(med(rows, lambda r: r['peak_rss_kib'])):.0f} MiB")
    to, tm = med(ours, lambda r: r["total_s"]), med(monai, lambda r: r["total_s"])
    print(f"\nRatio MONAI / ours (median total): **{tm / to:.2f}×**; inference stage alone: {s(monai,'inference') / s(ours,'inference'):.2f}×;"
          f" per round (same round, adjacent runs): " + ", ".join(f"{m['total_s'] / o['total_s']:.2f}×" for o, m in zip(ours, monai)) + ".")
    if before:
        tb = med(before, lambda r: r["total_s"])
        print(f"Before / ours (median total): {tb / to:.2f}×; MONAI / before: {tm / tb:.2f}×.")
    for n, rows in sides:
        print(f"Round totals, {n}: " + ", ".join(f"{r['total_s']:.1f} s (load {r['load_before']:.1f})" for r in rows) + ".")
    print(f"Label maps: {c['differing_voxels']} differing voxels of {240*240*155}, "
          f"{c['differing_voxels_outside_near_zero']} of them outside |logit| < 1e-4 "
          f"({c['near_zero_voxels']} voxels have a near-zero logit); logits max abs diff {c['logits_max_abs_diff']:.2e}; "
          f"identical by the issue's rule: {'yes' if c['identical'] else 'NO'}.")


def options(roi):
    variants = [
        ("defaults (threads 0 = all cores, shape-pinned CPU session, level 3)", []),
        ("--threads 1", ["--threads", "1"]),
        ("--threads 2", ["--threads", "2"]),
        ("--ort-config session.intra_op.allow_spinning=0", ["--ort-config", "session.intra_op.allow_spinning=0"]),
        ("--ort-config session.dynamic_block_base=4", ["--ort-config", "session.dynamic_block_base=4"]),
        ("--opt-level 2 (extended: no NCHWc layout)", ["--opt-level", "2"]),
        ("--no-arena (no effect: pinned CPU sessions never use the arena)", ["--no-arena"]),
    ]
    if MODEL_IN:
        variants.append(("`export-onnx --instance-norm` model, defaults", ["@in"]))
    only = os.environ.get("ONLY")
    log = open(DATA / "options.jsonl", "a")
    print(f"roi {roi}, ours only, one run each.\n")
    print("| session options | inference | total | peak RSS | CPU user + sys | load avg before |\n|---|---:|---:|---:|---:|---:|")
    for name, args in variants:
        if only and not re.search(only, name):
            continue
        model = MODEL
        if args and args[0] == "@in":
            model, args = MODEL_IN, args[1:]
        la = load()
        sys.stderr.write(f"== options: {name} (load {la:.2f})\n")
        r = run_ours(["--roi", roi, *args], model=model, out=str(DATA / "opt-seg.nii.gz"))
        r.update(name=name, roi=roi, load_before=la)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(f"| {name} | {r['stages_s']['inference']:.2f} s | {r['total_s']:.2f} s | {r['peak_rss_kib'] / 1024:.0f} MiB | {r['cpu_s']:.1f} s | {la:.2f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report_from_files()
    elif sys.argv[1] == "compare":
        compare(int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3)
    else:
        options(sys.argv[sys.argv.index("--roi") + 1] if "--roi" in sys.argv else "240,240,160")
