"""The lottery comparison's report: ``comparison.md`` and plots (PNG and SVG) of a comparison folder."""

from __future__ import annotations

import os

from graspext._io import write_text
from graspext.lottery.compare import comparison_table, format_comparison
from graspext.report import _pyplot, _save


def lottery_report(out_dir: str, report_dir: str | None = None) -> list[str]:
    """Writes ``comparison.md`` and the plots: accuracy against sparsity per method, IMP's training time per
    round, and the LT − RR gap with its 95 % interval. Returns the paths written."""
    table = comparison_table(out_dir)
    report_dir = report_dir or os.path.join(out_dir, "report")
    os.makedirs(report_dir, exist_ok=True)
    markdown = os.path.join(report_dir, "comparison.md")
    write_text(markdown, format_comparison(table))
    paths = [markdown]
    plt = _pyplot()
    rows = [r for r in table["rows"] if r["sparsity"] is not None]

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({m for r in rows for m in r["methods"]}, key=lambda m: (m != "lt", m))
    for m in methods:
        pts = [(100 * r["sparsity"], 100 * r["methods"][m][0], 100 * r["methods"][m][1]) for r in rows
               if m in r["methods"]]
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, linewidth=2 if m in ("lt", "rr") else 1)
    if table["dense"] is not None:
        ax.axhline(100 * table["dense"][0], color="k", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("lottery tickets and their baselines" + ("" if table["complete"] else " (INCOMPLETE)"))
    paths += _save(fig, report_dir, "accuracy_vs_sparsity")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    seconds = {r: [s for s in v if s is not None] for r, v in table["round_seconds"].items()}
    pts = [(100 * (1 - table["densities"][r]), sum(v) / len(v)) for r, v in seconds.items()
           if v and r in table["densities"]]
    if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o")
    ax.set_xlabel("sparsity of the round (%)")
    ax.set_ylabel("training time per round (s)")
    ax.set_title("IMP: time per round")
    paths += _save(fig, report_dir, "time_per_round")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    gaps = [(100 * r["sparsity"], 100 * r["lt_minus_rr"][0], 100 * r["lt_minus_rr"][1], 100 * r["lt_minus_rr"][2])
            for r in rows if "lt_minus_rr" in r]
    if gaps:
        xs, ys = [g[0] for g in gaps], [g[1] for g in gaps]
        finite = [(x, y, a, b) for x, y, a, b in gaps if abs(a) != float("inf")]
        ax.plot(xs, ys, marker="o", label="LT − RR (mean over seeds)")
        if finite:
            fx, _, flo, fhi = zip(*finite)
            ax.fill_between(fx, flo, fhi, alpha=0.25, label="95 % interval")
    ax.axhline(0, color="k", linewidth=1)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("accuracy gap (points)")
    ax.legend(fontsize=7)
    ax.set_title("lottery ticket against random re-initialisation")
    paths += _save(fig, report_dir, "lt_minus_rr")
    plt.close(fig)
    return paths
