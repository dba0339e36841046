"""Rewards: plain callables f(prompts, completions, **columns) -> list[float | None], registered by name.

None means "not applicable to this sample". Several are combined with weights:
    "task"                  the built-in task's checker (arith, countdown, reasoning-gym scorers)
    "task:1,format:0.1"     weighted sum; a sample where every function says None gets NaN (advantage 0)
Built in: accuracy (math-verify equivalence), exact, numeric, format, overlong, reasoning_gym, task,
and a learned reward model ("rm:<folder>", see recipes/reward_model.py).

A reward function that raises, returns NaN/inf, or runs past the timeout gives None for that call's
samples; the fault is counted and the first sample is reported, and the run goes on.
"""

from __future__ import annotations

import inspect
import math
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import builtin  # noqa: F401  (registers the built-in rewards)
from .registry import REWARDS, get_reward, register_reward

__all__ = ["REWARDS", "get_reward", "register_reward", "RewardSet", "parse_reward_spec"]


class RewardTimeout(BaseException):
    """Raised inside a reward call that ran past its limit. A BaseException, so that a reward's own
    `except Exception:` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit in the main thread (a hung pure-Python scorer is interrupted); none elsewhere.
    Yields a dict whose 'fired' turns True when the limit was hit (even if the reward swallowed the signal)."""
    state = {"fired": False}
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        state["fired"] = True
        raise RewardTimeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _weight(text: str, name: str) -> float:
    """A weight of a reward spec: a finite number (1 when empty)."""
    try:
        w = float(text) if text else 1.0
    except ValueError as e:
        raise ValueError(f"reward weight for {name!r} must be a number, got {text!r}") from e
    if not math.isfinite(w):
        raise ValueError(f"reward weight for {name!r} must be finite, got {text!r}")
    return w


def _check_values(values, n: int) -> str | None:
    """Why a reward's return value is unusable (None when it is a list of n numbers or None entries)."""
    if not isinstance(values, (list, tuple)):
        if isinstance(values, torch.Tensor) and values.dim() == 1:
            values = values.tolist()
        else:
            return f"returned {type(values).__name__}, not a list of {n} scores"
    if len(values) != n:
        return f"returned {len(values)} values for {n} samples"
    for v in values:
        number = (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, torch.Tensor) and v.dim() == 0
        )  # numpy scalars are float / int subclasses or below
        if v is not None and not number and not type(v).__module__.startswith("numpy"):
            return f"returned a {type(v).__name__} ({str(v)[:40]!r}) among its scores; each must be a number or None"
    return None


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


def parse_reward_spec(spec: str, task=None) -> list[tuple[str, Callable, float]]:
    """'task:1,format:0.1' -> [(name, fn, weight)]; 'rm:<folder>' loads a learned reward model."""
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

            out.append(("rm", RewardModelReward(path), _weight(w, "rm")))
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
        raise ValueError(f"empty reward spec {spec!r}; valid: task, rm:<folder>, {', '.join(sorted(REWARDS))}")
    return out


@dataclass
class RewardSet:
    """Weighted rewards with fault accounting: score() -> (total (N,), per_function (N, F), metrics)."""

    fns: list[tuple[str, Callable, float]]
    timeout_s: float = 10.0
    faults: dict = field(default_factory=dict)
    fault_examples: dict = field(default_factory=dict)

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

    def score(self, prompts: list[str], completions: list[str], **columns) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Score completions with every function: -> (weighted total (N,), per function (N, F), metrics); faults
        counted."""
        n = len(completions)
        per_fn = torch.full((n, len(self.fns)), float("nan"), dtype=torch.float64)
        for j, (name, fn, _) in enumerate(self.fns):
            try:
                with _time_limit(self.timeout_s) as limit:
                    values = fn(prompts, completions, **columns)
                if limit["fired"]:  # the reward caught the timeout itself and returned
                    raise RewardTimeout("swallowed")
            except (Exception, SystemExit, RewardTimeout) as e:  # noqa: BLE001 - a faulty scorer must not kill the run
                kind = (
                    "timeout"
                    if isinstance(e, RewardTimeout)
                    else f"exit ({type(e).__name__}: {e})"
                    if isinstance(e, SystemExit)
                    else f"error ({type(e).__name__}: {e})"
                )
                self._fault(name, kind, f"{prompts[0]!r} -> {completions[0]!r}")
                continue
            bad = _check_values(values, n)
            if bad is not None:
                self._fault(name, bad, completions[0])
                continue
            for i, v in enumerate(list(values)):
                if v is None:
                    continue
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    self._fault(name, f"non-numeric value {str(v)[:40]!r}", f"{prompts[i]!r} -> {completions[i]!r}")
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
        return total, per_fn, metrics
