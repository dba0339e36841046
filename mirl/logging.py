"""Metrics to the terminal (rich progress bar), to metrics.jsonl and to the experiment trackers a run reports to:
TensorBoard (the default), Weights & Biases and trackio (optional extras: pip install 'mirl[wandb]' / 'mirl[trackio]').

    --report-to tensorboard,wandb,trackio     --log-every 10 --log-completions 4

W&B follows its own settings (WANDB_MODE=offline, WANDB_PROJECT, ...; offline runs land in <out_dir>/wandb);
trackio keeps a local store (TRACKIO_DIR). Completion tables (prompt, completion, reward per function, answer,
images) go to each tracker as a table and to <out_dir>/samples.jsonl.
"""

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


TRACKERS = ("tensorboard", "wandb", "trackio")


def parse_report_to(spec: str) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); 'none' or '' -> (). Unknown names are an error."""
    names = tuple(x.strip() for x in spec.split(",") if x.strip() and x.strip() != "none")
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"--report-to {spec!r}: unknown tracker {bad[0]!r}; valid: {', '.join(TRACKERS)}, none")
    return names


def check_trackers(names: tuple[str, ...]) -> None:
    """Before anything is loaded: each tracker's package is installed, and W&B has credentials unless it logs
    offline (WANDB_MODE=offline or disabled). Nothing contacts a network; a problem is a ValueError naming the
    fix."""
    import importlib.util

    for kind in names:
        if kind == "tensorboard":
            continue
        if importlib.util.find_spec(kind) is None:
            raise ValueError(f"--report-to {kind} needs the {kind} package: pip install 'mirl[{kind}]'")
        if kind == "wandb" and not wandb_credentials():
            raise ValueError(
                "--report-to wandb: no W&B credentials (WANDB_API_KEY is not set and the netrc file has no entry "
                f"for {_wandb_host()}): run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline to keep the "
                "W&B run in <out_dir>/wandb without an account (wandb sync uploads it later)"
            )


def _wandb_host() -> str:
    import os
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def wandb_credentials() -> bool:
    """Whether W&B can log: offline or disabled mode, an API key or identity token in the environment, or an
    entry for the W&B host in the netrc file (what `wandb login` writes). Read locally, never checked online."""
    import netrc
    import os

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """Weights & Biases or trackio, through the calls both libraries have (init, log, Table, Image, finish): one
    tracker run per mirl run. W&B: WANDB_MODE decides online or offline, its files go to <out_dir>/wandb, the
    project is $WANDB_PROJECT (default mirl); trackio: its local store (TRACKIO_DIR), project $TRACKIO_PROJECT."""

    def __init__(self, kind: str, run_dir: Path, name: str, config: dict):
        import importlib
        import os

        try:
            self.lib = importlib.import_module(kind)
        except ImportError as e:
            raise ValueError(f"--report-to {kind} needs the {kind} package: pip install 'mirl[{kind}]'") from e
        where = {"dir": str(run_dir)} if kind == "wandb" else {}
        project = os.environ.get(f"{kind.upper()}_PROJECT", "mirl")
        try:
            self.lib.init(project=project, name=name, config=config, **where)
        except Exception as e:  # noqa: BLE001 - each library's own errors (no login, no network): one line
            offline = " (or set WANDB_MODE=offline)" if kind == "wandb" else ""
            raise ValueError(
                f"--report-to {kind}: {kind}.init failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}){offline}"
            ) from e

    def log(self, step: int, metrics: dict) -> None:
        """Scalars at a step."""
        self.lib.log(metrics, step=step)

    def table(self, step: int, columns: list[str], rows: list[list], images: list | None) -> None:
        """A table of completions (a column of images when the prompts had some)."""
        if images is not None:
            columns = [*columns, "image"]
            rows = [[*r, None if im is None else self.lib.Image(im)] for r, im in zip(rows, images)]
        self.lib.log({"completions": self.lib.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        """Finish the tracker's run (W&B offline: its files stay in <out_dir>/wandb)."""
        self.lib.finish()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file a run wrote (metrics.jsonl, samples.jsonl). A line that is not a JSON
    object is a ValueError naming the file and its line number (1-based, blank lines counted)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); the file is damaged (a run killed while "
                "writing it leaves a half line): delete that line"
            ) from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def keep_rows(path: Path, keep) -> None:
    """Rewrite a JSON-lines file with only the rows for which keep(row) holds (nothing when it does not exist)."""
    if path.exists():
        path.write_text("".join(json.dumps(row) + "\n" for row in read_jsonl(path) if keep(row)))


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
        report_to: tuple[str, ...] = ("tensorboard",),
        log_every: int = 1,
        config: dict | None = None,
    ):
        """resume: continue metrics.jsonl and TensorBoard from start_step (the checkpoint's step): rows of
        later steps, logged by the interrupted run after its checkpoint, are dropped, so none repeats.
        report_to: the trackers (TRACKERS); they get every log_every-th step's metrics (metrics.jsonl every
        step). tensorboard=False: none of TensorBoard whatever report_to says."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        # a fresh run starts both files empty; a resumed one keeps the rows up to the checkpoint's step
        # (samples.jsonl: only the rollouts; the final greedy samples are written again at the end)
        keep_rows(self.path, lambda r: resume and r.get("step", 0) <= start_step)
        keep_rows(
            self.run_dir / "samples.jsonl",
            lambda r: resume and r.get("kind") == "rollout" and r["step"] <= start_step,
        )
        self.file = self.path.open("a")
        self.show = show
        self.tb = None
        self.log_every = max(1, log_every)
        name = f"{self.run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.trackers = [Tracker(t, self.run_dir, name, config or {}) for t in report_to if t != "tensorboard"]
        if tensorboard and "tensorboard" in report_to:
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
        if step % self.log_every == 0 or step == self.total:
            finite = {k: v for k, v in clean.items() if math.isfinite(v)}
            if self.tb is not None:
                for k, v in finite.items():
                    self.tb.add_scalar(k, v, step)
            for t in self.trackers:
                t.log(step, finite)
        info = " ".join(f"{k}={clean[k]:.4g}" for k in self.show if k in clean)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step == 1 or step % max(1, self.total // 10) == 0 or step == self.total:
            console.print(f"{self.desc} step {step}/{self.total} {info}")

    def completions(self, step: int, rows: list[dict]) -> None:
        """A table of sampled completions (completion_rows: prompt, completion, rewards, answer, images) to
        samples.jsonl (with the step) and to every tracker."""
        import html

        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "kind": "rollout", **{k: v for k, v in r.items() if k != "images"}}))
                f.write("\n")
        reward_names = sorted({k for r in rows for k in r["rewards"]})
        columns = ["step", "prompt", "completion", "reward", *[f"reward/{n}" for n in reward_names], "answer"]
        table = [
            [step, r["prompt"], r["completion"], r["reward"], *[r["rewards"].get(n) for n in reward_names], r["answer"]]
            for r in rows
        ]
        has_images = any(r.get("images") for r in rows)
        images = [r["images"][0] if r.get("images") else None for r in rows] if has_images else None
        if self.tb is not None:
            md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            md += "".join("| " + " | ".join(html.escape(str(c)).replace("\n", " ") for c in r) + " |\n" for r in table)
            self.tb.add_text("completions", md, step)
        for t in self.trackers:
            t.table(step, columns, table, images)

    def close(self) -> None:
        """Stop the progress bar, close the files and finish the trackers' runs."""
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        for t in self.trackers:
            t.close()
        self.file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a damaged line: an error naming the file and line)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
