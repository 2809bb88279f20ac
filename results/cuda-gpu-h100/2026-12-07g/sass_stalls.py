# Warp-stall samples and executed instructions of one kernel, per region and opcode, from ncu's source page
# (session 22). The CSV comes from a report of `--set full` (SourceCounters):
#   ncu -i REPORT.ncu-rep --page source --print-source sass --csv > m64-sass.csv
#   python3 sass_stalls.py m64-sass.csv.gz
# Regions: the decode loop is the innermost backward branch around the HMMAs; before it the set-up, after it
# the warps' combine and the store.
import collections, csv, gzip, re, sys

path = sys.argv[1]
rows_csv = list(csv.reader((gzip.open if path.endswith(".gz") else open)(path, "rt")))
head = rows_csv[1]
rows = [dict(zip(head, r)) for r in rows_csv[2:] if len(r) == len(head)]
stalls = [k for k in head if k.startswith("stall_") and "Not Issued" not in k]
addr = {int(x["Address"], 16): i for i, x in enumerate(rows)}
hmma = [i for i, x in enumerate(rows) if "HMMA" in x["Source"]]
loops = []
for i, x in enumerate(rows):
    m = re.search(r"BRA\s+(0x[0-9a-f]+)", x["Source"])
    if m and int(m.group(1), 16) in addr:
        t = addr[int(m.group(1), 16)]
        if t < hmma[0] and i > hmma[-1]:
            loops.append((t, i))
lo, hi = min(loops, key=lambda p: p[1] - p[0])


def total(a, b, key):
    return sum(int(x[key] or 0) for x in rows[a:b])


samples = "Warp Stall Sampling (All Samples)"
all_s = total(0, len(rows), samples)
print(f"stall samples {all_s}: set-up {total(0, lo, samples)}, decode loop {total(lo, hi + 1, samples)}, "
      f"combine + store {total(hi + 1, len(rows), samples)}")
by_reason = collections.Counter()
for x in rows[lo:hi + 1]:
    for k in stalls:
        by_reason[k] += int(x[k] or 0)
n = sum(by_reason.values())
print("\ndecode loop, stall reasons (share of its samples):")
for k, v in by_reason.most_common():
    if v:
        print(f"  {k[6:]:20s} {100 * v / n:5.1f}%")
ops, ops_s = collections.Counter(), collections.Counter()
for x in rows[lo:hi + 1]:
    op = re.sub(r"^@!?U?P\w+\s+", "", x["Source"].strip()).split()[0].split(".")[0]
    ops[op] += int(x["Instructions Executed"] or 0)
    ops_s[op] += int(x[samples] or 0)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 0
tot = sum(ops.values())
print(f"\ndecode loop: {tot} warp instructions executed" + (f", {tot / steps:.0f} a 32-cell warp step" if steps else ""))
for k, v in ops.most_common(24):
    print(f"  {k:8s} {v / steps if steps else v:8.1f} {100 * v / tot:5.1f}%   stall samples {ops_s[k]}")
