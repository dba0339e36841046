"""Environments run in a worker process, where user code that raises, hangs or answers badly is a counted fault of
one episode, never a crashed or hung run.

Tools and an environment's reset / step / finish are user code: they may raise, loop forever, return a
non-string or megabytes, or os._exit. EnvHost holds the n environments of a batch of episodes (one instance per
episode, built by the factory at reset) in one forked worker (forked, so that the environment class is there as
it is in memory: a file loaded by path, a class defined in a test) and talks to it over a pipe, as the reward
worker does (rewards/worker.py: its kill-and-die-with-the-parent helpers are reused here). Every call answers
within timeout_s:

    host = EnvHost(factory, n=16, timeout_s=10)
    messages = host.reset(i, example)       # the opening messages        | Fault
    message = host.call(i, tool_call)       # a tool message               | Fault
    step = host.step(i, final_text)         # the environment's Step       | Fault
    reward = host.finish(i)                 # at the turn limit: float, None | Fault
    host.faults, host.bad_calls             # counts by kind

A fault (kinds: "reset raised", "tool raised", "tool timeout", "tool non-string", "tool too large", "step raised",
"step bad result", "step timeout", "tool died" (the worker exited), "replay failed", ...) ends that episode: it
gets a Fault, the runner gives it reward None, and later calls for it answer Fault("ended") uncounted. A
malformed call (the parser's error, an unknown tool, arguments that do not fit the schema) is not a fault: the
model gets the error as the tool's result, and host.bad_calls counts it by kind.

A call past timeout_s kills the worker (SIGKILL). A fresh one is forked and the other live episodes are replayed
into it: each one's reset and then its recorded tool calls and steps in order, so that only the hung episode
faults. Replay assumes deterministic environments (the same calls give the same state; an environment that
draws random numbers should seed itself from its example); an episode whose replay fails or hangs faults too.
A stop signal to the run (mirl/stop.py) while waiting kills the worker and raises StopRequested.

Where fork does not exist (Windows), the environments run in the training process: every fault but a hang is
still caught, and there is no time limit.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass

from .. import stop as run_stop
from ..rewards.worker import POLL_S, _die_with_parent, _kill, can_fork, fork_worker
from .base import Step, Tool, ToolCall
from .tools import as_tool, check_arguments

MAX_CHARS = 65536  # the most text one tool result, or one reset's or step's messages, may hold


@dataclass
class Fault:
    """What the host answers for an episode whose environment faulted (kind: what happened, detail: the error)."""

    kind: str
    detail: str = ""


class _Fault(Exception):
    """Raised inside handle() to answer ("fault", kind, detail)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _text_size(messages: list[dict]) -> int:
    """Characters of text in messages (content strings and text parts)."""
    n = 0
    for m in messages:
        c = m.get("content") or ""
        n += len(c) if isinstance(c, str) else sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
    return n


def _check_messages(out, what: str, max_chars: int) -> list[dict]:
    """reset's or step's messages, checked (a string is one user message)."""
    if isinstance(out, str):
        out = [{"role": "user", "content": out}]
    if not isinstance(out, (list, tuple)) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), (str, list))
        for m in out
    ):
        raise _Fault(f"{what} bad result", f"returned {type(out).__name__}, not a list of messages {{role, content}}")
    if _text_size(out) > max_chars:
        raise _Fault(f"{what} too large", f"{_text_size(out)} characters (at most {max_chars})")
    return list(out)


def _check_step(out, max_chars: int) -> Step:
    """step's answer, checked: a Step, or a (messages, reward, done) tuple."""
    if isinstance(out, tuple) and len(out) == 3:
        out = Step(*out)
    if not isinstance(out, Step):
        raise _Fault("step bad result", f"returned {type(out).__name__}, not a Step")
    r = out.reward
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)):
        raise _Fault("step bad result", f"reward {str(r)[:40]!r} is not a finite number or None")
    return Step(_check_messages(out.messages or [], "step", max_chars), None if r is None else float(r), bool(out.done))


def _tool_message(name: str, out, max_chars: int) -> dict:
    """A tool's return value as a tool message: a string, or a dict with string content (and images)."""
    if isinstance(out, dict) and isinstance(out.get("content"), str):
        message = {**out, "role": "tool", "name": name}
    elif isinstance(out, str):
        message = {"role": "tool", "name": name, "content": out}
    else:
        raise _Fault("tool non-string", f"{name} returned {type(out).__name__}: {str(out)[:40]!r}")
    if len(message["content"]) > max_chars:
        raise _Fault("tool too large", f"{name} returned {len(message['content'])} characters (at most {max_chars})")
    return message


def handle(envs: dict, factory, op: str, i: int, payload, max_chars: int = MAX_CHARS) -> tuple:
    """One request, in whatever process runs the environments -> ("ok", value), ("fault", kind, detail) or
    ("bad", kind, the text the model sees). envs: episode -> (environment, its tools by name)."""
    try:
        if op == "tools":
            return "ok", [t.schema() for t in (as_tool(t) for t in (getattr(factory(), "tools", None) or []))]
        if op == "reset":
            env = factory()
            envs[i] = env, {t.name: t for t in (as_tool(t) for t in (getattr(env, "tools", None) or []))}
            return "ok", _check_messages(env.reset(payload), "reset", max_chars)
        if i not in envs:
            raise _Fault(f"{op} before reset", f"episode {i} was not reset in this worker")
        env, tools = envs[i]
        if op == "tool":
            name, arguments = payload
            if name not in tools:
                return "bad", "unknown tool", f"unknown tool {name!r}; the tools are: {', '.join(tools) or 'none'}"
            bad = check_arguments(tools[name], arguments)
            if bad is not None:
                return "bad", "bad arguments", f"bad arguments for {name}: {bad}"
            return "ok", _tool_message(name, tools[name].fn(**arguments), max_chars)
        if op == "step":
            return "ok", _check_step(env.step(payload), max_chars)
        if op == "finish":
            fn = getattr(env, "finish", None)
            r = fn() if callable(fn) else None
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)):
                raise _Fault("finish bad result", f"returned {str(r)[:40]!r}, not a finite number or None")
            return "ok", None if r is None else float(r)
        raise ValueError(f"unknown request {op!r}")
    except _Fault as f:
        return "fault", f.kind, f.detail
    except SystemExit as e:
        return "fault", f"{op} raised", f"SystemExit: {e}"
    except BaseException as e:  # noqa: BLE001 - an environment's error must not kill the worker
        return "fault", f"{op} raised", f"{type(e).__name__}: {str(e)[:500]}"


def _serve(conn, factory, max_chars: int) -> None:
    """The worker's loop: a request in, its answer out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the run, which stops the worker itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if "torch" in sys.modules:  # OpenMP's threads did not survive the fork
        sys.modules["torch"].set_num_threads(1)
    envs: dict = {}
    while True:
        try:
            op, i, payload = conn.recv()
        except (EOFError, OSError):
            return
        reply = handle(envs, factory, op, i, payload, max_chars)
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - e.g. a value that cannot be pickled
            conn.send(("fault", f"{op} bad result", f"its result could not be sent back ({type(e).__name__}: {e})"))


def _remote_tool(**_):
    """Stands for a tool that runs in the host's worker (EnvHost.call runs it)."""
    raise RuntimeError("this tool runs in the EnvHost's worker: call it through EnvHost.call")


class EnvHost:
    """n environments (one per episode) in a forked worker; every call answered within timeout_s (0: no limit)."""

    def __init__(self, factory, n: int, timeout_s: float, max_chars: int = MAX_CHARS, fork: bool | None = None):
        self.factory, self.n, self.timeout_s, self.max_chars = factory, n, timeout_s, max_chars
        self.fork = can_fork() if fork is None else fork
        self.logs: list[list[tuple[str, object]]] = [[] for _ in range(n)]  # each episode's calls, for replay
        self.state = ["new"] * n  # new | live | ended | faulted
        self.faults: dict[str, int] = {}
        self.bad_calls: dict[str, int] = {}
        self.restarts = 0  # workers forked again after a timeout or a death
        self.pid: int | None = None
        self.conn = None
        self._local: dict = {}  # the environments, when they run in this process
        self._tools: list[Tool] | None = None

    # -- the worker ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.pid, self.conn = fork_worker(_serve, self.factory, self.max_chars)

    def close(self) -> None:
        """Kill the worker (SIGKILL); the environments are gone."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pid is not None:
            _kill(self.pid)
            self.pid = None
        self._local = {}

    def _send(self, op: str, i: int, payload) -> tuple:
        """One request -> handle()'s answer, ("timeout", ...) or ("died", ...) (the worker is then killed)."""
        if not self.fork:
            return handle(self._local, self.factory, op, i, payload, self.max_chars)
        if self.pid is None:
            self._start()
        try:
            self.conn.send((op, i, payload))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.close()
            return "died", f"{op} died", "the environment worker had died"
        except Exception as e:  # noqa: BLE001 - an example that cannot be pickled
            return "fault", f"{op} bad input", f"could not be sent to the worker ({type(e).__name__}: {e})"
        deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else math.inf
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return "timeout", f"{op} timeout", f"no answer within {self.timeout_s:g} s"
            try:
                ready = self.conn.poll(min(POLL_S, left))
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    pid = self.pid
                    self.close()
                    return "died", f"{op} died", f"the environment worker (pid {pid}) exited during the call"
            name = run_stop.requested()
            if name is not None:
                self.close()
                raise run_stop.StopRequested(name, "while an environment was running")

    def _fault(self, i: int, kind: str, detail: str = "") -> Fault:
        """Episode i faulted: counted, its record dropped."""
        self.state[i], self.logs[i] = "faulted", []
        self.faults[kind] = self.faults.get(kind, 0) + 1
        return Fault(kind, detail)

    def _replay(self) -> None:
        """A fresh worker with every live episode replayed into it; an episode whose replay fails faults."""
        while True:
            self.close()
            self.restarts += 1
            for j in range(self.n):
                if self.state[j] != "live":
                    continue
                for op, payload in self.logs[j]:
                    reply = self._send(op, j, payload)
                    if reply[0] != "ok":
                        self._fault(j, "replay failed", f"{reply[1]}: {reply[2]}" if len(reply) > 2 else reply[1])
                        break
                if self.pid is None:  # the replay killed the worker: start over without that episode
                    break
            else:
                return

    def _request(self, op: str, i: int, payload):
        """One request for episode i -> ("ok", value) or ("bad", text), or a Fault (counted)."""
        if self.state[i] == "faulted":
            return Fault("ended", "the episode faulted earlier")
        reply = self._send(op, i, payload)
        if reply[0] in ("timeout", "died"):
            fault = self._fault(i, reply[1], reply[2])
            self._replay()
            return fault
        if reply[0] == "fault":
            return self._fault(i, reply[1], reply[2])
        if reply[0] == "bad":
            self.bad_calls[reply[1]] = self.bad_calls.get(reply[1], 0) + 1
            return "bad", reply[2]
        self.logs[i].append((op, payload))
        return reply

    # -- the episodes -------------------------------------------------------------------------------------------

    @property
    def tools(self) -> list[Tool]:
        """The environments' tools (from one instance, built in the worker); their fn only runs through call()."""
        if self._tools is None:
            reply = self._send("tools", -1, None)
            if reply[0] != "ok":
                from ..options import ConfigError

                raise ConfigError(f"the environment's tools could not be read: {reply[1]} ({reply[-1]})")
            self._tools = [
                Tool(s["function"]["name"], s["function"]["description"], s["function"]["parameters"], _remote_tool)
                for s in reply[1]
            ]
        return self._tools

    def reset(self, i: int, example: dict):
        """Episode i's opening messages (a fresh environment), or a Fault."""
        self.state[i], self.logs[i] = "live", []
        out = self._request("reset", i, example)
        return out if isinstance(out, Fault) else out[1]

    def call(self, i: int, call: ToolCall):
        """A tool call of episode i -> the tool message {"role": "tool", "name", "content"} (an error the model
        sees when the call is malformed), or a Fault."""
        if call.error is not None:
            self.bad_calls["malformed"] = self.bad_calls.get("malformed", 0) + 1
            return {"role": "tool", "name": call.name, "content": call.error}
        if self.state[i] == "faulted":
            return Fault("ended", "the episode faulted earlier")
        out = self._request("tool", i, (call.name, call.arguments))
        if isinstance(out, Fault):
            return out
        if out[0] == "bad":
            return {"role": "tool", "name": call.name, "content": out[1]}
        return out[1]

    def step(self, i: int, text: str):
        """Episode i's turn without a tool call -> the environment's Step, or a Fault."""
        out = self._request("step", i, text)
        if isinstance(out, Fault):
            return out
        if out[1].done:
            self.state[i] = "ended"
        return out[1]

    def finish(self, i: int):
        """Episode i reached the turn limit -> the environment's finish() (None when it has none), or a Fault."""
        out = self._request("finish", i, None)
        if isinstance(out, Fault):
            return out
        self.state[i] = "ended"
        return out[1]
