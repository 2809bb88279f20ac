# per-kernel GPU time from ncu's CSV (gpu__time_duration.sum), summed by kernel name: python3 ncu_sum.py FILE.csv
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    v = float(r[vi].replace(",", "")); v = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r[ui]] * v
    name = r[ki].split("(")[0].split("<")[0][:40]
    tot[name][0] += 1; tot[name][1] += v
print(sys.argv[1], "total us", round(sum(t[1] for t in tot.values()), 1))
for k, (n, t) in sorted(tot.items(), key=lambda x: -x[1][1]):
    print(f"  {k:42s} {n:4d} x {t/n:7.2f} us = {t:8.1f}")
