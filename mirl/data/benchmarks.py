"""Standard math benchmarks, and any question-answer dataset, as a task asked for a \\boxed{} answer.

A preset names where the benchmark lives on the hub and how its rows are read:

    name     hub id                  config  split  question  answer   the reference answer
    gsm8k    openai/gsm8k            main    test   question  answer   the number after '#### ' (commas dropped)
    math500  HuggingFaceH4/MATH-500  -       test   problem   answer   the LaTeX string as given
    aime24   HuggingFaceH4/aime_2024 -       train  problem   answer   as given ('204')
    aime25   math-ai/aime25          -       test   problem   answer   as given (an integral float 70.0 -> '70')
    amc23    math-ai/amc23           -       test   question  answer   as given (an integral float 27.0 -> '27')

`NAME:LOCAL_COPY` reads a copy in the hub dataset's own shape instead (a folder saved with save_to_disk, whose
split is the preset's, or one .parquet / .jsonl file): the only way on a machine without the hub. A preset
that is neither cached nor reachable is one line naming it and the command that fetches it.

Every question is asked the same way, through the model's chat template when it has one (data/tasks/chat.py):
the question, then "Please reason step by step, and put your final answer within \\boxed{}." The answer is read
from the completion by extract_answer (the last \\boxed{}, else "the answer is ...", else '#### ...', else the
last number) and compared with the reference by math-verify, both read as \\boxed{} contents (so 0.5 equals
\\frac12, 1,000 equals 1000, and 18 \\text{ inches} equals 18).

    task = benchmark_task("gsm8k", tokenizer)                  # the hub's openai/gsm8k (main, test)
    task = benchmark_task("gsm8k:copies/gsm8k", tokenizer)     # a local copy
    task = dataset_task("q.jsonl", tokenizer, question="q", answer="a")
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

logging.getLogger("math_verify").setLevel(logging.ERROR)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# ---- reading the reference answer ---------------------------------------------------------------------------


def plain_reference(value) -> str:
    """The answer column as a string; an integral float (a parquet column of numbers) as an integer.

    >>> plain_reference(27.0), plain_reference(" \\\\frac{14}{3} ")
    ('27', '\\\\frac{14}{3}')
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gsm8k_reference(value) -> str:
    """GSM8K's answer column is a worked solution ending in '#### <number>': the number, commas dropped.

    >>> gsm8k_reference("She has 3 + 4 = <<3+4=7>>7 apples.\\n#### 1,007")
    '1007'
    """
    text = str(value)
    if "####" not in text:
        raise ValueError("no '#### <answer>' line (GSM8K's answers end in one)")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and how its rows are read."""

    name: str
    hub_id: str
    config: str  # the hub dataset's configuration ("" = its default)
    split: str
    question: str  # the column holding the question
    answer: str  # the column holding the reference answer
    reference: object = plain_reference  # the answer column's value -> the reference answer string


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("gsm8k", "openai/gsm8k", "main", "test", "question", "answer", gsm8k_reference),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "", "test", "problem", "answer"),
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "", "train", "problem", "answer"),
        Benchmark("aime25", "math-ai/aime25", "", "test", "problem", "answer"),
        Benchmark("amc23", "math-ai/amc23", "", "test", "question", "answer"),
    )
}


# ---- reading the answer from a completion -------------------------------------------------------------------

ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)\s*([^\s:].*)", re.IGNORECASE)  # "is:" then a newline: no answer
HASHES = re.compile(r"####\s*(.+)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
NUMBER_AND_UNITS = re.compile(r"^(-?\$?\d[\d,]*(?:\.\d+)?)\s*(?:[A-Za-z][A-Za-z ]*)$")


def clean_answer(answer: str) -> str | None:
    """An answer phrase without its wrapping: math delimiters ($, \\( \\)), bold, a trailing full stop, and unit
    words after a number ('18 inches' -> '18'); None when nothing is left."""
    a = answer.strip().strip("*").strip().rstrip(".").strip()
    if a.startswith("\\(") and a.endswith("\\)"):
        a = a[2:-2].strip()
    if len(a) > 1 and a[0] == "$" and a.endswith("$"):
        a = a.strip("$").strip()
    m = NUMBER_AND_UNITS.match(a)
    if m:
        a = m.group(1)
    a = a.lstrip("$").rstrip(".").strip()
    return a or None


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives, in this order: the content of the last \\boxed{} (several boxes: the last);
    else what follows the last 'answer is' or 'answer:' on its line; else what follows '####'; else the last
    number. Wrapping ($...$, bold, a full stop) and unit words after a number are dropped. None: no answer.

    >>> extract_answer("so x = \\\\boxed{\\\\frac{1}{2}}"), extract_answer("The answer is 18 inches.")
    ('\\\\frac{1}{2}', '18')
    >>> extract_answer("no idea") is None
    True
    """
    from .tasks.chat import last_boxed

    boxed = last_boxed(completion)
    if boxed is not None:
        return clean_answer(boxed)
    for pattern in (ANSWER_IS, HASHES):
        found = [m.group(1) for line in completion.splitlines() if (m := pattern.search(line))]
        if found and clean_answer(found[-1]) is not None:
            return clean_answer(found[-1])
    numbers = NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def equivalent(answer: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference, by math-verify (both read as \\boxed{} contents: numbers,
    fractions, LaTeX expressions, intervals, sets); False for no answer or a reference it cannot read."""
    if answer is None:
        return False
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def answer_key(answer: str | None) -> str | None:
    """The form under which answers are counted as the same vote (maj@k): spaces, \\left/\\right, $ and thousands
    commas dropped, \\dfrac as \\frac, a number as its value ('27.0' -> '27').

    >>> answer_key("\\\\dfrac{1}{2}"), answer_key("1,000.0"), answer_key(None)
    ('\\\\frac{1}{2}', '1000', None)
    """
    if answer is None:
        return None
    a = re.sub(r"\s+|\\left|\\right|\$|\\!|\\,", "", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if re.fullmatch(r"-?[\d,]*\.?\d+", a):
        value = float(a.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return a


# ---- the task ---------------------------------------------------------------------------------------------


class BoxedQATask:
    """Questions with reference answers, asked for a \\boxed{} answer; scored 1 when math-verify finds the
    extracted answer equal to the reference. The chat form (chat_question, ...) puts the same words through the
    model's chat template (data/tasks/chat.py); without a template the prompt is the words themselves."""

    score_columns = ("answer",)

    def __init__(self, name: str, items: list[dict]):
        self.name, self.items = name, items  # items: {'question', 'answer', 'where'}

    def examples(self, split: str = "test", n: int = 0, seed: int = 0) -> list[dict]:
        """The first n items in the dataset's order (n 0: all); a benchmark has one split, its test set."""
        if split != "test":
            raise ValueError(f"{self.name}: a benchmark has only its test items, not a {split!r} split")
        chosen = self.items[:n] if n else self.items
        return [
            {
                "prompt": self.chat_question(item),
                "question": item["question"],
                "answer": item["answer"],
                "solution": f"\\boxed{{{item['answer']}}}",
                "where": item["where"],
            }
            for item in chosen
        ]

    @staticmethod
    def extract(completion: str) -> str | None:
        """The answer the completion gives (extract_answer)."""
        return extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        """1.0 when the extracted answer equals the reference (math-verify), else 0.0."""
        return float(equivalent(extract_answer(completion), example["answer"]))

    # ---- the chat form (data/tasks/chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """The question and the request for a reasoned, boxed answer."""
        return f"{example['question']}\n{INSTRUCTION}"

    @staticmethod
    def chat_answer(example: dict, solution: str) -> str:
        """The reference as a reply."""
        return solution

    chat_extract = extract
    chat_score = score


def read_items(rows, question: str, answer: str, reference=plain_reference, source: str = "") -> list[dict]:
    """{'question', 'answer', 'where'} of each row (formats.Row), the answer read by `reference`. A missing or
    empty column, or an answer that cannot be read, is a DataError naming the row and column."""
    items = []
    for row in rows:
        for column in (question, answer):
            if column not in row.data:
                have = ", ".join(sorted(row.data)) or "none"
                raise DataError(f"{source}{row.where}: no column {column!r} (it has: {have})")
            if row.data[column] is None or str(row.data[column]).strip() == "":
                raise DataError(f"{source}{row.where}: column {column!r} is empty")
        try:
            ref = reference(row.data[answer])
        except ValueError as e:
            raise DataError(f"{source}{row.where}: column {answer!r}: {e}") from e
        items.append({"question": str(row.data[question]), "answer": ref, "where": row.where})
    return items


def local_rows(path: str, split: str):
    """The rows of a local copy: a datasets folder's `split`, or a file's rows (a file has no splits)."""
    from .formats import load_rows

    return load_rows(path, split if Path(path).expanduser().is_dir() else "train")


def fetch_command(b: Benchmark) -> str:
    """The one line that puts a preset into the Hugging Face cache, on a machine with network."""
    config = f"'{b.config}', " if b.config else ""
    return f"python -c \"import datasets; datasets.load_dataset('{b.hub_id}', {config}split='{b.split}')\""


def benchmark_rows(spec: str, option: str = "--benchmark"):
    """The rows of a preset, `NAME` (the hub's copy, through the cache) or `NAME:LOCAL_COPY`. -> (Benchmark, rows)."""
    from .formats import load_rows

    name, _, local = spec.partition(":")
    if name not in BENCHMARKS:
        raise DataError(f"{option} {spec!r}: unknown benchmark; valid: {', '.join(BENCHMARKS)} (or NAME:LOCAL_COPY)")
    b = BENCHMARKS[name]
    if local:
        try:
            return b, local_rows(local, b.split)
        except DataError as e:
            raise DataError(f"{option} {name}: {e}") from e
    try:
        return b, load_rows(b.hub_id, b.split, b.config)
    except DataError as e:
        if "not in the Hugging Face cache" not in str(e):
            raise DataError(f"{option} {name}: {e}") from e
        raise DataError(
            f"{option} {name}: {b.hub_id} ({b.config + ', ' if b.config else ''}{b.split}) is not in the Hugging Face "
            f"cache and the hub cannot be reached; fetch it on a machine with network: {fetch_command(b)} (then copy "
            f"~/.cache/huggingface here), or give a local copy: {option} {name}:PATH"
        ) from e


def benchmark_task(spec: str, tokenizer=None, chat: str = "auto", option: str = "--benchmark"):
    """A preset as a task (asked through the chat template when the tokenizer has one, chat 'auto')."""
    from .tasks.chat import chat_task

    b, rows = benchmark_rows(spec, option)
    task = BoxedQATask(b.name, read_items(rows, b.question, b.answer, b.reference, f"{option} {b.name}: "))
    return task if tokenizer is None else chat_task(task, tokenizer, chat)


def dataset_task(
    path: str,
    tokenizer=None,
    chat: str = "auto",
    *,
    question: str = "question",
    answer: str = "answer",
    split: str = "",
    config: str = "",
    revision: str = "",
):
    """Any question-answer dataset (a .jsonl or .parquet file, a datasets folder or a hub id) as a task, its answer
    column read as given. split '': 'test' of a datasets folder or hub dataset, the rows of a file."""
    from ..models.hf import is_hub_id
    from .formats import load_rows
    from .tasks.chat import chat_task

    if is_hub_id(str(path)) or config or revision:
        rows = load_rows(path, split or "test", config, revision)
    else:
        rows = load_rows(path, split) if split else local_rows(path, "test")
    task = BoxedQATask(Path(str(path)).name, read_items(rows, question, answer))
    return task if tokenizer is None else chat_task(task, tokenizer, chat)
