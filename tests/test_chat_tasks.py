"""Built-in tasks for instruct models: the question as a chat turn in natural words, the answer read from prose."""

import random

import pytest

from mirl.data.tasks import ArithTask, ChatTask, make_task
from mirl.data.tasks.chat import last_boxed, last_number
from mirl.models.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def chat_tok(hf_tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_tiny_dir))


def test_answers_are_read_from_prose():
    assert last_number("47 + 38 = 85") == "85"
    assert last_number("The sum is 1,085.") == "1085"
    assert last_number("so \\boxed{85} and then 3 more words 12") == "85"
    assert last_boxed("\\boxed{\\frac{1}{2}} x") == "\\frac{1}{2}"
    assert last_number("no digits here") is None
    task = ArithTask(2)
    ex = {"prompt": "47+38=", "answer": "85"}
    for good in ["47 + 38 = 85", "The answer is \\boxed{85}.", "85.0", "Adding them: 47 + 38 = 85"]:
        assert task.chat_score(good, ex) == 1.0, good
    for bad in ["47 + 38 = 84", "85 is close, but it is 86", "", "The sum of 47 and 38"]:
        assert task.chat_score(bad, ex) == 0.0, bad


def test_a_model_with_a_chat_template_is_asked_in_words(chat_tok):
    task = make_task("arith:2", chat_tok)
    assert isinstance(task, ChatTask)
    ex = task.examples("test", 5, 0)
    plain = ArithTask(2).examples("test", 5, 0)
    for e, p in zip(ex, plain):
        a, b = p["prompt"][:-1].split("+")
        assert e["question"] == f"What is {a} + {b}? Reply with just the number."
        assert e["prompt"] == f"<|im_start|>user\n{e['question']}<|im_end|>\n<|im_start|>assistant\n"
        assert e["solution"] == f"{a} + {b} = {p['answer']}" and e["answer"] == p["answer"]
        assert task.score(e["solution"], e) == 1.0
        assert task.score(p["solution"], e) == 1.0  # the compact chain of thought ends in the answer too
    wrong = task.wrong_solution(ex[0], random.Random(0))
    assert task.score(wrong, ex[0]) == 0.0 and wrong.startswith(ex[0]["task_prompt"][:-1].split("+")[0])


def test_tiny_models_keep_the_compact_format_and_chat_can_be_forced_or_refused(chat_tok):
    assert isinstance(make_task("arith", CharTokenizer()), ArithTask)
    assert isinstance(make_task("arith", chat_tok, "no"), ArithTask)
    with pytest.raises(ValueError, match="no chat template"):
        make_task("arith", CharTokenizer(), "yes")
    with pytest.raises(ValueError, match="no chat form"):
        make_task("digits", chat_tok, "yes")
    assert not isinstance(make_task("digits", chat_tok), ChatTask)  # auto: a task without a chat form stays


def test_countdown_in_words():
    from mirl.data.tasks import CountdownTask

    task = CountdownTask(3)
    ex = {"numbers": [3, 7, 25], "answer": "46"}
    assert "3, 7, 25" in task.chat_question(ex) and "46" in task.chat_question(ex)
    assert task.chat_score("Here it is:\n25 + 3*7 = 46", ex) == 1.0
    assert task.chat_score("\\boxed{25+3*7}", ex) == 1.0
    assert task.chat_score("25 + 7*3 + 3", ex) == 0.0  # 3 used twice


def test_eval_of_a_chat_model_scores_its_prose(hf_tiny_dir, tmp_path):
    """`mirl eval` on a model with a chat template: prompts are chat turns and the score reads the prose
    (the tiny random model is scored by the same checker; its accuracy is whatever its greedy text says)."""
    from mirl.eval import evaluate
    from mirl.models import load_policy

    policy = load_policy(hf_tiny_dir)
    task = make_task("arith:1", policy.tokenizer)
    examples = task.examples("test", 6, 0)
    res = evaluate(policy, task, examples, max_new_tokens=6)
    assert all(p.startswith("<|im_start|>user\nWhat is") for p, _, _ in res.samples)
    assert res.accuracy == pytest.approx(sum(task.score(c, e) for (_, c, _), e in zip(res.samples, examples)) / 6)
