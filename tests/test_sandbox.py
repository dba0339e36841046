"""The sandbox (mirl/envs/sandbox.py) on hostile code: what loops, allocates, forks, writes outside, opens a socket
or prints without end is stopped or refused, and the next run goes on. The tests check the guarantees, whichever
layer gives them (kernel namespaces, landlock, seccomp, the audit hook, rlimits, the wall clock), so that they hold
on a machine where some kernel feature is off; the one test of a gap only a kernel layer closes skips without it.
Then the `python` environment: its examples, its tool and its reward on scripted messages."""

import os
import re
import resource
import signal
import time

import pytest

from mirl.envs.base import Env
from mirl.envs.python_env import PythonEnv, _primes_below, python_problem
from mirl.envs.sandbox import TRUNCATED, _status, _truncate, run_code, sandbox_layers

STOPPED = ("refused", "error")  # a forbidden operation: refused by the hook, or failed by a kernel layer


def timed(code, **kw):
    """run_code and its wall time."""
    t = time.monotonic()
    result = run_code(code, **kw)
    return result, time.monotonic() - t


# ---------------------------------------------------------------- ordinary code


def test_ordinary_code_prints_its_result_with_stdin_and_a_minimal_environment():
    r = run_code("import os, math\nprint(math.comb(10, 3), input()[::-1])\nprint(sorted(os.environ))", stdin="abc\n")
    assert r.status == "ok" and r.exit_code == 0 and r.stderr == ""
    assert r.stdout == "120 cba\n['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n"


def test_an_exception_is_an_error_with_its_traceback_and_sys_exit_keeps_its_code():
    r = run_code("x = 1\nraise ValueError('bad ' + str(x))")
    assert (r.status, r.exit_code) == ("error", 1)
    assert 'File "main.py", line 2' in r.stderr and "ValueError: bad 1" in r.stderr
    r = run_code("import sys; print('before'); sys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "before\n")


def test_a_fresh_directory_is_the_cwd_and_is_removed_after_the_run():
    r = run_code("import os\nopen('a.txt', 'w').write('hi')\nprint(os.getcwd()); print(os.listdir('.'))")
    cwd, listing = r.stdout.splitlines()
    assert r.status == "ok" and listing == "['a.txt']"
    assert not os.path.exists(cwd)
    again = run_code("import os; print(os.listdir('.'))")
    assert again.stdout == "[]\n"  # nothing left over from the run before


# ---------------------------------------------------------------- stopped


def test_an_endless_loop_is_stopped_by_the_wall_clock():
    r, wall = timed("while True: pass", timeout_s=1.0, cpu_s=30)
    assert r.status == "timeout" and wall < 2.0


def test_an_endless_loop_is_stopped_by_the_cpu_limit_before_the_wall_clock():
    r, wall = timed("while True: pass", timeout_s=10.0, cpu_s=1)
    assert r.status == "timeout" and r.exit_code == -signal.SIGXCPU and wall < 2.5


def test_a_sleeper_that_ignores_sigxcpu_and_a_silent_waiter_are_killed_at_the_wall_clock():
    code = "import signal, time\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nimport os; os.close(1); os.close(2)\n"
    r, wall = timed(code + "time.sleep(60)", timeout_s=1.0)
    assert r.status == "timeout" and r.exit_code == -signal.SIGKILL and wall < 2.0


def test_ten_gigabytes_are_refused_by_the_memory_limit():
    r, wall = timed("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert r.status == "memory" and "MemoryError" in r.stderr and "allocated" not in r.stdout and wall < 3
    r = run_code("x = []\nwhile True: x.append(bytearray(10**6))", memory_mb=128)
    assert r.status == "memory"


def test_a_file_larger_than_the_limit_is_not_written():
    r = run_code("open('big', 'wb').write(b'x' * 3 * 1024 * 1024)", file_mb=1)
    assert r.status == "error" and "File too large" in r.stderr


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "code",
    [
        "import os\npid = os.fork()\nprint('forked', pid)",
        "import subprocess\nprint('forked', subprocess.run(['echo', 'hi'], capture_output=True))",
        "import os\nprint('forked', os.system('echo hi'))",
        "import multiprocessing as mp\nprint('forked', mp.Pool(2).map(abs, [-1]))",
        "import os\nos.execv('/bin/echo', ['echo', 'forked'])",
    ],
    ids=["fork", "subprocess", "system", "multiprocessing", "exec"],
)
def test_forks_and_new_programs_are_refused(code):
    r, wall = timed(code, timeout_s=3.0)
    assert r.status in STOPPED and "forked" not in r.stdout and wall < 3.0, r


def test_a_refusal_reaches_the_code_as_a_permission_error_it_may_catch():
    r = run_code("import os\ntry:\n    os.fork()\nexcept PermissionError as e:\n    print('caught', e)")
    assert r.status == "ok" and r.stdout.startswith("caught") and "[sandbox] refused" in r.stdout
    r = run_code("import os; os.fork()")
    assert (r.status, r.exit_code) == ("refused", 120)
    assert "PermissionError: [sandbox] refused: os.fork" in r.stderr


@pytest.mark.parametrize(
    "code",
    [
        "open(TARGET, 'w').write('pwned')",
        "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.chdir(os.path.dirname(TARGET))\nopen('pwned', 'w').write('pwned')",
        "import pathlib\npathlib.Path(TARGET).write_text('pwned')",
        "import shutil\nopen('x', 'w').write('pwned')\nshutil.copy('x', TARGET)",
        "import os\nopen('x', 'w').write('pwned')\nos.rename('x', TARGET)",
        "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('pwned')",
        "import os\nos.mkdir(TARGET)",
    ],
    ids=["open", "os.open", "chdir", "pathlib", "copy", "rename", "symlink", "mkdir"],
)
def test_writes_outside_the_directory_are_refused(tmp_path, code):
    target = tmp_path / "pwned"
    r = run_code(f"TARGET = {str(target)!r}\n" + code)
    assert r.status in STOPPED and not target.exists(), r


def test_removing_a_file_outside_the_directory_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    r = run_code(f"import os\nos.remove({str(victim)!r})")
    assert r.status in STOPPED and victim.read_text() == "keep me"


def test_a_write_through_a_directory_descriptor_is_stopped_by_landlock(tmp_path):
    """os.open(name, ..., dir_fd=fd) hides the directory from the audit hook's event: only the kernel stops it."""
    if not any(layer.startswith("landlock") for layer in sandbox_layers()):
        pytest.skip("landlock is not available on this kernel")
    code = f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
    r = run_code(code + "os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=fd)")
    assert r.status in STOPPED and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "code",
    [
        "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\nprint('connected')",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'x', ('8.8.8.8', 53))\nprint('sent')",
        "import socket\nprint('connected', socket.getaddrinfo('localhost', 80))",
        "import urllib.request\nprint('connected', urllib.request.urlopen('http://127.0.0.1:1').read())",
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/var/run/docker.sock')\nprint('connected')",
    ],
    ids=["tcp", "udp", "dns", "http", "unix"],
)
def test_sockets_are_refused(code):
    r = run_code(code)
    assert r.status in STOPPED and "connected" not in r.stdout and "sent" not in r.stdout, r


def test_ctypes_signals_to_other_processes_and_rewriting_the_hook_are_refused():
    assert run_code("import ctypes").status == "refused"
    r = run_code(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert r.status in STOPPED  # this test process is still alive to check it
    assert run_code("import os; os.kill(-1, 9)").status in STOPPED
    assert run_code("import gc; print(len(gc.get_objects()))").status == "refused"


def test_threads_and_asyncio_still_work():
    code = "import asyncio, threading\nt = threading.Thread(target=print, args=('thread',))\nt.start(); t.join()\n"
    r = run_code(code + "async def f():\n    return 42\nprint(asyncio.run(f()))")
    assert (r.status, r.stdout) == ("ok", "thread\n42\n")


# ---------------------------------------------------------------- output


def test_megabytes_of_output_are_truncated_without_holding_them():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    r = run_code("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 2**20)\nprint('end')", max_output=1000)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert r.status == "ok" and len(r.stdout) == 1000 and r.stdout.endswith(TRUNCATED)
    assert grown_mb < 50, f"200 MB printed grew this process by {grown_mb:.0f} MB"


def test_printing_forever_is_stopped_and_truncated():
    r, wall = timed("while True:\n    print('y' * 1000)", timeout_s=1.0, max_output=500)
    assert r.status == "timeout" and len(r.stdout) == 500 and r.stdout.endswith(TRUNCATED) and wall < 2.0


def test_truncate_and_status_by_hand():
    assert _truncate(b"short", 0, 10) == "short"
    assert _truncate(b"x" * 10, 1, 40) == "x" * 10 + TRUNCATED  # bytes were dropped after the cap: marked
    assert _truncate("é".encode() * 100, 0, 50) == "é" * (50 - len(TRUNCATED)) + TRUNCATED
    assert _status(0, 0.1, 5, False) == "ok"
    assert _status(0, 0.1, 5, True) == "timeout"  # the wall clock wins
    assert _status(-signal.SIGKILL, 5.2, 5, False) == "timeout"  # past the hard CPU limit
    assert _status(-signal.SIGKILL, 0.1, 5, False) == "killed"
    assert _status(-signal.SIGSEGV, 0.1, 5, False) == "killed"
    assert (_status(120, 0.1, 5, False), _status(121, 0.1, 5, False), _status(2, 0.1, 5, False)) == (
        "refused",
        "memory",
        "error",
    )


def test_bad_limits_are_refused_before_running():
    with pytest.raises(ValueError, match="timeout_s=0"):
        run_code("print(1)", timeout_s=0)


def test_the_layers_on_this_machine():
    layers = sandbox_layers()
    print("sandbox layers:", layers)
    assert layers[-1] == "audit hook"


# ---------------------------------------------------------------- the python environment


def test_python_env_examples_are_deterministic_and_the_splits_disjoint():
    train, test = PythonEnv.examples("train", 200, seed=0), PythonEnv.examples("test", 50, seed=0)
    assert train == PythonEnv.examples("train", 200, seed=0) and train != PythonEnv.examples("train", 200, seed=1)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert len({e["prompt"] for e in test}) == 50 and {e["kind"] for e in train} == set(range(5))


def test_python_env_answers_agree_with_code_written_independently():
    """Each template's answer against a different implementation, run through the sandbox; and by hand: the
    primes below 12 are 2 3 5 7 11, their squares sum to 4 + 9 + 25 + 49 + 121 = 208."""
    import random

    assert sum(p * p for p in _primes_below(12)) == 208 and _primes_below(2) == []
    rng, seen = random.Random(0), {}
    while len(seen) < 5:
        ex = python_problem(rng)
        seen.setdefault(ex["kind"], ex)
    nums = {k: [int(w) for w in re.findall(r"\d+", ex["prompt"])] for k, ex in seen.items()}
    isprime = "def isprime(n):\n    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))\n"
    codes = {
        0: isprime + f"print(sum(p * p for p in range({nums[0][0]}) if isprime(p)))",
        1: isprime + f"print(sum(map(isprime, range({nums[1][0]}))))",
        2: "import math\nn, x, y = {}, {}, {}\nprint(n // x + n // y - 2 * (n // math.lcm(x, y)))".format(*nums[2][1:]),
        3: f"k, m = {nums[3][0]}, {nums[3][-1]}\nf = [0, 1]\nwhile len(f) <= k:\n    f.append(f[-1] + f[-2])\n"
        + "print(f[k] % m)",
        4: "print(sum(int(c) for c in str({} ** {})))".format(*nums[4]),
    }
    env = PythonEnv()
    for kind, ex in seen.items():
        assert env.python(codes[kind]).strip() == ex["answer"], (ex, codes[kind])


def test_python_env_tool_reset_and_reward_on_scripted_messages():
    env = PythonEnv(timeout_s=2.0)
    assert isinstance(env, Env)
    (tool,) = env.tools
    assert tool.name == "python" and tool.parameters["required"] == ["code"]
    assert tool.parameters["properties"]["code"]["type"] == "string" and tool.description
    example = {"prompt": "What is the sum of the squares of the primes below 12?", "answer": "208"}
    (opening,) = env.reset(example)
    assert opening["role"] == "user" and opening["content"].startswith(example["prompt"])
    assert PythonEnv.instruction in opening["content"]

    assert tool.fn(code="print(sum(p * p for p in (2, 3, 5, 7, 11)))") == "208\n"
    assert tool.fn(code="x = 1") == "(no output: print the result)"
    assert tool.fn(code="1 / 0").startswith("[error]") and "ZeroDivisionError" in tool.fn(code="1 / 0")
    assert tool.fn(code="import os; os.fork()").startswith("[refused]")
    assert tool.fn(code="while True: pass").startswith("[timeout]")

    for message, reward in [
        ("The code printed 208, so the answer is 208.", 1.0),
        ("The answer is 208", 1.0),
        ("208? No: the answer is 207.", 0.0),
        ("I do not know.", 0.0),
    ]:
        step = env.step(message)
        assert (step.reward, step.done, step.messages) == (reward, True, []), message
