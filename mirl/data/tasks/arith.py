"""Multi-digit addition with a short chain of thought, column by column from the right.

    prompt   "347+85="
    solution "7+5=12,4+8+1=13,3+1=4|432"        (each column: digits + carry = sum; answer after '|')

Deterministic by seed; the test split is disjoint from the training split (split.py: by a hash of
the prompt).
"""

from __future__ import annotations

import random
import re

from .split import sample_split

ANSWER_RE = re.compile(r"\|\s*(-?\d+)")


def cot(a: int, b: int) -> str:
    """The column-by-column chain of thought of a + b, ending in '|' and the sum."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        terms = [c[i] for c in (xs, ys) if i < len(c)] + (["1"] if carry else [])
        s = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={s}")
        carry = s // 10
    return ",".join(steps) + f"|{a + b}"


def wrong_cot(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong solution: one column sum off by one, the error carried through to the answer.

    Used to make unlimited synthetic preference pairs (reward-model training) that look like the
    mistakes a model makes.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    n = max(len(xs), len(ys))
    bad = rng.randrange(n)
    steps, carry, digits = [], 0, []
    for i in range(n):
        terms = [c[i] for c in (xs, ys) if i < len(c)] + (["1"] if carry else [])
        s = sum(int(t) for t in terms)
        if i == bad:
            s = s + 1 if s == 0 or rng.random() < 0.5 else s - 1
        steps.append(f"{'+'.join(terms)}={s}")
        digits.append(s % 10)
        carry = s // 10
    answer = int(("1" if carry else "") + "".join(str(d) for d in reversed(digits)))
    return ",".join(steps) + f"|{answer}"


class ArithTask:
    """Addition of two numbers with 1..digits digits."""

    score_columns = ("answer",)  # the fields of an example that score() reads

    def __init__(self, digits: int = 3):
        if digits < 1:
            raise ValueError(f"arith digits must be >= 1, got {digits}")
        self.digits = digits
        self.name = f"arith{digits}"

    def _problem(self, rng: random.Random) -> dict:
        da, db = rng.randint(1, self.digits), rng.randint(1, self.digits)
        a, b = (
            rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1),
            rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1),
        )
        # difficulty (the curriculum's order, rollout/prompts.py): the longer operand's digits
        return {"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": cot(a, b), "difficulty": max(da, db)}

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed."""
        return sample_split(self._problem, self.name, split, n, seed)

    def wrong_solution(self, example: dict, rng: random.Random) -> str:
        """A plausible wrong solution (one column sum off by one, carried to the answer), for synthetic pairs."""
        a, b = map(int, example["prompt"][:-1].split("+"))
        return wrong_cot(a, b, rng)

    @staticmethod
    def extract(completion: str) -> str | None:
        """The first number after a '|', or None."""
        m = ANSWER_RE.search(completion)
        return m.group(1) if m else None

    def score(self, completion: str, example: dict) -> float:
        """1.0 when the number after '|' equals the answer. score('1+2=3|3', {'answer': '3'}) == 1.0"""
        got = self.extract(completion)
        return float(got is not None and got.lstrip("0") == str(example["answer"]).lstrip("0"))

    def step_scores(self, completion: str, example: dict) -> list[tuple[int, float]]:
        """The step-level verifier (StepGRPO, process rewards): each column of the reference chain of thought
        and the answer is a step -> [(character offset where the step ends in the completion, 1.0 if right
        else 0.0)]. A column or answer the completion leaves out is a wrong step at its end (so stopping early
        is not a way around a wrong step); an extra column scores 0.
        step_scores('7+5=12,4+8+1=13|132', {'prompt': '47+85=', ...}) == [(6, 1.0), (15, 1.0), (19, 1.0)]"""
        a, b = map(int, example["prompt"][:-1].split("+"))
        want = cot(a, b).split("|")[0].split(",")
        head, bar, tail = completion.partition("|")
        got = head.split(",") if head else []
        out, pos = [], 0
        for k, step in enumerate(got):
            pos += len(step)
            out.append((pos, float(k < len(want) and step == want[k])))
            pos += 1  # the comma
        out += [(len(head), 0.0)] * max(0, len(want) - len(got))  # columns left out
        m = re.match(r"\s*-?\d+", tail) if bar else None
        end = len(head) + 1 + m.end() if m else len(completion)
        out.append((end, float(self.score(completion, example) == 1.0)))
        return out

    # ---- the chat form, for instruct models (chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """'347+85=' -> 'What is 347 + 85? Reply with just the number.'"""
        a, b = example["prompt"][:-1].split("+")
        return f"What is {a} + {b}? Reply with just the number."

    @staticmethod
    def chat_answer(example: dict, solution: str) -> str:
        """A compact solution as prose: '347 + 85 = 432' (the number after '|')."""
        a, b = example["prompt"][:-1].split("+")
        return f"{a} + {b} = {solution.rsplit('|', 1)[-1]}"

    @staticmethod
    def chat_extract(completion: str) -> str | None:
        """The \\boxed{} answer, else the last number of the completion."""
        from .chat import last_number

        return last_number(completion)

    def chat_score(self, completion: str, example: dict) -> float:
        """1.0 when the answer read from prose equals the sum (math-verify). chat_score('47 + 38 = 85', ...) == 1.0"""
        from .chat import same_number

        return float(same_number(self.chat_extract(completion), str(example["answer"])))
