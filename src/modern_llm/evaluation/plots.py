"""Shared matplotlib figures (Agg backend, PNG): loss curves from one or more runs' metrics.csv."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path, title: str = "") -> Path:
    """Plot train/loss (solid) and eval/loss (dashed, markers) per run label; returns the PNG path."""
    from modern_llm.utils.logging import read_metrics

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, path) in enumerate(runs.items()):
        rows = read_metrics(path)
        color = f"C{i}"
        xs, ys = _series(rows, "train/loss")
        if xs:
            ax.plot(xs, ys, color=color, label=f"{label} train")
        xs, ys = _series(rows, "eval/loss")
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", label=f"{label} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
