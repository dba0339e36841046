"""Run untrusted, model-written Python where it can be stopped for sure, and the `python` environment built on it.

    result = run_code("print(sum(p * p for p in range(10)))", timeout_s=5.0, memory_mb=512)
    result.stdout, result.status        # "285\\n", "ok"

A run is a fresh `python -I -S` process (stdlib only, no site-packages, no PYTHON* variables) in a new session,
with a fresh temporary directory as its cwd, HOME and TMPDIR (removed after), a minimal environment, stdin from a
file and stdout/stderr read with a cap (a process that prints forever costs at most ~4 x max_output bytes here).
A small bootstrap runs in the child before the model's code and puts up these layers, each where it can:

    rlimits        CPU seconds, address space (memory_mb), file size (file_mb; a larger write raises OSError),
                   no core files, RLIMIT_NPROC at the user's task count + 8 (Linux exempts root from it)
    userns+netns   unshare(CLONE_NEWUSER | CLONE_NEWNET): a network with no interface up, and no capabilities
                   outside (root in a container becomes an unprivileged user); where user namespaces are off, a
                   net namespace alone when the process may make one
    landlock       the kernel refuses every write, create, remove or rename outside the directory, and (ABI 4+)
                   every TCP bind/connect, (ABI 6+) signals to and abstract sockets of processes outside
    seccomp        x86_64: fork, vfork, clone of a process (threads are allowed), execve, socket, ptrace,
                   process_vm_*, and kill/tgkill of another process fail with EPERM (clone3: ENOSYS, so that
                   glibc falls back to clone, whose flags a filter can read)
    audit hook     sys.addaudithook (it cannot be removed): PermissionError "[sandbox] refused: ..." on sockets
                   (but socketpair), DNS, fork/exec/spawn/subprocess/os.system, ctypes, links, settrace, gc
                   walks, setrlimit, kill of another process, and writes, removes, renames, chmods outside the
                   directory (relative paths against the cwd)
    wall clock     the parent kills the whole process group (SIGKILL) at timeout_s; forks are refused, so the
                   group is everything the code started

The kernel layers are the boundary; the audit hook is a guard rail that gives the model a readable error (CPython
documents that audit hooks are no sandbox: code that reaches a raw file descriptor, e.g. os.open(..., dir_fd=...),
or pure-Python tricks could slip past it). Reading files is allowed (the stdlib needs it): do not run the sandbox
where world-readable files are secret. `sandbox_layers()` says which layers took on this machine.

Status of a run:
    ok        exited with 0
    error     exited with another code (an uncaught exception: its traceback is on stderr; sys.exit(n))
    timeout   killed at the wall-clock limit, or by the CPU-time limit (SIGXCPU, or SIGKILL past the hard limit)
    memory    ended by MemoryError (the address-space limit)
    killed    ended by another signal (a crash, SIGKILL from outside)
    refused   ended by an uncaught sandbox refusal (stderr says "[sandbox] refused: ...")

The child's bootstrap: envs/sandbox_child.py. The `python` environment built on run_code: envs/python_env.py.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .sandbox_child import _bootstrap

STATUSES = ("ok", "error", "timeout", "memory", "killed", "refused")
EXIT_REFUSED = 120  # the bootstrap's exit code when a refusal ended the run
EXIT_MEMORY = 121  # ... when MemoryError did
TRUNCATED = "\n[... output truncated]"


@dataclass
class SandboxResult:
    """What a run printed and how it ended; exit_code is negative -N when signal N ended it."""

    stdout: str
    stderr: str
    exit_code: int
    status: str  # one of STATUSES


# ---------------------------------------------------------------- the child: bootstrap functions
# ---------------------------------------------------------------- the parent: spawn, read with a cap, reap


def _user_tasks(uid: int) -> int:
    """How many tasks (threads included: RLIMIT_NPROC counts them) this user runs, as /proc shows them."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass  # gone meanwhile
    return n


def _child_env(work: Path) -> dict:
    """The child's whole environment: nothing inherited."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


@dataclass
class _Output:
    """What a child wrote: up to a cap of bytes from each stream, how many bytes were dropped after that, and
    whether the deadline came before both streams closed."""

    stdout: bytes
    stderr: bytes
    stdout_dropped: int
    stderr_dropped: int
    timed_out: bool


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> _Output:
    """Read stdout and stderr until both close or the deadline, keeping cap bytes of each. The rest is read and
    thrown away, so that a chatty child neither blocks nor fills this process's memory."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    dropped = {proc.stdout: 0, proc.stderr: 0}
    with selectors.DefaultSelector() as sel:
        for f in kept:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = kept[key.fileobj]
                room = max(0, cap - len(buf))
                buf += chunk[:room]
                dropped[key.fileobj] += len(chunk) - min(room, len(chunk))
        timed_out = bool(sel.get_map())
    o, e = proc.stdout, proc.stderr
    return _Output(bytes(kept[o]), bytes(kept[e]), dropped[o], dropped[e], timed_out)


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until the child has exited, without reaping it (its pid, and so its process group id, stay
    reserved for the kill that follows) -> False at the deadline."""
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _truncate(data: bytes, dropped: int, max_output: int) -> str:
    """The text, at most max_output characters, ending in a marker when anything was cut.

    >>> _truncate(b"abcdefghij" * 10, 0, 40)
    'abcdefghijabcdefg\\n[... output truncated]'
    """
    text = data.decode("utf-8", "replace")
    if not dropped and len(text) <= max_output:
        return text
    return text[: max(0, max_output - len(TRUNCATED))] + TRUNCATED


def _status(exit_code: int, cpu_time: float, cpu_s: float, timed_out: bool) -> str:
    """How a run ended (see the module docstring).

    >>> _status(-signal.SIGXCPU, 5.0, 5, False), _status(120, 0.1, 5, False), _status(1, 0.1, 5, False)
    ('timeout', 'refused', 'error')
    """
    if timed_out:
        return "timeout"
    if exit_code == 0:
        return "ok"
    if exit_code == EXIT_REFUSED:
        return "refused"
    if exit_code == EXIT_MEMORY:
        return "memory"
    if exit_code == -signal.SIGXCPU or (exit_code == -signal.SIGKILL and cpu_time >= cpu_s):
        return "timeout"
    return "killed" if exit_code < 0 else "error"


def _remove_tree(path: Path) -> None:
    """Remove the run's directory even where the code took away its own permissions."""
    for d, _, _ in os.walk(path):
        try:
            os.chmod(d, 0o700)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _spawn(code, *, timeout_s, cpu_s, memory_mb, file_mb, max_output, stdin, report_layers=False) -> SandboxResult:
    """run_code, with the bootstrap optionally reporting its layers on stderr."""
    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or file_mb < 0 or max_output <= 0:
        raise ValueError(
            f"sandbox limits must be positive: timeout_s={timeout_s}, cpu_s={cpu_s}, memory_mb={memory_mb}, "
            f"file_mb={file_mb}, max_output={max_output}"
        )
    base = Path(tempfile.mkdtemp(prefix="mirl-sandbox-")).resolve()
    try:
        work = base / "work"
        work.mkdir()
        (base / "main.py").write_text(code, encoding="utf-8")
        (base / "stdin").write_text(stdin, encoding="utf-8")
        settings = {
            "root": str(work),
            "code_path": str(base / "main.py"),
            "cpu_s": int(math.ceil(cpu_s)),
            "memory_mb": int(memory_mb),
            "file_mb": int(file_mb),
            "nproc": _user_tasks(os.getuid()) + 8,
            "report_layers": report_layers,
        }
        argv = [sys.executable, "-I", "-S", "-c", _bootstrap(), json.dumps(settings)]
        deadline = time.monotonic() + timeout_s
        with open(base / "stdin", "rb") as fin:
            proc = subprocess.Popen(
                argv, cwd=work, env=_child_env(work), stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        try:
            output = _read_capped(proc, deadline, 4 * max_output + 4)
            timed_out = output.timed_out or not _wait_exited(proc.pid, deadline)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group id is still ours: the leader is not reaped yet
            except ProcessLookupError:
                pass
            proc.stdout.close()
            proc.stderr.close()
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
        cpu_time = usage.ru_utime + usage.ru_stime
        return SandboxResult(
            stdout=_truncate(output.stdout, output.stdout_dropped, max_output),
            stderr=_truncate(output.stderr, output.stderr_dropped, max_output),
            exit_code=proc.returncode,
            status=_status(proc.returncode, cpu_time, cpu_s, timed_out),
        )
    finally:
        _remove_tree(base)


def run_code(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: float = 5,
    memory_mb: int = 512,
    file_mb: int = 8,
    max_output: int = 4096,
    stdin: str = "",
) -> SandboxResult:
    """Run untrusted Python code in the sandbox (module docstring) -> SandboxResult(stdout, stderr, exit_code,
    status); stdout and stderr are cut to max_output characters each. Never raises for what the code does; a
    limit that is not positive is a ValueError."""
    return _spawn(
        code, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, file_mb=file_mb, max_output=max_output,
        stdin=stdin,
    )  # fmt: skip


def sandbox_layers() -> list[str]:
    """The isolation layers that take on this machine, e.g. ['userns+netns', 'landlock(abi 7)', 'seccomp',
    'audit hook'] (the rlimits and the wall clock always do)."""
    result = _spawn(
        "", timeout_s=10.0, cpu_s=5, memory_mb=512, file_mb=1, max_output=4096, stdin="", report_layers=True
    )
    for line in result.stderr.splitlines():
        if line.startswith("[sandbox] layers:"):
            return [x.strip() for x in line.partition(":")[2].split(",") if x.strip()]
    raise RuntimeError(f"the sandbox did not start ({result.status}): {result.stderr[-500:]}")


# ---------------------------------------------------------------- the python environment
