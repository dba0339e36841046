"""Rewards: plain callables f(prompts, completions, **columns) -> list[float | None], registered by name.

None means "not applicable to this sample"; RewardFault(reason) means "this sample's input is bad" (counted
and reported like any fault). Several are combined with weights:
    "task"                  the built-in task's checker (arith, countdown, reasoning-gym scorers)
    "task:1,format:0.1"     weighted sum; a sample where every function says None gets NaN (advantage 0)
    "my_rewards.py:fn@0.5"  the function fn of a Python file, weight 0.5
Built in: accuracy (math-verify equivalence), exact, numeric, format, overlong, reasoning_gym, task,
and a learned reward model ("rm:<folder>", see recipes/reward_model.py).

Reward functions run in a worker process (rewards/worker.py) that is killed and replaced when a call runs
past the timeout, whatever the function does (catch the timeout, ignore signals, loop forever). A reward
function that raises, returns NaN/inf, or runs past the timeout gives None for that call's samples; the
fault is counted and the first sample is reported, and the run goes on. A learned reward model runs in
the training process (it is mirl's own code, and a model is too big to copy per call).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import builtin  # noqa: F401  (registers the built-in rewards)
from .registry import REWARDS, RewardFault, get_reward, register_reward
from .worker import RewardWorker, call_reward, can_fork

__all__ = ["REWARDS", "get_reward", "register_reward", "RewardFault", "RewardSet", "parse_reward_spec"]


def _weight(text: str, name: str) -> float:
    """A weight of a reward spec: a finite number (1 when empty)."""
    try:
        w = float(text) if text else 1.0
    except ValueError as e:
        raise ValueError(f"reward weight for {name!r} must be a number, got {text!r}") from e
    if not math.isfinite(w):
        raise ValueError(f"reward weight for {name!r} must be finite, got {text!r}")
    return w


def check_signature(name: str, fn: Callable) -> None:
    """A reward must take (prompts, completions, **columns): fail at setup, not mid-run."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    has_var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    if (len(positional) < 2 and not has_var_pos) or not has_var_kw:
        raise ValueError(f"reward {name!r} must have the signature f(prompts, completions, **columns); it has {sig}")


def _file_reward(part: str) -> tuple[str, Callable, float]:
    """'path/to/rewards.py:fn@0.5' -> (name, the function fn of that file, weight). The file is imported
    once, here, in the training process (its top level should only define functions); the function itself
    runs in the reward worker."""
    import importlib.util
    import sys

    body, _, w = part.partition("@")
    path, _, fname = body.rpartition(":") if not body.endswith(".py") else (body, "", "")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"reward file {path}: no such file (a reward spec 'file.py:function[@weight]')")
    key = f"mirl_user_reward_{abs(hash(str(p.resolve())))}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, p)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ValueError(f"reward file {path}:{e.lineno}: syntax error ({e.msg})") from e
        except BaseException as e:  # noqa: BLE001 - user code: any failure is the file's
            raise ValueError(f"reward file {path}: importing it raised {type(e).__name__}: {e}") from e
        sys.modules[key] = module
    functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
    if not fname:
        raise ValueError(
            f"reward file {path}: name the function after a colon ({path}:<function>); it defines: "
            f"{', '.join(functions) or 'no functions'}"
        )
    fn = getattr(module, fname, None)
    if not callable(fn):
        raise ValueError(f"reward file {path} has no function {fname!r}; it defines: {', '.join(functions) or 'none'}")
    name = f"{p.name}:{fname}"
    return name, fn, _weight(w, name)


def parse_reward_spec(spec: str, task=None, device="cpu", dtype: str = "float32") -> list[tuple[str, Callable, float]]:
    """'task:1,format:0.1' -> [(name, fn, weight)]; 'rm:<folder>' loads a learned reward model (on `device`, in
    --dtype's type); 'file.py:fn@w' takes the function fn of a Python file."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("rm:"):
            path, _, w = part[3:].partition("@")
            if not path.strip():
                raise ValueError("reward 'rm:<folder>' needs the reward model's folder after 'rm:'")
            from .reward_model import RewardModelReward

            out.append(("rm", RewardModelReward(path, device=device, dtype=dtype), _weight(w, "rm")))
            continue
        body = part.partition("@")[0]
        if body.endswith(".py") or ".py:" in body:
            name, fn, weight = _file_reward(part)
            check_signature(name, fn)
            out.append((name, fn, weight))
            continue
        name, _, w = part.partition(":")
        weight = _weight(w, name)
        if name == "task":
            if task is None:
                raise ValueError("reward 'task' needs a task (--task)")
            fn = builtin.task_reward(task)
        else:
            fn = get_reward(name)
        check_signature(name, fn)
        out.append((name, fn, weight))
    if not out:
        raise ValueError(
            f"empty reward spec {spec!r}; valid: task, rm:<folder>, file.py:function, {', '.join(sorted(REWARDS))}"
        )
    return out


@dataclass
class RewardSet:
    """Weighted rewards with fault accounting: score() -> (total (N,), per_function (N, F), metrics).

    Every function but a learned reward model (in_process = True) runs in one worker process (rewards/worker.py),
    forked when the set is made and replaced after a call that ran past timeout_s (0 = no limit)."""

    fns: list[tuple[str, Callable, float]]
    timeout_s: float = 10.0
    faults: dict = field(default_factory=dict)
    fault_examples: dict = field(default_factory=dict)

    def __post_init__(self):
        isolated = [j for j, (_, fn, _) in enumerate(self.fns) if not getattr(fn, "in_process", False)]
        self.worker = RewardWorker([fn for _, fn, _ in self.fns]) if isolated and can_fork() else None
        if self.worker is not None:
            self.worker.start()  # now, before the run's own threads (progress bar, trackers) exist
            weakref.finalize(self, self.worker.stop)  # the worker goes when the set does, not at exit only

    def close(self) -> None:
        """Stop the reward worker (it also dies with the process)."""
        if self.worker is not None:
            self.worker.stop()

    def check_rows(self, rows: list[dict]) -> None:
        """Refuse at start what no call could score: each function's own check_rows(rows), when it has one
        (a text-only reward model on prompts with images)."""
        for _, fn, _ in self.fns:
            check = getattr(fn, "check_rows", None)
            if check is not None:
                check(rows)

    @property
    def names(self) -> list[str]:
        """The functions' names, in the order of score()'s per-function columns."""
        return [name for name, _, _ in self.fns]

    @property
    def weights(self) -> torch.Tensor:
        """The functions' weights (F,), float64, in the order of names."""
        return torch.tensor([w for _, _, w in self.fns], dtype=torch.float64)

    def _fault(self, name: str, kind: str, sample: str) -> None:
        key = f"{name}/{kind}"
        self.faults[key] = self.faults.get(key, 0) + 1
        if key not in self.fault_examples:
            self.fault_examples[key] = sample[:200]
            from ..logging import warn

            warn(f"reward {name!r}: {kind} on sample {sample[:120]!r}; counted, the run goes on")

    def _call(self, j: int, fn, prompts, completions, columns) -> tuple[str, object]:
        if self.worker is None or getattr(fn, "in_process", False):
            return call_reward(fn, prompts, completions, columns)
        return self.worker.call(j, prompts, completions, columns, self.timeout_s)

    def score(
        self, prompts: list[str], completions: list[str], device=None, **columns
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Score completions with every function (on the host, from text): -> (weighted total (N,), per function
        (N, F), both moved to `device` once, and metrics); faults counted."""
        n = len(completions)
        per_fn = torch.full((n, len(self.fns)), float("nan"), dtype=torch.float64)
        for j, (name, fn, _) in enumerate(self.fns):
            status, values = self._call(j, fn, prompts, completions, columns)
            if status == "timeout":
                self._fault(name, "timeout", f"{prompts[0]!r} -> {completions[0]!r}")
                continue
            if status != "ok":
                self._fault(name, values, f"{prompts[0]!r} -> {completions[0]!r}")
                continue
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, RewardFault):
                    self._fault(name, v.reason, f"{prompts[i]!r} -> {completions[i]!r}")
                    continue
                if not math.isfinite(v):
                    self._fault(name, "non-finite value", f"{prompts[i]!r} -> {completions[i]!r} = {v}")
                    continue
                per_fn[i, j] = v
        total = torch.nansum(per_fn * self.weights, dim=1)
        total[torch.isnan(per_fn).all(1)] = float("nan")
        metrics = {}
        for j, (name, _, _) in enumerate(self.fns):
            col = per_fn[:, j]
            ok = col[~torch.isnan(col)]
            metrics[f"rewards/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            metrics[f"rewards/{name}/std"] = float(ok.std()) if len(ok) > 1 else 0.0
        ok = total[~torch.isnan(total)]
        metrics["reward/mean"] = float(ok.mean()) if len(ok) else float("nan")
        metrics["reward/std"] = float(ok.std()) if len(ok) > 1 else 0.0
        metrics["reward/unscorable"] = float(torch.isnan(total).sum())
        metrics["reward/faults"] = float(sum(self.faults.values()))
        return total.to(device), per_fn.to(device), metrics
