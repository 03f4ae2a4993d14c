#!/usr/bin/env python3
"""Draws million.sh's samples.csv as an SVG: RSS per process kind, and the kernel's TCP sockets in
use and slab memory, over the run's time.

    benches/scripts/million-plot.py OUT_DIR      (writes OUT_DIR/samples.svg)
"""
import csv
import sys

out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/samples.csv")))
kinds = ["gate", "logic", "redis", "loadgen"]
colors = {"gate": "#1f77b4", "logic": "#d62728", "redis": "#2ca02c", "loadgen": "#9467bd",
          "sockets": "#ff7f0e", "slab": "#8c564b"}
series = {k: [(int(r["t_s"]), int(r["rss_kib"]) / 1024) for r in rows if r["kind"] == k] for k in kinds}
gate_rows = [r for r in rows if r["kind"] == "gate"]
sockets = [(int(r["t_s"]), int(r["tcp_inuse"]) / 1e6) for r in gate_rows]
slab = [(int(r["t_s"]), int(r["slab_kib"]) / 1048576) for r in gate_rows]
W, H, L, R, T, B = 760, 250, 70, 20, 30, 40


def nice(v):
    """A round upper bound for an axis."""
    if v <= 0:
        return 1
    m = 10 ** (len(str(int(v))) - 1) if v >= 1 else 0.1
    for f in (1, 2, 2.5, 5, 10):
        if f * m >= v:
            return f * m
    return 10 * m


def panel(y0, title, unit, lines):
    tmax = max((t for pts in lines.values() for t, _ in pts), default=1) or 1
    vmax = nice(max((v for pts in lines.values() for _, v in pts), default=1))
    ph = H - T - B
    s = [f'<text x="{L}" y="{y0 + 18}" font-size="13" font-weight="bold">{title}</text>']
    s.append(f'<rect x="{L}" y="{y0 + T}" width="{W - L - R}" height="{ph}" fill="none" stroke="#999"/>')
    for i in range(5):
        v = vmax * i / 4
        y = y0 + T + ph - ph * i / 4
        s.append(f'<text x="{L - 6}" y="{y + 4}" font-size="11" text-anchor="end">{v:g} {unit}</text>')
        s.append(f'<line x1="{L}" x2="{W - R}" y1="{y}" y2="{y}" stroke="#eee"/>')
    for i in range(6):
        t = tmax * i / 5
        x = L + (W - L - R) * i / 5
        s.append(f'<text x="{x}" y="{y0 + T + ph + 16}" font-size="11" text-anchor="middle">{t:.0f} s</text>')
    lx = L + 200
    for name, pts in lines.items():
        if not pts:
            continue
        p = " ".join(f"{L + (W - L - R) * t / tmax:.1f},{y0 + T + ph - ph * v / vmax:.1f}" for t, v in pts)
        s.append(f'<polyline fill="none" stroke="{colors[name]}" stroke-width="2" points="{p}"/>')
        s.append(f'<text x="{lx}" y="{y0 + 18}" font-size="12" fill="{colors[name]}">■ {name}</text>')
        lx += 80
    return s


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" font-family="sans-serif">',
       f'<rect width="{W}" height="{2 * H}" fill="white"/>']
svg += panel(0, "RSS by process kind (sum)", "MiB", series)
svg += panel(H, "Kernel: TCP sockets in use (M) and slab (GiB)", "", {"sockets": sockets, "slab": slab})
svg.append("</svg>")
open(f"{out}/samples.svg", "w").write("\n".join(svg) + "\n")
print(f"{out}/samples.svg")
