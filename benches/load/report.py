#!/usr/bin/env python3
"""Turns run.sh's measurements into the Markdown report (tables, ratios, targets).

Usage: report.py WRK.tsv LATENCY.tsv HEADER.md   (prints Markdown on stdout)
WRK.tsv: target case status wrk_requests wrk_rps wrk_p50_us wrk_p99_us wrk_cpu_s (one run each)
LATENCY.tsv: target case round sent p50_us p99_us p999_us cpu_s late errors (one row per round)
"""

import csv
import statistics
import sys

TARGETS = ["direct", "portcullis", "nginx", "haproxy"]
NAMES = {"direct": "direct", "portcullis": "portcullis", "nginx": "nginx", "haproxy": "HAProxy"}
CASES = [("allow", "allowed (200)"), ("401", "unknown key (401)"), ("403", "forbidden (403)")]


def read(path):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        for key, value in row.items():
            if key not in ("target", "case", "status"):
                row[key] = float(value)
    return rows


def combine(rounds):
    """One latency row from the rounds: median percentiles, summed CPU and requests."""
    return {
        "p50": statistics.median(r["p50_us"] for r in rounds),
        "p99": statistics.median(r["p99_us"] for r in rounds),
        "p99_min": min(r["p99_us"] for r in rounds),
        "p99_max": max(r["p99_us"] for r in rounds),
        "p999": statistics.median(r["p999_us"] for r in rounds),
        "cpu_us": sum(r["cpu_s"] for r in rounds) / sum(r["sent"] for r in rounds) * 1e6,
        "errors": sum(r["errors"] for r in rounds),
    }


def main():
    wrk = {(r["target"], r["case"]): r for r in read(sys.argv[1])}
    grouped = {}
    for r in read(sys.argv[2]):
        grouped.setdefault((r["target"], r["case"]), []).append(r)
    lat = {key: combine(rounds) for key, rounds in grouped.items()}
    with open(sys.argv[3], encoding="utf-8") as f:
        print(f.read().rstrip())
    print()
    direct = lat.get(("direct", "allow"))
    for case, title in CASES:
        print(f"### {title}\n")
        print(
            "| target | status | wrk req/s | wrk p50 | wrk p99 | CPU µs/req (wrk) "
            "| fixed-rate p50 | p99 (range over rounds) | p99.9 | p99 added over direct (allowed) | CPU µs/req (fixed rate) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for target in TARGETS:
            key = (target, case) if (target, case) in wrk else (target, "allow")
            if key not in wrk or (target != "direct" and key[1] != case):
                continue
            w, l = wrk[key], lat.get(key)
            label = NAMES[target] if key[1] == case else "direct (backend's 200, reference)"
            cpu_wrk = w["wrk_cpu_s"] / w["wrk_requests"] * 1e6
            cells = [label, w["status"], f"{w['wrk_rps']:,.0f}", f"{w['wrk_p50_us']:.0f}",
                     f"{w['wrk_p99_us']:.0f}", f"{cpu_wrk:.1f}"]
            if l:
                added = ""
                if direct and target != "direct" and case == "allow":
                    added = f"{l['p99'] - direct['p99']:+.0f}"
                cells += [f"{l['p50']:.0f}", f"{l['p99']:.0f} ({l['p99_min']:.0f}–{l['p99_max']:.0f})",
                          f"{l['p999']:.0f}", added, f"{l['cpu_us']:.1f}"]
            print("| " + " | ".join(cells) + " |")
        print()
    ratios(wrk, lat, direct)


def ratios(wrk, lat, direct):
    if ("portcullis", "allow") not in wrk:
        return
    print("### Ratios and targets (allowed request)\n")
    print("| measure | portcullis | nginx | HAProxy | portcullis/nginx | portcullis/HAProxy | target | met |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    measures = [
        ("CPU µs per request, wrk (proxy saturated or nearly)",
         lambda t: wrk[(t, "allow")]["wrk_cpu_s"] / wrk[(t, "allow")]["wrk_requests"] * 1e6,
         "≤ 0.7 × nginx", lambda p, n: p <= 0.7 * n),
        ("CPU µs per request, fixed rate", lambda t: lat[(t, "allow")]["cpu_us"], None, None),
    ]
    if direct:
        measures += [
            ("p99 µs added over direct, fixed rate",
             lambda t: lat[(t, "allow")]["p99"] - direct["p99"], "≤ nginx", lambda p, n: p <= n),
            ("p50 µs added over direct, fixed rate",
             lambda t: lat[(t, "allow")]["p50"] - direct["p50"], None, None),
        ]
    for name, value, target_text, check in measures:
        vals = {}
        for t in ("portcullis", "nginx", "haproxy"):
            try:
                vals[t] = value(t)
            except KeyError:
                vals[t] = None
        p, n, h = vals["portcullis"], vals["nginx"], vals["haproxy"]
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "–"
        fmt = lambda v: "" if v is None else f"{v:.1f}"
        met = ("yes" if check(p, n) else "no") if check and n is not None else ""
        print(f"| {name} | {fmt(p)} | {fmt(n)} | {fmt(h)} | {ratio(p, n)} | {ratio(p, h)} "
              f"| {target_text or ''} | {met} |")
    print()


if __name__ == "__main__":
    main()
