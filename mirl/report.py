"""Plots of a run's metrics (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path


def plot_preference_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Chosen and rejected log-probs of a fixed set of pairs, and the margin, over steps; one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("probe/chosen_logps", "chosen log-prob (fixed pairs)"),
            ("probe/rejected_logps", "rejected log-prob (fixed pairs)"),
            ("rewards/margins", "margin T_w - T_l (batch mean)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, (key, label) in zip(axes, keys):
        for name, hist in histories.items():
            pts = [(h["step"], h[key]) for h in hist if key in h]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
