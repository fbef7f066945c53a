#!/usr/bin/env python3
"""Prints the W8A8 GEMM kernel (as `bench --w8a8-gemm` takes it) with the lowest summed time over
the shapes of a `bench --sections linear --json` file, and says on stderr whether it is the
fastest at every shape (the rule for making it the library's default).
Usage: scripts/fastest-w8a8.py bench_linear.json"""
import json
import re
import sys
from collections import defaultdict

rows = json.load(open(sys.argv[1]))["rows"]
times = defaultdict(dict)  # kernel -> shape -> ms
for row in rows:
    match = re.match(r"W8A8 (.+) \(quantise", row["what"])
    if match:
        times[match.group(1)][row["shape"]] = row["ms"]
if not times:
    sys.exit(f"{sys.argv[1]}: no W8A8 rows")
shapes = set.intersection(*(set(by_shape) for by_shape in times.values()))
best = min(times, key=lambda kernel: sum(times[kernel][s] for s in shapes))
everywhere = all(times[best][s] == min(times[k][s] for k in times) for s in shapes)
print(f"{best} has the lowest summed time over {len(shapes)} shapes; "
      f"{'fastest' if everywhere else 'not the fastest'} at every shape", file=sys.stderr)
print(best.replace(" ", "-"))
