#!/usr/bin/env python3
"""Paired comparison of two configurations of an eval grid, on the samples both have:
mean difference ×100, 95% percentile bootstrap interval (2000 resamples, fixed seed)
and wins/losses/ties. The report (`kvmerger eval report`) compares each configuration
with the full cache and the best other; this compares any two.

    python3 scripts/paired.py docs/results/test-qwen-agnostic kvmerger@0.5 h2o@0.5
"""
import collections
import json
import random
import sys
from pathlib import Path

if len(sys.argv) != 4:
    sys.exit(__doc__)
directory, a, b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
scores = collections.defaultdict(dict)
for f in sorted(directory.glob("samples*.jsonl")):
    for line in f.open():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("score") is not None:
            scores[r["config"]][(r["task"], r["length"], r["index"])] = r["score"]
for c in (a, b):
    if c not in scores:
        sys.exit(f"no scored records for '{c}' in {directory}; configurations: {', '.join(sorted(scores))}")
keys = sorted(set(scores[a]) & set(scores[b]))
if not keys:
    sys.exit(f"'{a}' and '{b}' share no sample")
d = [scores[a][k] - scores[b][k] for k in keys]
n = len(d)
rng = random.Random(7)
boot = sorted(sum(rng.choice(d) for _ in range(n)) / n for _ in range(2000))
wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
lo, hi = 100 * boot[50], 100 * boot[1949]
verdict = "tie" if lo <= 0 <= hi else ("better" if lo > 0 else "worse")
print(f"{a} - {b}: {100 * sum(d) / n:+.1f} [{lo:+.1f}, {hi:+.1f}] over {n} samples, "
      f"{wins} wins / {losses} losses / {n - wins - losses} ties: {verdict}")
