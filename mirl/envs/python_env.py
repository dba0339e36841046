"""The `python` environment: small computational questions whose answers take a program, and one tool that runs
the model's code in the sandbox (envs/sandbox.py: run_code), the model's code being untrusted input."""

from __future__ import annotations

import math
import random

from ..data.tasks.split import sample_split
from .base import Step
from .builtin import last_number
from .sandbox import _truncate, run_code
from .tools import tool_from_function


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
