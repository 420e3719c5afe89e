#!/usr/bin/env python3
"""Prints the last `cargo bench --bench hot_path` results as a Markdown table (median, 95% CI).

Usage: python3 benches/criterion_table.py [target/criterion]
"""

import json
import pathlib
import sys


def human(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    print("| benchmark | median | 95% CI |")
    print("|---|---:|---|")
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())["median"]
        ci = est["confidence_interval"]
        print(
            f"| {meta['full_id']} | {human(est['point_estimate'])} "
            f"| {human(ci['lower_bound'])} – {human(ci['upper_bound'])} |"
        )


if __name__ == "__main__":
    main()
