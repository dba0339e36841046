"""The built-in environments with verifiable rewards: `calc` (multiplication beyond the model's head, with a
calculator tool) and `guess` (a number game with higher/lower feedback, rewarded for solving in few turns).

    calc    What is 123*4567?  ->  <calc>123*4567</calc> <result>561741</result> 561741
            examples: 3x3 and 4x3 digit products (half each); reward 1.0 when the answer's last number is the
            product, else 0.0 (and 0.0 from finish() at the turn limit: no answer given)
    guess   Guess my number (1-15).  ->  <guess>8</guess> <result>higher</result> <guess>12</guess>
            <result>correct</result> 12
            a tool guess(number) answering "higher", "lower" or "correct" (every call counts as a guess); the
            turn without a call is the final answer, which ends the episode: reward 1 - (g - 1) / max_guesses
            (g: the guesses made in all, max_guesses 5) when a guess was answered "correct" and the answer's last
            number is the secret, never below 0; else 0.0 (and 0.0 from finish() at the turn limit). Binary
            search needs at most 4 guesses in 1..15 (reward 0.4 or more); a run gives max_guesses + 1 turns.

Held-out splits as the built-in tasks make them (data/tasks/split.py): a problem is held out by a hash of its
key, so the test split is disjoint from the training split for any seed and size. Not guess: its 15 secrets are
too few to hold any out (what is learnt is a way to play, the same for every secret), so both splits draw them
uniformly, from different random streams.
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
    """Guess a hidden number in 1..high with a tool that answers higher/lower/correct; fewer guesses, more reward.

    The tool takes the number as text (`<guess>8</guess>`): the plain protocol writes a tool's one string
    parameter raw and anything else as JSON (`<guess>{"number": 8}</guess>`), which would take a five-guess game
    past the tiny models' 256-character context."""

    def __init__(self, high: int = 15, max_guesses: int = 5):
        self.high, self.max_guesses = high, max_guesses
        self.tools = [tool_from_function(self.guess)]
        self.secret, self.guesses, self.found = 0, 0, False

    def guess(self, number: str) -> str:
        """Guess the hidden number: the answer is higher, lower or correct.

        Args:
            number: the guess, a whole number
        """
        self.guesses += 1
        if not re.fullmatch(r"\s*-?\d+\s*", number):
            return "error: not a whole number"
        n = int(number)
        self.found = self.found or n == self.secret
        return "correct" if n == self.secret else "higher" if n < self.secret else "lower"

    def problem(self, rng: random.Random) -> dict:
        """One hidden number."""
        return {"prompt": f"Guess my number (1-{self.high}).", "answer": str(rng.randint(1, self.high))}

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n games ('train' or 'test': the same uniform secrets, from two random streams), deterministic in seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"guess{self.high}-{split}-{seed}")
        return [self.problem(rng) for _ in range(n)]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict]:
        """SFT records of n training games played by an imperfect teacher, in the plain protocol (the text an
        episode's tokens decode to): one record per guess and one for the answer, so that the model learns to guess
        inside what is left and to answer, but never to write a result itself.

            {"prompt": "Guess my number (1-15).\\n", "completion": "<guess>5</guess>"}
            {"prompt": "Guess my number (1-15).\\n<guess>5</guess><result>higher</result>",
             "completion": "<guess>12</guess>"}
            {"prompt": "...<guess>12</guess><result>correct</result>", "completion": "12"}

        The teacher guesses a random number of what is left (not the middle): it always narrows the range but
        takes about 4.1 guesses where binary search takes 3.3, so that the reward for fewer guesses has something
        to shorten. A game it would not finish in max_guesses is replayed with new draws. Deterministic in seed.
        SFT appends EOS to each completion: the answer's ends the episode as in a rollout; the one after a guess is
        never reached (the turn stops at `</guess>`)."""
        from .protocol import Renderer  # the plain protocol's text needs no tokenizer

        renderer, out = Renderer(None, self.tools, chat=False), []
        rng = random.Random(f"guess-teacher-{seed}")
        for i, e in enumerate(self.examples("train", n, seed)):
            where, secret = f"guess demonstration #{i}", int(e["answer"])
            path = self._teacher_path(secret, rng)
            text = renderer.opening_text(self.reset(e))
            for k in path:
                call = renderer.call_text("guess", {"number": str(k)})
                out.append({"prompt": text, "completion": call, "where": f"{where} (guess {k})"})
                result = self.guess(str(k))
                text += call + renderer.reply_text([{"role": "tool", "name": "guess", "content": result}], False)
            out.append({"prompt": text, "completion": e["answer"], "where": f"{where} (answer)"})
        return out

    def _teacher_path(self, secret: int, rng: random.Random) -> list[int]:
        """The teacher's guesses for a secret: each a uniform draw of what is left, the game replayed until it
        ends within max_guesses."""
        while True:
            lo, hi, path = 1, self.high, []
            while not path or path[-1] != secret:
                k = rng.randint(lo, hi)
                path.append(k)
                lo, hi = (k + 1, hi) if k < secret else (lo, k - 1) if k > secret else (lo, hi)
            if len(path) <= self.max_guesses:
                return path

    def reset(self, example: dict) -> list[dict]:
        """The rules as a user message."""
        self.secret, self.guesses, self.found = int(example["answer"]), 0, False
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, message: str) -> Step:
        """The final answer, which ends the episode: 1 - (guesses - 1) / max_guesses (at least 0) when the secret
        was found and the answer's last number is it, else 0.0."""
        solved = self.found and last_number(message) == self.secret
        return Step(reward=max(0.0, 1.0 - (self.guesses - 1) / self.max_guesses) if solved else 0.0, done=True)

    def finish(self) -> float:
        """No answer by the turn limit: 0.0."""
        return 0.0
