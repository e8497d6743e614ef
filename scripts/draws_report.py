"""The table and plot of scripts/calibration_draws.py's rows: error rates of calibration per model, shift, target, N.

    python scripts/draws_report.py docs/calibration/draws/*.json --plot docs/calibration/draws.png

One table row per (model, shift, target, N, config), over its draws: the mean and the worst held-out PSNR, the worst
margin to evenly spaced caching at the same NFE (the non-waivable goal: >= -0.25 dB), the mean gap to the best
candidate, how often the choice is not that best, the coverage of the stated 80 % interval (draws that state one),
and the calibration's cost in generations of the set.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any


def cells(paths: list[str]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            out[(r["model"], r["shift"], r["target"], r["N"], r["config"])].append(r)
    return out


def covered(r: dict[str, Any]) -> bool | None:
    """Whether the stated 80 % interval of a draw that kept a set (not the evenly spaced one) holds its held-out
    gain over evenly spaced caching."""
    claim = r.get("stated")
    if not claim or (r["selected"] == "uniform" and r["variant"] == "plain"):
        return None
    return bool(claim["interval_db"][0] <= r["heldout_gain_db"] <= claim["interval_db"][1])


def table(groups: dict[tuple[Any, ...], list[dict[str, Any]]]) -> str:
    lines = ["| model | shift | target | N | config | draws | mean PSNR | worst PSNR | worst vs evenly spaced | "
             "mean gap to best | not best | covered | generations |", "|" + "---|" * 13]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[4] != "default", k[3])):
        rows = groups[key]
        claims = [covered(r) for r in rows if covered(r) is not None]
        cost = [r["generations"] for r in rows if r.get("generations") is not None]
        lines.append(
            f"| {key[0]} | {key[1]:g} | {key[2]:g}x | {key[3]} | {key[4]} | {len(rows)} | "
            f"{mean(r['psnr'] for r in rows):.2f} | {min(r['psnr'] for r in rows):.2f} | "
            f"{min(r['psnr'] - r['uniform_psnr'] for r in rows):+.2f} | {mean(r['gap_db'] for r in rows):.2f} | "
            f"{sum(not r['chose_best'] for r in rows)}/{len(rows)} | "
            f"{f'{sum(claims)}/{len(claims)}' if claims else '-'} | {f'{mean(cost):.2f}' if cost else '-'} |")
    return "\n".join(lines)


def plot(groups: dict[tuple[Any, ...], list[dict[str, Any]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[Any, ...], list[tuple[int, float, float]]] = defaultdict(list)
    for (model, shift, target, n, config), rows in groups.items():
        if config == "default":
            series[(model, shift, target)].append((n, mean(r["gap_db"] for r in rows),
                                                   min(r["psnr"] - r["uniform_psnr"] for r in rows)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, pts in sorted(series.items()):
        pts.sort()
        label = f"{key[0]}, shift {key[1]:g}, {key[2]:g}x"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    sizes = sorted({n for pts in series.values() for n, _, _ in pts})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
    axes[0].axhline(1.0, color="gray", ls="--", lw=1)
    axes[1].axhline(-0.25, color="gray", ls="--", lw=1)
    axes[0].set(xlabel="calibration samples N", ylabel="mean gap to the best candidate (dB)")
    axes[1].set(xlabel="calibration samples N", ylabel="worst draw minus evenly spaced (dB)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    groups = cells(args.files)
    print(table(groups))
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
