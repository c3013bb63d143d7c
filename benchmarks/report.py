"""Turns the JSON lines of benchmarks/run.sh into the results table (Markdown).

Usage: report.py NAME OURS.jsonl MONAI.jsonl [COMPARE.json]
Each .jsonl holds the "kind": "median" line of every round (one process per side per round);
the table gives the median over rounds of each stage and the largest peak RSS seen.
"""

import json
import statistics
import sys


def rows(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip() and json.loads(l).get("kind") == "median"]


def med(rs, key):
    return statistics.median(r[key] for r in rs)


def ms(s):
    return f"{s * 1000:.0f} ms"


def main():
    name, ours_path, monai_path = sys.argv[1:4]
    ours, monai = rows(ours_path), rows(monai_path)
    if not ours or not monai:
        sys.exit(f"{name}: no results (ours {len(ours)}, MONAI {len(monai)} rounds)")
    o_total, m_total = med(ours, "total"), med(monai, "total")
    o_nowrite = statistics.median(r["total"] - r["write"] for r in ours)
    print(f"### {name}: shape {ours[0]['shape']}, {len(ours)} rounds (ours {ours[0]['threads']} threads, "
          f"MONAI torch {monai[0]['torch']} / monai {monai[0]['monai']}, {monai[0]['threads']} threads)")
    print()
    print("| stage | ours (median) | MONAI (median) |")
    print("|---|---:|---:|")
    print(f"| read files | {ms(med(ours, 'read'))} | (in load) |")
    print(f"| decompress | {ms(med(ours, 'decompress'))} | (in load) |")
    print(f"| convert + validate | {ms(med(ours, 'convert'))} | (in load) |")
    print(f"| `LoadImaged` | {ms(med(ours, 'read') + med(ours, 'decompress') + med(ours, 'convert'))} "
          f"(sum of the 3 above) | {ms(med(monai, 'load'))} |")
    print(f"| normalise | {ms(med(ours, 'normalise'))} | {ms(med(monai, 'normalise'))} |")
    print(f"| write safetensors | {ms(med(ours, 'write'))} | (not done) |")
    print(f"| (of which encoding the bytes) | {ms(med(ours, 'encode'))} | |")
    print(f"| **total** | **{ms(o_total)}** | **{ms(m_total)}** |")
    print(f"| CPU time (user + sys, all threads) | {ms(med(ours, 'cpu'))} | {ms(med(monai, 'cpu'))} |")
    print(f"| total without write | {ms(o_nowrite)} | {ms(m_total)} |")
    print(f"| peak RSS (VmHWM) | {max(r['vm_hwm_kib'] for r in ours) / 1024:.0f} MiB | "
          f"{max(r['vm_hwm_kib'] for r in monai) / 1024:.0f} MiB "
          f"({monai[0]['rss_after_import_kib'] / 1024:.0f} MiB of it is torch + MONAI imported) |")
    print()
    print(f"Speed-up (MONAI median / ours median): **{m_total / o_total:.1f}×** including our write, "
          f"{m_total / o_nowrite:.1f}× without it.")
    print(f"CPU-time ratio (MONAI / ours): {med(monai, 'cpu') / med(ours, 'cpu'):.1f}×.")
    print(f"Round totals, ours: {', '.join(ms(r['total']) for r in ours)}; "
          f"MONAI: {', '.join(ms(r['total']) for r in monai)}.")
    if len(sys.argv) > 4:
        with open(sys.argv[4]) as f:
            c = json.loads(f.read().strip().splitlines()[-1])
        verdict = "OK" if c["ok"] else "MISMATCH"
        print(f"Outputs agree: max abs diff {c['max_abs_diff']:.3g} (tolerance {c['tol']:g}): {verdict}.")
    print()


if __name__ == "__main__":
    main()
