"""Reward functions run in a worker process, where a call that runs past its limit can be stopped for sure.

A reward is user code: it may loop forever, catch every exception (a timeout raised inside it included),
ignore SIGTERM or call os._exit. So it does not run in the training process: one worker process per
RewardSet, forked once and reused for every call (forked, so that it has the reward functions as they are
in memory: a file loaded by path, a closure over a task, a function registered in a test), gets
(function index, prompts, completions, columns) over a pipe and answers with the checked values. A call past
its limit: the worker is killed (SIGKILL, which no Python code can catch) and the next call forks a fresh
one. While waiting, a stop signal to the run (mirl/stop.py) kills the worker and raises StopRequested, so the
run answers SIGTERM within a fraction of a second whatever the reward does. The worker dies with the run
(PR_SET_PDEATHSIG on Linux, and an exit hook).

Where fork does not exist (Windows), rewards run in the training process without a hard limit.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import time

from .. import stop as run_stop
from .registry import RewardFault

POLL_S = 0.05  # how often a waiting call looks at the clock and for a stop signal

_LIVE: set[int] = set()  # the worker pids of this process, killed at exit


def can_fork() -> bool:
    """Whether rewards can run in a forked worker here (POSIX)."""
    return hasattr(os, "fork")


def _as_list(values):
    """A 1-D tensor or array as a list; anything else as it is."""
    if type(values).__name__ in ("Tensor", "ndarray") and getattr(values, "ndim", 0) == 1:
        return values.tolist()
    return values


def check_values(values, n: int) -> str | None:
    """Why a reward's return value is unusable (None when it is a list of n numbers, None or RewardFault)."""
    values = _as_list(values)
    if not isinstance(values, (list, tuple)):
        return f"returned {type(values).__name__}, not a list of {n} scores"
    if len(values) != n:
        return f"returned {len(values)} values for {n} samples"
    for v in values:
        if v is None or isinstance(v, RewardFault):
            continue
        number = (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            type(v).__name__ == "Tensor" and v.dim() == 0
        )  # numpy scalars are float / int subclasses or below
        if not number and not type(v).__module__.startswith("numpy"):
            return f"returned a {type(v).__name__} ({str(v)[:40]!r}) among its scores; each must be a number or None"
    return None


def call_reward(fn, prompts, completions, columns) -> tuple[str, object]:
    """One reward call, in whatever process runs it -> ("ok", [float | None | RewardFault] * n) or
    ("error", what went wrong, as the fault's name)."""
    try:
        values = fn(prompts, completions, **columns)
    except SystemExit as e:
        return "error", f"exit (SystemExit: {e})"
    except BaseException as e:  # noqa: BLE001 - a faulty scorer must not kill the run
        return "error", f"error ({type(e).__name__}: {e})"
    bad = check_values(values, len(completions))
    if bad is not None:
        return "error", bad
    out = []
    for v in _as_list(values):
        if v is None or isinstance(v, RewardFault):
            out.append(v)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(RewardFault(f"non-numeric value {str(v)[:40]!r}"))
    return "ok", out


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(conn, fns) -> None:
    """The worker's loop: a call in, its checked result out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the run, which stops the worker itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if "torch" in sys.modules:  # as DataLoader workers do: OpenMP's threads did not survive the fork
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            j, prompts, completions, columns = conn.recv()
        except (EOFError, OSError):
            return
        result = call_reward(fns[j], prompts, completions, columns)
        try:
            conn.send(result)
        except Exception as e:  # noqa: BLE001 - e.g. a value that cannot be pickled
            conn.send(("error", f"its result could not be sent back ({type(e).__name__}: {e})"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    _LIVE.discard(pid)


@atexit.register
def _kill_all() -> None:
    for pid in list(_LIVE):
        _kill(pid)


def fork_worker(serve, *args) -> tuple[int, object]:
    """Fork a worker process that runs serve(its end of a pipe, *args) and then exits (never returning into the
    caller's code); it is killed with the run (_LIVE, PR_SET_PDEATHSIG in serve). -> (its pid, our end)."""
    from multiprocessing import Pipe

    parent, child = Pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            serve(child, *args)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    child.close()
    _LIVE.add(pid)
    return pid, parent


class RewardWorker:
    """A forked process that runs reward functions, reused across calls and replaced after a timeout."""

    def __init__(self, fns: list):
        self.fns = fns
        self.pid: int | None = None
        self.conn = None
        self.starts = 0  # processes forked so far (1 + the restarts after timeouts and deaths)

    def start(self) -> None:
        """Fork the worker now (cheap: copy-on-write), before the run's own threads exist."""
        if self.pid is not None:
            return
        pid, parent = fork_worker(_serve, self.fns)
        self.pid, self.conn = pid, parent
        self.starts += 1

    def stop(self) -> None:
        """Kill the worker (SIGKILL) and forget it; the next call forks a fresh one."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pid is not None:
            _kill(self.pid)
            self.pid = None

    def call(self, j: int, prompts, completions, columns, timeout_s: float) -> tuple[str, object]:
        """Run function j in the worker -> call_reward's answer, ("timeout", None) past timeout_s (0 = no limit)
        or ("error", why) when the worker died or the inputs could not be sent. A stop signal to the run while
        waiting: the worker is killed and StopRequested raised."""
        self.start()
        try:
            self.conn.send((j, prompts, completions, columns))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.stop()
            return "error", "the reward worker had died; a new one is started for the next call"
        except Exception as e:  # noqa: BLE001 - a column that cannot be pickled
            self.stop()
            return "error", f"its inputs could not be sent to the reward worker ({type(e).__name__}: {e})"
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                return "timeout", None
            try:
                ready = self.conn.poll(min(POLL_S, left))
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    pid = self.pid
                    self.stop()
                    return "error", f"the reward worker (pid {pid}) died during the call (os._exit or a crash)"
            name = run_stop.requested()
            if name is not None:
                self.stop()
                raise run_stop.StopRequested(name, "while a reward function was running")
