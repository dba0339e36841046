"""Plots of a run's metrics (matplotlib, PNG) and a self-contained HTML report.

mirl report --runs runs/arith/grpo,runs/arith/online_mio     # overlays the runs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def plot_preference_curves(
    histories: dict[str, list[dict]], path: str | Path, title: str = "", accuracies: dict[str, float] | None = None
) -> Path:
    """Chosen and rejected log-probs of a fixed set of pairs, and the margin, over steps; one line per method.
    accuracies: a first panel of held-out accuracy bars, one per method (the start included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("probe/chosen_logps", "chosen log-prob (fixed pairs)"),
        ("probe/rejected_logps", "rejected log-prob (fixed pairs)"),
        ("rewards/margins", "margin T_w - T_l (batch mean)"),
    ]
    n = len(keys) + bool(accuracies)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6))
    if accuracies:
        ax, axes = axes[0], axes[1:]
        bars = ax.bar(list(accuracies), list(accuracies.values()), color="#4c72b0")
        ax.bar_label(bars, fmt="%.3f")
        ax.set_ylim(0, 1)
        ax.set_title("held-out greedy accuracy")
        ax.grid(alpha=0.3, axis="y")
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


# ---- run reports: `mirl report RUN_DIR [RUN_DIR ...]` ------------------------------------------------------

REPORT_KEYS = (
    "loss",
    "reward/mean",
    "eval/accuracy",
    "logps/chosen",
    "logps/rejected",
    "rewards/margins",
    "probe/chosen_logps",
    "probe/rejected_logps",
    "kl",
    "entropy",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "completions/mean_length",
    "clip_fraction",
    "mi",
)


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """One PNG per metric that any of the runs logged, the runs overlaid. -> the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logging import read_metrics

    series = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in REPORT_KEYS:
        runs = {name: [(r["step"], r[key]) for r in rows if key in r] for name, rows in series.items()}
        runs = {k: v for k, v in runs.items() if v}
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for name, pts in runs.items():
            ax.plot(*zip(*pts), label=name, marker="o" if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / (key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """PNG plots of the runs' metrics and one self-contained HTML page (images embedded as base64) with
    each run's config and summary. Written to <first run>/report/ unless `out` is given."""
    import base64
    import html
    import json

    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not (d / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{d} is not a run folder (no metrics.jsonl)")
    out = Path(out) if out else dirs[0] / "report"
    pngs = plot_runs(dirs, out)
    parts = [f"<h1>mirl report: {html.escape(', '.join(d.name for d in dirs))}</h1>"]
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">')
    for d in dirs:
        parts.append(_samples_html(d))
        cfg = (d / "config.json").read_text() if (d / "config.json").exists() else "{}"
        try:
            cfg = json.dumps(json.loads(cfg), indent=1)
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / 'config.json'}: invalid JSON in the run's config ({e})") from e
        parts.append(f"<h2>{html.escape(d.name)}: config</h2><pre>{html.escape(cfg)}</pre>")
    page = out / "index.html"
    # the page reports how many of its images decoded (body[data-images-loaded] = "loaded/total"): the
    # headless-browser test reads it
    check = (
        "<script>window.addEventListener('load',function(){var im=Array.from(document.images);"
        "document.body.dataset.imagesLoaded=im.filter(function(i){return i.complete&&i.naturalWidth>0})"
        ".length+'/'+im.length;});</script>"
    )
    page.write_text(
        "<!doctype html><meta charset='utf-8'><title>mirl report</title><style>body{font-family:sans-serif;"
        "margin:2em} img{margin:4px;border:1px solid #ddd} table{border-collapse:collapse;font-size:13px}"
        " td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        " td pre{margin:0;white-space:pre-wrap}</style>" + check + "\n".join(parts)
    )
    return page


def _samples_html(run_dir: Path) -> str:
    """The run's samples.jsonl as HTML tables: the completions sampled during training (--log-completions:
    step, prompt, completion, reward per function, answer) and the greedy held-out ones; '' when there are none."""
    import html
    import json

    f = run_dir / "samples.jsonl"
    if not f.exists():
        return ""
    from .logging import read_jsonl

    rows = read_jsonl(f)

    def cell(v):
        text = v if isinstance(v, str) else json.dumps(v)
        return f"<td><pre>{html.escape(text)}</pre></td>"

    def reward(v):
        return "<td>-</td>" if v is None else f"<td>{float(v):.3f}</td>"

    out = ""
    rollouts = [r for r in rows if r.get("kind") == "rollout"]
    if rollouts:
        names = sorted({k for r in rollouts for k in r.get("rewards", {})})
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(
            f"<tr><td>{r['step']}</td>"
            + cell(r.get("prompt", ""))
            + cell(r.get("completion", ""))
            + reward(r.get("reward"))
            + "".join(reward(r.get("rewards", {}).get(n)) for n in names)
            + cell(r.get("answer") or "")
            + "</tr>"
            for r in rollouts
        )
        out += (
            f"<h2>{html.escape(run_dir.name)}: completions sampled during training</h2><table><tr><th>step</th>"
            f"<th>prompt</th><th>completion</th><th>reward</th>{head}<th>answer</th></tr>{body}</table>"
        )
    held = [r for r in rows if r.get("kind") != "rollout"]
    if held:
        body = "".join(
            "<tr>"
            + cell(r.get("prompt", ""))
            + cell(r.get("completion", ""))
            + reward(r.get("reward"))
            + cell(r.get("reference") or "")
            + "</tr>"
            for r in held
        )
        out += (
            f"<h2>{html.escape(run_dir.name)}: sample completions (greedy, held-out)</h2><table><tr><th>prompt</th>"
            f"<th>completion</th><th>reward</th><th>reference</th></tr>{body}</table>"
        )
    return out


@dataclass
class Config:
    """Options of `mirl report`."""

    runs: str = ""  # run folders, comma-separated (overlaid in the plots); or give them as arguments
    out: str = ""  # output folder (default: <first run>/report)


def run(cfg: Config) -> Path:
    """`mirl report RUN ...`: the plots and one HTML page of the runs, overlaid."""
    if not cfg.runs:
        raise ValueError("mirl report needs --runs RUN_DIR[,RUN_DIR...]")
    page = write_report([r.strip() for r in cfg.runs.split(",") if r.strip()], cfg.out or None)
    print(page)
    return page
