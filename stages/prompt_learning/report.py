"""Loss-curve PNG (matplotlib, Agg backend) written atomically next to the logs."""
from __future__ import annotations

from pathlib import Path

from stages.common.io import atomic_path


def write_loss_curve(path: str | Path, history: dict[str, list[list[float]]], title: str = "prompt learning") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = history.get("train") or []
    val = history.get("val") or []
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", alpha=0.6)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)
