"""The built-in environments with verifiable rewards: `calc` (multiplication beyond the model's head, with a
calculator tool) and `guess` (a number game with higher/lower feedback, rewarded for solving in few turns).

    calc    What is 123*4567?  ->  <calc>123*4567</calc> <result>561741</result> 561741
            examples: 3x3 and 4x3 digit products (half each); reward 1.0 when the answer's last number is the
            product, else 0.0 (and 0.0 from finish() at the turn limit: no answer given)
    guess   Guess my number (1-100).  ->  50 / higher / 75 / lower / 62 / ...
            no tools; each turn's last number is the guess, answered "higher" or "lower" as a user message (a
            turn without a number: "say a number", a turn like any other). Solved at turn t of max_turns:
            reward 1 - (t - 1) / max_turns (1.0 at the first turn, 1/max_turns at the last), and never below 0
            when a run allows more turns than the example's max_turns; not solved by the turn limit: finish()
            gives 0.0.

Held-out splits as the built-in tasks make them (data/tasks/split.py): a problem is held out by a hash of its
key, so the test split is disjoint from the training split for any seed and size.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from ..data.tasks.split import sample_split
from .base import Step
from .tools import tool_from_function

MAX_EXPRESSION = 200  # characters a calc expression may have
MAX_DEPTH = 32  # nested parentheses


class CalcError(ValueError):
    """An expression calc refuses: not integer arithmetic, too long or too deep, or a division by zero."""


def _tokens(expression: str) -> list[str]:
    """The expression's tokens: integers, + - * / ( ); anything else is refused."""
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"too long (at most {MAX_EXPRESSION} characters)")
    out, pos = [], 0
    for m in re.finditer(r"\s*(?:(\d+)|([-+*/()]))", expression):
        if m.start() != pos:
            break
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    rest = expression[pos:].strip()
    if rest:
        raise CalcError(f"not arithmetic at {rest[:20]!r}: only integers, + - * / and parentheses")
    if not out:
        raise CalcError("empty expression")
    return out


def evaluate(expression: str) -> Fraction:
    """The exact value of integer arithmetic with + - * / and parentheses (no eval: a recursive-descent parser).

    >>> evaluate("12*(3+4)-10/4")
    Fraction(163, 2)
    """
    toks, pos = _tokens(expression), 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def expr(depth):
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth):
        value = factor(depth)
        while peek() in ("*", "/"):
            op, right = take(), factor(depth)
            if op == "/" and right == 0:
                raise CalcError("division by zero")
            value = value * right if op == "*" else value / right
        return value

    def factor(depth):
        if depth > MAX_DEPTH:
            raise CalcError(f"nested deeper than {MAX_DEPTH}")
        t = peek()
        if t in ("+", "-"):
            take()
            return factor(depth + 1) * (-1 if t == "-" else 1)
        if t == "(":
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise CalcError("unbalanced parentheses")
            take()
            return value
        if t is None or not t.isdigit():
            raise CalcError(f"expected a number, got {t or 'the end'!r}")
        return Fraction(int(take()))

    value = expr(0)
    if pos != len(toks):
        raise CalcError(f"unexpected {toks[pos]!r}")
    return value


def calc(expression: str) -> str:
    """Evaluate integer arithmetic: + - * / and parentheses.

    Args:
        expression: the arithmetic, e.g. 123*4567
    """
    try:
        value = evaluate(expression)
    except CalcError as e:
        return f"error: {e}"
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


def last_number(text: str) -> int | None:
    """The last integer in a text (digit-group commas allowed: 561,741), or None.

    >>> last_number("so it is 561,741.")
    561741
    """
    found = re.findall(r"-?\d+(?:,\d{3})*", text)
    return int(found[-1].replace(",", "")) if found else None


class CalcEnv:
    """Multi-digit multiplication with a calculator tool; reward 1.0 for the right product."""

    def __init__(self):
        self.tools = [tool_from_function(calc)]
        self.answer: int | None = None

    @staticmethod
    def problem(rng: random.Random) -> dict:
        """One 3x3 or 4x3 digit multiplication."""
        da = rng.choice((3, 4))
        a, b = rng.randint(10 ** (da - 1), 10**da - 1), rng.randint(100, 999)
        return {"prompt": f"What is {a}*{b}?", "answer": str(a * b), "difficulty": da}

    @staticmethod
    def examples(split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test', disjoint), deterministic in seed."""
        return sample_split(CalcEnv.problem, "calc", split, n, seed)

    def demonstrations(self, n: int, seed: int = 0) -> list[dict]:
        """SFT records of n training examples solved with the tool, in the plain protocol (the text an episode's
        tokens decode to): two per example, so that the model learns to call and to read the result but never
        to write a result itself (the environment's tokens are never a completion).

            {"prompt": "What is 123*4567?\\n", "completion": "<calc>123*4567</calc>"}
            {"prompt": "What is 123*4567?\\n<calc>123*4567</calc><result>561741</result>", "completion": "561741"}

        SFT appends EOS to each completion (data/collate.encode_example): the answer's EOS ends the episode as in
        a rollout; the EOS after a call is never reached in an episode, whose turn stops at `</calc>`."""
        from .protocol import Renderer  # the plain protocol's text needs no tokenizer

        renderer, out = Renderer(None, self.tools, chat=False), []
        for i, e in enumerate(self.examples("train", n, seed)):
            opening = renderer.opening_text(self.reset(e))
            expression = re.fullmatch(r"What is (.+)\?", e["prompt"]).group(1)
            call = renderer.call_text("calc", {"expression": expression})
            result = renderer.reply_text([{"role": "tool", "name": "calc", "content": calc(expression)}], False)
            where = f"calc demonstration #{i}"
            out.append({"prompt": opening, "completion": call, "where": where + " (call)"})
            out.append({"prompt": opening + call + result, "completion": e["answer"], "where": where + " (answer)"})
        return out

    def reset(self, example: dict) -> list[dict]:
        """The question as a user message."""
        self.answer = int(example["answer"])
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, message: str) -> Step:
        """The final answer: 1.0 when its last number is the product; the episode ends."""
        return Step(reward=float(last_number(message) == self.answer), done=True)

    def finish(self) -> float:
        """No answer by the turn limit: 0.0."""
        return 0.0


class GuessEnv:
    """Guess a hidden number in 1..high with higher/lower feedback; fewer turns, more reward."""

    def __init__(self, high: int = 100, max_turns: int = 8):
        self.high, self.max_turns = high, max_turns
        self.tools = []
        self.secret, self.turns, self.limit = 0, 0, max_turns

    def problem(self, rng: random.Random) -> dict:
        """One hidden number."""
        secret = rng.randint(1, self.high)
        return {
            "prompt": f"Guess my number (1-{self.high}).",
            "answer": str(secret),
            "high": self.high,
            "max_turns": self.max_turns,
            "split_key": f"guess-{self.high}-{secret}",
        }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test': disjoint sets of hidden numbers), deterministic in seed."""
        return sample_split(self.problem, f"guess{self.high}", split, n, seed)

    def reset(self, example: dict) -> list[dict]:
        """The rules as a user message."""
        self.secret, self.turns = int(example["answer"]), 0
        self.limit = int(example.get("max_turns", self.max_turns))
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, message: str) -> Step:
        """A guess: solved -> the reward, ended; else "higher", "lower" or "say a number"."""
        self.turns += 1
        guess = last_number(message)
        if guess is None:
            return Step([{"role": "user", "content": "say a number"}])
        if guess == self.secret:
            return Step(reward=max(0.0, 1.0 - (self.turns - 1) / self.limit), done=True)
        return Step([{"role": "user", "content": "higher" if guess < self.secret else "lower"}])

    def finish(self) -> float:
        """Not solved by the turn limit: 0.0."""
        return 0.0
