"""Metrics to the terminal (rich progress bar), to metrics.jsonl and to TensorBoard."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # no hard wraps: a message stays one line in logs


def warn(msg: str) -> None:
    """Print a warning line (stderr)."""
    console.print(f"[bold yellow]warning:[/] {msg}")


class MetricLogger:
    """Metrics of a run to metrics.jsonl, TensorBoard and the terminal (a progress bar, or a line every tenth of the
    run)."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        desc: str = "train",
        tensorboard: bool = True,
        show: tuple[str, ...] = ("loss",),
        resume: bool = False,
        start_step: int = 0,
        quiet: bool = False,
    ):
        """resume: continue metrics.jsonl and TensorBoard from start_step (the checkpoint's step): rows of
        later steps, logged by the interrupted run after its checkpoint, are dropped, so none repeats."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        if resume and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.show = show
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events of steps after the checkpoint's from the old run
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if resume else None)
            except ImportError:  # tensorboard is a dependency; keep running if a user removed it
                warn("tensorboard is not installed; metrics go to metrics.jsonl only")
        self.quiet = quiet or not sys.stderr.isatty()
        self.progress = None
        self.t0 = time.time()
        self.total = total_steps
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.task = self.progress.add_task(desc, total=total_steps, info="")
            self.progress.start()
        self.desc = desc

    def log(self, step: int, metrics: dict) -> None:
        """Write one step's metrics everywhere."""
        clean = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        info = " ".join(f"{k}={clean[k]:.4g}" for k in self.show if k in clean)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step == 1 or step % max(1, self.total // 10) == 0 or step == self.total:
            console.print(f"{self.desc} step {step}/{self.total} {info}")

    def close(self) -> None:
        """Stop the progress bar and close the files."""
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
