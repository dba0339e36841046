"""The figures of docs/real_model.md from the three SmolLM2 runs' folders (run them first, see that page):

    python examples/smollm2/plot.py --grpo runs/smollm2/grpo --dpo runs/smollm2/dpo --mio runs/smollm2/mio --out docs

real_model_grpo.png: held-out greedy accuracy at each evaluation (evals.json) and the training reward of the
task and format functions per step (metrics.jsonl). real_model_pref.png: held-out accuracy of the start, DPO
and MIO, and the chosen and rejected log-probs of the fixed probe pairs over steps for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mirl.logging import read_metrics  # noqa: E402
from mirl.report import plot_preference_curves  # noqa: E402


def final_accuracy(run: Path) -> float:
    """The held-out accuracy a preference run printed at its end, from its metrics or its evals.json."""
    evals = run / "evals.json"
    if evals.exists():
        return json.loads(evals.read_text())[-1]["accuracy"]
    rows = [r for r in read_metrics(run) if "eval/accuracy" in r]
    return rows[-1]["eval/accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grpo", default="runs/smollm2/grpo")
    ap.add_argument("--dpo", default="runs/smollm2/dpo")
    ap.add_argument("--mio", default="runs/smollm2/mio")
    ap.add_argument("--start", type=float, required=True, help="the base model's held-out accuracy")
    ap.add_argument("--out", default="docs")
    a = ap.parse_args()
    out = Path(a.out)

    grpo = Path(a.grpo)
    evals = json.loads((grpo / "evals.json").read_text())
    rows = read_metrics(grpo)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="o")
    left.set_title("held-out greedy accuracy (n=200)")
    right.plot([r["step"] for r in rows], [r["rewards/task/mean"] for r in rows], label="task (correct answer)")
    right.plot([r["step"] for r in rows], [r["rewards/short/mean"] for r in rows], label="short (one short line)")
    right.set_title("training reward, mean over 64 samples")
    right.legend()
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("GRPO, SmolLM2-135M-Instruct + LoRA, arith:2 asked in words")
    fig.tight_layout()
    fig.savefig(out / "real_model_grpo.png", dpi=110)
    plt.close(fig)

    runs = {"DPO": Path(a.dpo), "MIO": Path(a.mio)}
    plot_preference_curves(
        {k: read_metrics(v) for k, v in runs.items()},
        out / "real_model_pref.png",
        title="DPO vs MIO, SmolLM2-135M-Instruct + LoRA, the same self-sampled verified pairs",
        accuracies={"start": a.start, **{k: final_accuracy(v) for k, v in runs.items()}},
    )
    print(out / "real_model_grpo.png", out / "real_model_pref.png")


if __name__ == "__main__":
    main()
