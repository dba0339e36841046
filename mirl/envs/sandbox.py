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

The `python` environment (`PythonEnv`): questions whose answer takes a little code ("What is the sum of the
squares of the primes below 500?"), one tool `python(code)`, reward 1.0 when the final message's last number is
the answer. See docs/agents.md.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..data.tasks.split import sample_split
from .base import Step
from .builtin import last_number
from .tools import tool_from_function

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
# These run in the sandboxed process (their source is sent with -c): stdlib only, nothing from this module's globals.


def _child_limits(cpu_s: int, memory_mb: int, file_mb: int, nproc: int) -> None:
    """Resource limits (soft = hard, never above a hard limit already set); an oversized write raises OSError."""
    import resource
    import signal

    mb = 1024 * 1024
    for which, value, slack in (
        (resource.RLIMIT_CPU, cpu_s, 1),  # SIGXCPU at cpu_s, SIGKILL a second later
        (resource.RLIMIT_AS, memory_mb * mb, 0),
        (resource.RLIMIT_FSIZE, file_mb * mb, 0),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, nproc, 0),
    ):
        hard = resource.getrlimit(which)[1]
        cap = value + slack if hard == resource.RLIM_INFINITY else min(value + slack, hard)
        resource.setrlimit(which, (min(value, cap), cap))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _child_bpf(program: list) -> list:
    """Assemble a classic-BPF program: items are label strings or (op, k[, jump-if-true, jump-if-false]) with
    label names (None: the next instruction) -> [(code, jt, jf, k)]."""
    ops = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}
    where, pc = {}, 0
    for item in program:
        if isinstance(item, str):
            where[item] = pc
        else:
            pc += 1
    out = []
    for item in program:
        if isinstance(item, str):
            continue
        op, k, yes, no = (*item, None, None)[:4]
        here = len(out) + 1
        out.append((ops[op], where[yes] - here if yes else 0, where[no] - here if no else 0, k))
    return out


def _child_kernel_layers(root: str) -> list[str]:
    """Best effort: user + net namespaces, landlock (writes only under root), seccomp (x86_64) -> the layers
    that took."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def sys_call(*args):
        return libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

    layers = []
    if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        layers.append("userns+netns")
    elif libc.unshare(0x40000000) == 0:
        layers.append("netns")
    if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return layers  # PR_SET_NO_NEW_PRIVS, which landlock and seccomp need
    abi = sys_call(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi >= 1:
        # write_file, remove_dir/file, make_char/dir/reg/sock/fifo/block/sym; refer (ABI 2), truncate (ABI 3)
        write = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
        write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
        attr = (ctypes.c_uint64 * 3)(write, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind+connect TCP
        ruleset = sys_call(444, ctypes.byref(attr), 8 if abi < 4 else 16 if abi < 6 else 24, 0)

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        if ruleset >= 0:
            rule = PathBeneath(write, os.open(root, os.O_PATH | os.O_CLOEXEC))
            if sys_call(445, ruleset, 1, ctypes.byref(rule), 0) == 0 and sys_call(446, ruleset, 0) == 0:
                layers.append(f"landlock(abi {abi})")
            os.close(rule.parent_fd)
            os.close(ruleset)
    if os.uname().machine == "x86_64":
        allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
        denied = (57, 58, 59, 322, 41, 101, 310, 311, 129, 424, 200)  # fork vfork execve execveat socket ptrace
        # process_vm_readv/writev rt_sigqueueinfo pidfd_send_signal tkill
        program = [
            ("ld", 4),
            ("jeq", 0xC000003E, None, "deny"),  # AUDIT_ARCH_X86_64, else deny all
            ("ld", 0),
            ("jge", 0x40000000, "deny", None),  # x32 system calls
            *[("jeq", nr, "deny", None) for nr in denied],
            ("jeq", 435, "nosys", None),  # clone3
            ("jeq", 56, "clone", None),
            ("jeq", 62, "signal", None),  # kill
            ("jeq", 234, "signal", None),  # tgkill
            ("ret", allow),
            "clone",
            ("ld", 16),
            ("jset", 0x10000, "allow", "deny"),  # CLONE_THREAD: a thread, not a process
            "signal",
            ("ld", 16),
            ("jeq", os.getpid(), "allow", None),
            ("jeq", 0, "allow", "deny"),
            "allow",
            ("ret", allow),
            "deny",
            ("ret", eperm),
            "nosys",
            ("ret", enosys),
        ]

        class SockFilter(ctypes.Structure):
            _fields_ = [
                ("code", ctypes.c_uint16),
                ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32),
            ]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

        code = _child_bpf(program)
        filt = (SockFilter * len(code))(*[SockFilter(*c) for c in code])
        prog = SockFprog(len(code), filt)
        # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        if libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0:
            layers.append("seccomp")
    return layers


def _child_audit_hook(root: str) -> type:
    """Install the audit hook that refuses what the sandbox forbids -> the refusal's exception class. Everything
    the hook calls is bound as a default argument, so that code patching os or builtins later cannot change it."""
    import os
    import sys

    class SandboxRefusal(PermissionError):
        """A sandbox rule refused the operation."""

    SandboxRefusal.__module__, SandboxRefusal.__qualname__ = "builtins", "PermissionError"  # tracebacks read plainly

    always = frozenset(
        "os.fork os.forkpty os.posix_spawn os.spawn os.exec os.system os.startfile subprocess.Popen pty.spawn "
        "socket.bind socket.connect socket.sendto socket.sendmsg socket.getaddrinfo socket.gethostbyname "
        "socket.gethostbyaddr socket.getnameinfo socket.sethostname os.symlink os.link sys.settrace "
        "sys.setprofile gc.get_objects gc.get_referrers gc.get_referents resource.setrlimit resource.prlimit "
        "sqlite3.load_extension sqlite3.enable_load_extension sys.remote_exec".split()
    )
    paths = {  # event -> ((position of a path, position of its dir_fd or None), ...)
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)),
        "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),),
        "os.utime": ((0, 3),),
        "os.truncate": ((0, None),),
        "os.chflags": ((0, None),),
        "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, None),),
        "sqlite3.connect": ((0, None),),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path, dir_fd=None, _fspath=os.fspath, _fsdecode=os.fsdecode, _getcwd=os.getcwd, _readlink=os.readlink):
        if isinstance(path, int):
            return True  # an open descriptor: its opening was checked
        path = _fsdecode(_fspath(path))
        if path in ("", ":memory:"):
            return True
        if not path.startswith("/"):
            base = _getcwd() if dir_fd is None else _readlink(f"/proc/self/fd/{dir_fd}")
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        path = "/" + "/".join(parts)
        return path == root or path.startswith(root + "/")

    def hook(
        event,
        args,
        _always=always,
        _paths=paths,
        _inside=inside,
        _refusal=SandboxRefusal,
        _getpid=os.getpid,
        _write_flags=write_flags,
        _isinstance=isinstance,
        _str=str,
    ):
        if event == "open":
            path, mode, flags = args
            writes = (flags or 0) & _write_flags or (_isinstance(mode, _str) and any(c in mode for c in "wax+"))
            if writes and not _inside(path):
                raise _refusal(f"[sandbox] refused: writing {path!r} outside the sandbox directory")
        elif event in _always or event.startswith("ctypes."):
            raise _refusal(f"[sandbox] refused: {event}")
        elif event in _paths:
            for i, fd in _paths[event]:
                if not _inside(args[i], args[fd] if fd is not None and len(args) > fd else None):
                    raise _refusal(f"[sandbox] refused: {event} {args[i]!r} outside the sandbox directory")
        elif event == "socket.__new__" and args[1] != 1:  # AF_UNIX pairs (asyncio's self-pipe) may be wrapped
            raise _refusal("[sandbox] refused: sockets")
        elif event in ("os.kill", "os.killpg") and args[0] not in (0, _getpid()):
            raise _refusal(f"[sandbox] refused: {event} of another process")
        elif event == "import" and args[0].partition(".")[0] in ("ctypes", "_ctypes", "cffi"):
            raise _refusal(f"[sandbox] refused: import {args[0]}")
        elif event == "object.__setattr__" and args[0] in protected:
            raise _refusal("[sandbox] refused: rewriting the sandbox")

    protected = (hook, inside)  # read from the closure: the functions cannot name themselves in their defaults
    sys.addaudithook(hook)
    return SandboxRefusal


def _child_main(settings: str) -> None:
    """The bootstrap: limits, kernel layers, audit hook, then the model's code as __main__ (exit code 120 on an
    uncaught refusal, 121 on MemoryError)."""
    import json
    import linecache
    import sys
    import traceback

    opts = json.loads(settings)
    _child_limits(opts["cpu_s"], opts["memory_mb"], opts["file_mb"], opts["nproc"])
    layers = _child_kernel_layers(opts["root"])
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    refusal = _child_audit_hook(opts["root"])
    layers.append("audit hook")
    if opts["report_layers"]:
        print("[sandbox] layers:", ", ".join(layers), file=sys.stderr)
    with open(opts["code_path"], encoding="utf-8") as f:
        code = f.read()
    linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")
    try:
        exec(compile(code, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as e:  # noqa: B036 (the child reports every ending itself)
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        finally:
            sys.exit(120 if isinstance(e, refusal) else 121 if isinstance(e, MemoryError) else 1)


@cache
def _bootstrap() -> str:
    """The -c source of the child: the bootstrap functions and a call to _child_main."""
    parts = [inspect.getsource(f) for f in (_child_limits, _child_bpf, _child_kernel_layers, _child_audit_hook)]
    parts.append(inspect.getsource(_child_main) + "\n_child_main(sys.argv[1])\n")
    return "import sys\n\n" + "\n\n".join(parts)


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


def _primes_below(n: int) -> list[int]:
    """The primes below n (a sieve).

    >>> _primes_below(12)
    [2, 3, 5, 7, 11]
    """
    sieve = bytearray([1]) * max(n, 2)
    sieve[0] = sieve[1] = 0
    for p in range(2, math.isqrt(n - 1) + 1 if n > 1 else 0):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return [i for i in range(n) if sieve[i]]


def _fibonacci(k: int) -> int:
    """F(k) with F(1) = F(2) = 1.

    >>> _fibonacci(10)
    55
    """
    a, b = 0, 1
    for _ in range(k):
        a, b = b, a + b
    return a


def python_problem(rng: random.Random) -> dict:
    """One question whose answer a few lines of code compute (five templates)."""
    kind = rng.randrange(5)
    if kind == 0:
        n = rng.randint(100, 5000)
        q, a = f"What is the sum of the squares of the primes below {n}?", sum(p * p for p in _primes_below(n))
    elif kind == 1:
        n = rng.randint(1000, 100000)
        q, a = f"How many primes are there below {n}?", len(_primes_below(n))
    elif kind == 2:
        n, x, y = rng.randint(1000, 100000), rng.randint(3, 13), rng.randint(14, 29)
        q = f"How many integers from 1 to {n} inclusive are divisible by {x} or by {y}, but not by both?"
        a = sum(1 for i in range(1, n + 1) if (i % x == 0) != (i % y == 0))
    elif kind == 3:
        k, m = rng.randint(50, 500), rng.choice((1000, 10007, 65537, 1000003))
        q, a = f"What is the {k}th Fibonacci number (F(1) = F(2) = 1) modulo {m}?", _fibonacci(k) % m
    else:
        x, e = rng.randint(2, 99), rng.randint(20, 200)
        q, a = f"What is the sum of the decimal digits of {x} to the power {e}?", sum(map(int, str(x**e)))
    return {"prompt": q, "answer": str(a), "kind": kind}


class PythonEnv:
    """Questions answered by running code, with a sandboxed `python` tool; reward 1.0 for the right number."""

    instruction = "Use the python tool to compute it, then give the final answer as a number."

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output: int = 2000):
        self.timeout_s, self.memory_mb, self.max_output = timeout_s, memory_mb, max_output
        self.tools = [tool_from_function(self.python)]
        self.answer: int | None = None

    @staticmethod
    def examples(split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test', disjoint), deterministic in seed."""
        return sample_split(python_problem, "python", split, n, seed)

    def python(self, code: str) -> str:
        """Run Python code (standard library only) and return what it prints; print the result you need.

        Args:
            code: a complete Python program, e.g. print(sum(range(10)))
        """
        r = run_code(code, timeout_s=self.timeout_s, cpu_s=self.timeout_s, memory_mb=self.memory_mb,
                     max_output=self.max_output)  # fmt: skip
        if r.status == "ok":
            return r.stdout or "(no output: print the result)"
        tail = r.stderr.strip().splitlines()[-3:]
        return _truncate(f"{r.stdout}\n[{r.status}] {' / '.join(tail)}".lstrip().encode(), 0, self.max_output)

    def reset(self, example: dict) -> list[dict]:
        """The question and the one-line instruction as a user message."""
        self.answer = int(example["answer"])
        return [{"role": "user", "content": f"{example['prompt']}\n{self.instruction}"}]

    def step(self, message: str) -> Step:
        """The final answer: 1.0 when its last number is the answer; the episode ends."""
        return Step(reward=float(last_number(message) == self.answer), done=True)

    def finish(self) -> float:
        """No answer by the turn limit: 0.0."""
        return 0.0
