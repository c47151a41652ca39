"""Print, as JSON, the GEMV tiles with the best geometric-mean time at M = 1 over the layers of
a ``bench_w4a16.py --sweep gemv`` results.json (argument 1)."""

import json
import math
import sys

rows = [r for r in json.load(open(sys.argv[1]))["layers"] if r["M"] == 1 and r.get("gemv_sweep")]
if not rows:
    sys.exit(f"{sys.argv[1]} has no GEMV sweep at M = 1: run bench_w4a16.py with --sweep gemv --ms 1")
common = set.intersection(*(set(r["gemv_sweep"]) for r in rows))
best = min(common, key=lambda cfg: sum(math.log(r["gemv_sweep"][cfg]) for r in rows))
print(best)
