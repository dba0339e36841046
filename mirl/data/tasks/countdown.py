"""Countdown: reach a target with + - * / over given numbers, each used at most once.

    prompt   "nums 3 7 25 target 46:"      solution "25+3*7"
The checker parses the expression with `ast` (no eval), checks the numbers used against the multiset
given, and compares the value exactly (fractions).
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from .split import sample_split

OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """Value and the numbers used, or None if the text is not an arithmetic expression."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return OPS[type(node.op)](left, right)
        raise ValueError("not arithmetic")

    try:
        return ev(tree), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class CountdownTask:
    """Reach a target with + - * / over a few given numbers; checked by parsing the expression, never eval."""

    score_columns = ("numbers", "answer")  # the fields of an example that score() reads

    def __init__(self, n_numbers: int = 3, max_number: int = 20):
        self.n_numbers, self.max_number = n_numbers, max_number
        self.name = f"countdown{n_numbers}"

    def _problem(self, rng: random.Random) -> dict:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            k = rng.randint(2, self.n_numbers)
            expr = str(nums[0])
            for x in nums[1:k]:
                op = rng.choice("+-*")
                expr = f"({expr}){op}{x}" if op == "*" and ("+" in expr or "-" in expr) else f"{expr}{op}{x}"
            value, _ = evaluate_expression(expr)
            if value.denominator == 1 and value > 0:
                shown = sorted(nums)
                return {
                    "prompt": f"nums {' '.join(map(str, shown))} target {value}:",
                    "answer": str(value),
                    "numbers": shown,
                    "solution": expr,
                }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed."""
        return sample_split(self._problem, self.name, split, n, seed)

    @staticmethod
    def extract(completion: str) -> str:
        """The first line of the completion: the expression."""
        return completion.strip().splitlines()[0] if completion.strip() else ""

    def score(self, completion: str, example: dict) -> float:
        """1.0 if the expression uses allowed numbers and hits the target. score('3*7', {...target 21})"""
        res = evaluate_expression(self.extract(completion))
        if res is None:
            return 0.0
        value, used = res
        if Counter(used) - Counter(example["numbers"]):
            return 0.0
        return float(value == Fraction(int(example["answer"])))

    # ---- the chat form, for instruct models (chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """The numbers and the target in words, asking for one expression."""
        nums = ", ".join(map(str, example["numbers"]))
        return (
            f"Using the numbers {nums} (each at most once) and + - * /, write an expression equal to "
            f"{example['answer']}. Reply with just the expression."
        )

    @staticmethod
    def chat_answer(example: dict, solution: str) -> str:
        """The expression as the answer: '25 + 3*7 = 46' reads back as the expression."""
        return f"{solution} = {example['answer']}"

    @staticmethod
    def chat_extract(completion: str) -> str:
        """The \\boxed{} answer, else the last line; a trailing '= target' dropped."""
        from .chat import last_line

        return last_line(completion).split("=")[0].strip()

    def chat_score(self, completion: str, example: dict) -> float:
        """The checker on the expression read from prose."""
        return self.score(self.chat_extract(completion), example)
