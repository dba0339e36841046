"""The sandboxed process's side of envs/sandbox.py: the bootstrap that puts up the resource limits, the kernel
layers (user and network namespaces, landlock, seccomp) and the audit hook before the model's code runs. These
functions run in the child (their source is sent with -c): stdlib only, nothing from this module's globals."""

from __future__ import annotations

import inspect
from functools import cache


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
