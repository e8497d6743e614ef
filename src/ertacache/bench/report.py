"""The benchmark's outputs: a markdown table, PSNR-vs-speedup curves and an image grid near 2x."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write, atomic_write_text


def _fmt(v: Any, spec: str, reference: bool = True) -> str:
    """A score, "ref" for the uncached reference itself, "identical" for a method whose output equals it (it
    cached nothing on this model: a result to read as such, not as infinite fidelity)."""
    if v is None:
        return "ref" if reference else "identical"
    return format(v, spec)


def markdown(rows: list[dict[str, Any]], header: dict[str, Any], costs: list[dict[str, Any]] | None = None) -> str:
    lines = ["# ertacache bench", ""]
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in header.items()]
    for group, title in (("speed", "Speed and fidelity (held-out seeds)"),
                         ("ablation", "Component ablation at 2x (the paper's Table 3)"),
                         ("option", "Options of docs/method.md at 2x")):
        part = [r for r in rows if r["group"] == group or (group != "speed" and r["method"] == "none")]
        if len(part) <= 1 and group != "speed":
            continue
        video = any(r.get("psnr_last_frame") is not None for r in part)
        last_head, last_rule = (" last-frame PSNR |", "---|") if video else ("", "")
        lines += ["", f"## {title}", "", "| method | setting | NFE | seconds | speedup | PSNR (dB) | SSIM |"
                  f"{last_head} LPIPS | CLIP | peak mem (MB) |",
                  f"|---|---|---|---|---|---|---|{last_rule}---|---|---|"]
        for r in part:
            lpips = "n/a" if r["lpips"] is None else f"{r['lpips']:.4f}"
            clip = "n/a" if r.get("clip") is None else f"{r['clip']:.4f}"
            mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
            ref = r["method"] == "none"
            last = f" {_fmt(r.get('psnr_last_frame'), '.2f', ref)} |" if video else ""
            lines.append(f"| {r['method']} | {r['setting']} | {r['nfe']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
                         f"{_fmt(r['psnr'], '.2f', ref)} | {r['ssim']:.4f} |{last} {lpips} | {clip} | {mem} |")
    if costs:
        lines += ["", "## Cost of a cached step (same batch, median)", "",
                  "| reuse | computed step (ms) | cached step (ms) | cached / computed | rectification / computed |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['reuse']} | {c['computed_ms']:.2f} | {c['cached_rectified_ms']:.3f} | "
                  f"{100 * c['cached_rectified_fraction']:.2f}% | "
                  f"{100 * c['rectification_overhead_of_computed']:.3f}% |" for c in costs]
    failed = [r for r in rows if r["group"] == "failed"]
    if failed:
        lines += ["", "## Could not run on this model", ""]
        lines += [f"- {r['method']} ({r['setting']}): {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def nearest_2x(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method of the speed curves, the setting whose speedup is nearest 2x (the reference first)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["group"] != "speed" or r["method"] == "none":
            continue
        if r["method"] not in best or abs(r["speedup"] - 2) < abs(best[r["method"]]["speedup"] - 2):
            best[r["method"]] = r
    return [rows[0], *best.values()]


def plot(rows: list[dict[str, Any]], path: Path, header: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows if r["group"] == "speed") if m != "none"]
    for name in methods:
        pts = sorted((r["speedup"], r["psnr"]) for r in rows if r["method"] == name and r["psnr"] is not None)
        if pts:
            style = dict(linewidth=2.5, color="black") if name == "ertacache" else dict(linewidth=1.2)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)  # type: ignore[arg-type]
    ax.axvspan(1.5, 3.0, color="0.93", zorder=0)
    ax.set_xlabel("wall-clock speedup over uncached (same run)")
    ax.set_ylabel("PSNR against uncached (dB)")
    ax.set_title(f"held-out seeds, {str(header.get('model', 'bundled model')).split(' (')[0]}; "
                 f"{header.get('protocol', '').split(';')[0]}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, f"{header['command']} | {header['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _picture(x: Any) -> Any:
    """One sample as an ``imshow`` array: RGB ``(H, W, 3)`` from 3+ channels, else channel 0 in grey;
    a video shows its middle frame."""
    if x.ndim == 4:  # (C, F, H, W)
        x = x[:, x.shape[1] // 2]
    x = ((x.clamp(-1, 1) + 1) / 2).float()
    return x[:3].permute(1, 2, 0).numpy() if x.shape[0] >= 3 else x[0].numpy()


def image_grid(rows: list[dict[str, Any]], path: Path, header: dict[str, Any], columns: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = nearest_2x(rows)
    columns = min(columns, int(chosen[0]["_output"].shape[0]))
    fig, axes = plt.subplots(len(chosen), columns, figsize=(columns * 0.85, len(chosen) * 0.95 + 0.4),
                             squeeze=False)
    for i, r in enumerate(chosen):
        for c in range(columns):
            ax = axes[i][c]
            ax.imshow(_picture(r["_output"][c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        label = "uncached" if r["method"] == "none" else f"{r['method']}\n{r['speedup']:.2f}x"
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.text(0.01, 0.005, f"{header['command']} | {header['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(docs_dir: Path, rows: list[dict[str, Any]], header: dict[str, Any],
                 costs: list[dict[str, Any]] | None = None) -> None:
    """Write ``results.md``, ``results.json``, ``psnr_vs_speedup.png`` and ``grid_2x.png`` under ``docs_dir``."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs_dir / "results.md", markdown(rows, header, costs))
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    doc = {"header": header, "rows": clean, "step_costs": costs or []}
    atomic_write_text(docs_dir / "results.json", json.dumps(doc, indent=2) + "\n")
    plot(rows, docs_dir / "psnr_vs_speedup.png", header)
    image_grid(rows, docs_dir / "grid_2x.png", header)
