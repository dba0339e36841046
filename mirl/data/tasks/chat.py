"""A built-in task for an instruct model: the question in natural words as a chat turn, the answer read from prose.

The tiny models learn the compact format ("347+85=" -> "7+5=12,4+8+1=13,3+1=4|432"). A pretrained instruct
model is asked the way people ask it, through its chat template:

    user       "What is 347 + 85? Reply with just the number."
    assistant  "347 + 85 = 432"                                   -> scores 1: the answer is read from prose

The answer is the content of the last \\boxed{...} when there is one, else the last number (arith) or the last
line (countdown, reasoning-gym); math-verify compares numbers (so "432.0" and "432" agree).

    task = as_chat(make_task("arith:2"), tokenizer)     # or chat_task(policy, "arith:2", "auto")
"""

from __future__ import annotations

import logging
import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
logging.getLogger("math_verify").setLevel(logging.ERROR)

CHAT_CHOICES = ("auto", "yes", "no")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None. last_boxed('so \\boxed{4}') == '4'"""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def last_number(text: str) -> str | None:
    """The \\boxed{} answer if any, else the last number of the text (thousands commas dropped), or None.

    >>> last_number("47 + 38 = 85.")
    '85'
    """
    boxed = last_boxed(text)
    nums = NUMBER.findall(boxed if boxed is not None else text)
    return nums[-1].replace(",", "") if nums else None


def same_number(got: str | None, want: str) -> bool:
    """Whether two number strings are equal as numbers (math-verify; '85.0' == '85')."""
    if got is None:
        return False
    from math_verify import parse, verify

    gold, pred = parse(want, parsing_timeout=None), parse(got, parsing_timeout=None)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def last_line(text: str) -> str:
    """The \\boxed{} answer if any, else the last non-empty line of the text, stripped."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class ChatTask:
    """A built-in task asked through a chat template; scored from prose. Wraps a task that has chat_question()."""

    def __init__(self, task, tokenizer):
        if not hasattr(task, "chat_question"):
            raise ValueError(f"task {task.name!r} has no chat form (use it with a model without a chat template)")
        self.task, self.tokenizer = task, tokenizer
        self.name = task.name
        self.score_columns = task.score_columns
        self.success_threshold = getattr(task, "success_threshold", 1.0)

    def _turn(self, question: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """The task's examples with the prompt a chat turn; 'task_prompt' keeps the compact one, 'question' the words,
        'solution' is the answer as prose."""
        out = []
        for e in self.task.examples(split, n, seed):
            question = self.task.chat_question(e)
            out.append(
                {
                    **e,
                    "task_prompt": e["prompt"],
                    "question": question,
                    "prompt": self._turn(question),
                    "solution": self.task.chat_answer(e, e["solution"]),
                }
            )
        return out

    def wrong_solution(self, example: dict, rng) -> str:
        """A plausible wrong answer in prose (for synthetic pairs)."""
        if not hasattr(self.task, "wrong_solution"):
            raise ValueError(f"task {self.name!r} makes no wrong solutions (use --pairs sampled)")
        compact = {**example, "prompt": example["task_prompt"]}
        return self.task.chat_answer(compact, self.task.wrong_solution(compact, rng))

    def extract(self, completion: str) -> str | None:
        """The answer read from prose."""
        return self.task.chat_extract(completion)

    def score(self, completion: str, example: dict) -> float:
        """The task's score of the answer read from prose."""
        return self.task.chat_score(completion, example)


def chat_task(task, tokenizer, chat: str = "auto"):
    """The task as the model should be asked: a ChatTask when chat is 'yes', or 'auto' and the tokenizer has a chat
    template and the task has a chat form; else the task itself (the tiny models' compact format)."""
    if chat not in CHAT_CHOICES:
        raise ValueError(f"--chat {chat!r}: must be one of {', '.join(CHAT_CHOICES)}")
    if task is None or chat == "no":
        return task
    has_template = bool(tokenizer.chat_template)
    if chat == "yes":
        if not has_template:
            raise ValueError("--chat yes: the model's tokenizer has no chat template")
        return ChatTask(task, tokenizer)
    return ChatTask(task, tokenizer) if has_template and hasattr(task, "chat_question") else task
