"""The run's picture: training loss and evaluation loss over steps, and the DRAM hit rate."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def plot_run(summary: dict[str, Any], path: str) -> None:
    """Write a PNG of ``summary`` (from :func:`tierstore.train.loop.run`) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
    tl = summary["train_loss"]
    steps, losses = [p["step"] for p in tl], [p["loss"] for p in tl]
    ax.plot(steps, losses, lw=0.6, alpha=0.4, color="tab:blue", label="train loss (one batch)")
    k = max(1, len(losses) // 40)
    if k > 1:  # the trend: mean over k logged batches
        kernel = np.ones(k) / k
        ax.plot(steps[k - 1:], np.convolve(losses, kernel, mode="valid"), lw=1.5,
                color="tab:blue", label=f"train loss (mean of {k})")
    ev = summary["eval"]
    ax.plot([p["step"] for p in ev], [p["logloss"] for p in ev], "o-", color="tab:orange",
            label="eval log loss")
    planted = summary.get("planted")
    if planted:
        ax.axhline(planted["logloss"], color="gray", ls="--", lw=1,
                   label=f"planted model ({planted['logloss']:.4f})")
    ax.set_ylabel("log loss")
    ax.set_title(f"{summary['model']} on {summary['data']}, backend {summary['backend']}: "
                 f"NE {summary['ne']:.4f}, AUC {summary['auc']:.4f}", fontsize=9)
    ax.legend(fontsize=8)
    hr = [p for p in summary.get("hit_rate_log", []) if p["hit_rate"] is not None]
    if hr:
        bx.plot([p["step"] for p in hr], [p["hit_rate"] for p in hr], color="tab:green", lw=1)
        bx.set_ylim(0, 1.02)
    bx.set_ylabel(f"DRAM hit rate\n(DRAM {summary['dram_fraction']:.0%} of rows)", fontsize=8)
    bx.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
