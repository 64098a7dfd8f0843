#!/usr/bin/env python3
"""Draws bench/run's latency curve as an SVG: achieved throughput and p50/p99 latency against
offered load, one line per server (metapass, the bare server, nginx).

usage: curve.py RESULTS OUT.svg

Reads the "curve ..." rows of RESULTS (fields: server, offered, requests, duration_us, p50_us,
p99_us). Plain SVG written by hand on purpose: no plotting library to install on a bench machine.
"""

import json
import math
import sys
from xml.sax.saxutils import escape

COLOURS = {"metapass": "#c0392b", "bare": "#2c3e50", "nginx": "#27ae60"}
W, H = 980, 420
PANEL_W, PANEL_H = 400, 300
LEFT, TOP = 70, 50


def rps(r):
    return r["requests"] * 1e6 / r["duration_us"]


def log_ticks(lo, hi):
    ticks, decade = [], 10 ** math.floor(math.log10(lo))
    while decade <= hi * 10:
        for m in (1, 2, 5):
            v = m * decade
            if lo <= v <= hi:
                ticks.append(v)
        decade *= 10
    return ticks


def label(v):
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def panel(x0, title, xlabel, ylabel, series, x_range, y_range, diagonal=False):
    """One chart, both axes logarithmic: series is [(name, dash, [(x, y), ...])]; `diagonal`
    draws y = x."""
    out = []
    (xl, xh), (yl, yh) = x_range, y_range

    def sx(x):
        return x0 + (math.log10(x) - math.log10(xl)) / (math.log10(xh) - math.log10(xl)) * PANEL_W

    def sy(y):
        f = (math.log10(y) - math.log10(yl)) / (math.log10(yh) - math.log10(yl))
        return TOP + PANEL_H - f * PANEL_H

    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 18}" text-anchor="middle" '
               f'font-weight="bold">{escape(title)}</text>')
    out.append(f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
               'stroke="#999"/>')
    for t in log_ticks(xl, xh):
        out.append(f'<line x1="{sx(t):.1f}" y1="{TOP}" x2="{sx(t):.1f}" y2="{TOP + PANEL_H}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle" '
                   f'font-size="11">{label(t)}</text>')
    for t in log_ticks(yl, yh):
        out.append(f'<line x1="{x0}" y1="{sy(t):.1f}" x2="{x0 + PANEL_W}" y2="{sy(t):.1f}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" '
                   f'font-size="11">{label(round(t, 2))}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 36}" text-anchor="middle" '
               f'font-size="12">{escape(xlabel)}</text>')
    out.append(f'<text x="{x0 - 50}" y="{TOP + PANEL_H / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 {x0 - 50} {TOP + PANEL_H / 2})">{escape(ylabel)}</text>')
    if diagonal:
        lo, hi = max(xl, yl), min(xh, yh)
        out.append(f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
                   'stroke="#888" stroke-dasharray="1,4"/>')
    for name, dash, points in series:
        pts = [(x, y) for x, y in points if xl <= x <= xh and yl <= y <= yh]
        if not pts:
            continue
        colour = COLOURS[name.split()[0]]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
    return out


def main():
    results, target = sys.argv[1:3]
    rows = [json.loads(line) for line in open(results) if line.strip()]
    curve = [r for r in rows if r["name"].startswith("curve ") and r.get("duration_us")]
    if not curve:
        sys.exit("curve.py: no curve rows in " + results)
    servers = [s for s in ("metapass", "bare", "nginx") if any(r["server"] == s for r in curve)]
    by_server = {s: sorted((r for r in curve if r["server"] == s), key=lambda r: r["offered"])
                 for s in servers}
    offered = [r["offered"] for r in curve]
    x_range = (min(offered) * 0.8, max(offered) * 1.25)
    tput = [(s, "", [(r["offered"], rps(r)) for r in by_server[s]]) for s in servers]
    achieved = [y for _, _, pts in tput for _, y in pts]
    lat = []
    for s in servers:
        # Floors at 10 µs: a log axis has no zero.
        lat.append((f"{s} p50", "", [(r["offered"], max(r["p50_us"], 10) / 1000)
                                     for r in by_server[s]]))
        lat.append((f"{s} p99", "6,3", [(r["offered"], max(r["p99_us"], 10) / 1000)
                                        for r in by_server[s]]))
    lat_values = [y for _, _, pts in lat for _, y in pts]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    y_range = (min(achieved) * 0.8, max(max(achieved), x_range[1]) * 1.1)
    svg += panel(LEFT, "Achieved throughput (dotted: all of the offered load)",
                 "offered load (req/s, log)", "achieved (req/s, log)",
                 tput, x_range, y_range, diagonal=True)
    svg += panel(LEFT + PANEL_W + 100, "Latency (solid p50, dashed p99)",
                 "offered load (req/s, log)", "latency (ms, log)", lat, x_range,
                 (min(lat_values) * 0.8, max(lat_values) * 1.25))
    y = TOP + PANEL_H + 60
    x = LEFT
    for s in servers:
        svg.append(f'<rect x="{x}" y="{y - 10}" width="14" height="4" fill="{COLOURS[s]}"/>')
        svg.append(f'<text x="{x + 20}" y="{y - 4}">{escape(s)}</text>')
        x += 110
    svg.append(f'<text x="{x + 20}" y="{y - 4}" font-size="11">each point: one wrk run, '
               'exponential pauses after each answer (bench/run)</text>')
    svg.append("</svg>")
    with open(target, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
