"""Tables (and the N-curve plot) of docs/calibration.md from scripts/calibration_grid.py's JSON files.

    python scripts/calibration_tables.py --compare docs/calibration/grid_digits_default.json \
        docs/calibration/grid_digits_thorough.json ... --ncurve docs/calibration/ncurve_digits.json ... \
        --plot docs/calibration/ncurve.png

Prints markdown: for each model, shift and target the default's and the other config's
held-out PSNR and cost, the monotonicity check (a larger budget's policy against the
smaller budgets' and against evenly spaced computation at its own NFE), and the
held-out PSNR against the calibration size N.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

TOLERANCE_DB = 0.25


def load(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return list(json.load(f)["rows"])


def compare(rows: list[dict[str, Any]]) -> str:
    by = defaultdict(dict)
    for r in rows:
        by[(r["model"], r["shift"], r["N"], r["target"])][r["config"]] = r
    configs = sorted({r["config"] for r in rows}, key=lambda c: (c != "default", c))
    head = "| model | shift | N | target | " + " | ".join(
        f"{c}: NFE, PSNR (dB), generations" for c in configs) + " | default - " + configs[-1] + " (dB) |"
    lines = [head, "|" + "---|" * (5 + len(configs))]
    for key in sorted(by):
        cells = []
        for c in configs:
            r = by[key].get(c)
            cells.append("-" if r is None else f"{r['nfe']}, {r['psnr']:.2f}, {r['generations']}")
        d = by[key]
        diff = (f"{d['default']['psnr'] - d[configs[-1]]['psnr']:+.2f}"
                if "default" in d and configs[-1] in d and configs[-1] != "default" else "-")
        lines.append(f"| {key[0]} | {key[1]:g} | {key[2]} | {key[3]:g}x | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def monotone(rows: list[dict[str, Any]]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["config"], r["shift"], r["N"])].append(r)
    lines = ["| model | config | shift | N | NFE: PSNR (uniform at that NFE) | larger budget never below a smaller | "
             "never below uniform |", "|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        g = sorted(groups[key], key=lambda r: -r["nfe"])
        mono = all(g[k]["psnr"] >= g[k + 1]["psnr"] - TOLERANCE_DB for k in range(len(g) - 1))
        above = all(r["psnr"] >= r["uniform_psnr"] - TOLERANCE_DB for r in g)
        cells = ", ".join(f"{r['nfe']}: {r['psnr']:.2f} ({r['uniform_psnr']:.2f})" for r in g)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | {cells} | {'yes' if mono else 'NO'} | "
                     f"{'yes' if above else 'NO'} |")
    return "\n".join(lines)


def ncurve(rows: list[dict[str, Any]], plot: str | None) -> str:
    by = defaultdict(dict)
    for r in rows:
        by[(r["model"], r["shift"], r["target"])][r["N"]] = r
    sizes = sorted({r["N"] for r in rows})
    lines = ["| model | shift | target | " + " | ".join(f"N = {n}" for n in sizes) + " |",
             "|" + "---|" * (3 + len(sizes))]
    for key in sorted(by):
        cells = [f"{by[key][n]['psnr']:.2f}" if n in by[key] else "-" for n in sizes]
        lines.append(f"| {key[0]} | {key[1]:g} | {key[2]:g}x | " + " | ".join(cells) + " |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted(by):
            ns = sorted(by[key])
            ax.plot(ns, [by[key][n]["psnr"] for n in ns], marker="o", label=f"{key[0]}, shift {key[1]:g}, "
                                                                             f"{key[2]:g}x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples N")
        ax.set_ylabel("held-out PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", nargs="*", default=[])
    p.add_argument("--ncurve", nargs="*", default=[])
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    if args.compare:
        rows = [r for path in args.compare for r in load(path)]
        print(compare(rows), end="\n\n")
        print(monotone(rows), end="\n\n")
    if args.ncurve:
        print(ncurve([r for path in args.ncurve for r in load(path)], args.plot))


if __name__ == "__main__":
    main()
