"""What the three experiments share: seeds, mean and spread over seeds, curve plots, the JSON + table files."""

from __future__ import annotations

import json
import math
from pathlib import Path


def parse_seeds(seeds: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a bad entry names itself."""
    out = []
    for s in seeds.split(","):
        s = s.strip()
        if not s:
            continue
        try:
            out.append(int(s))
        except ValueError as e:
            raise ValueError(f"--seeds must be comma-separated integers, got {s!r}") from e
    if not out:
        raise ValueError("--seeds is empty")
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs ignored."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (std / sqrt(n); 0 for one value)."""
    m, sd = mean_std(values)
    n = len([v for v in values if v == v])
    return m, sd / math.sqrt(n) if n else float("nan")


def curve_stats(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per-index mean and std over seeds' curves of equal length."""
    n = min(len(c) for c in curves)
    pairs = [mean_std([c[i] for c in curves]) for i in range(n)]
    return [m for m, _ in pairs], [s for _, s in pairs]


def fmt(m: float, s: float | None = None, digits: int = 2) -> str:
    """'1.23 ± 0.04' (the spread is the std over seeds)."""
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:+.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table from a header and rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curve_grid(panels: list[dict], path: Path, ncols: int, title: str = "") -> Path:
    """panels: [{'title', 'xlabel', 'lines': {label: (x, mean, std)}, 'hline', 'logy'}] -> one PNG, mean lines
    with a +-std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, (x, m, s) in panel["lines"].items():
            (line,) = ax.plot(x, m, label=label, lw=1.4)
            lo = [a - b for a, b in zip(m, s)]
            hi = [a + b for a, b in zip(m, s)]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel.get("xlabel", "step"), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="k", lw=0.6, ls=":")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out: Path, name: str, numbers: dict, table: str, pngs: list[Path]) -> dict:
    """<out>/results.json (every number), <out>/summary.md (the table and the plots' names). -> paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(numbers, indent=1, default=float))
    md = f"# mirl experiment {name}\n\n{table}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    (out / "summary.md").write_text(md)
    return {"json": str(out / "results.json"), "table": str(out / "summary.md"), "plots": [str(p) for p in pngs]}


def cached_sft(sft_cfg) -> Path:
    """Train sft_cfg once; reuse <out_dir>/final while the config is unchanged. -> the model folder."""
    from dataclasses import asdict

    from ..logging import console
    from ..recipes import sft

    out = Path(sft_cfg.out_dir)
    key_file, final = out / "cache_key.json", out / "final"
    key = json.dumps(asdict(sft_cfg), sort_keys=True)
    if final.exists() and key_file.exists() and key_file.read_text() == key:
        console.print(f"[green]using cached SFT model {final}[/] (same config; delete the folder to retrain)")
        return final
    sft.train(sft_cfg)
    key_file.write_text(key)
    return final
