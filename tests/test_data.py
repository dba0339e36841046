"""Data: TRL formats from JSONL / parquet / datasets folders, bad input, tasks and their checkers."""

import json

import pytest

from mirl.data.collate import batch_indices, encode_example
from mirl.data.formats import DataError, SkipCounter, completion_records, load_rows, preference_records
from mirl.data.tasks import make_task
from mirl.data.tasks.arith import cot
from mirl.data.tasks.countdown import evaluate_expression
from mirl.models import CharTokenizer

TOK = CharTokenizer()
STANDARD = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "1+1?"}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    }
]
IMPLICIT = [
    {
        "chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}],
    }
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_conversational_implicit(tmp_path):
    recs = preference_records(load_rows(write_jsonl(tmp_path / "s.jsonl", STANDARD)), TOK)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in recs] == [("1+1=", "2", "3"), ("2+2=", "4", "5")]
    conv = preference_records(load_rows(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONAL)), TOK)[0]
    assert conv["prompt"] == "user: 1+1?\nassistant: " and conv["chosen"] == "2" and conv["rejected"] == "3"
    imp = preference_records(load_rows(write_jsonl(tmp_path / "i.jsonl", IMPLICIT)), TOK)[0]
    assert (imp["prompt"], imp["chosen"], imp["rejected"]) == (conv["prompt"], "2", "3")


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(STANDARD)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    for src in ("p.parquet", "folder", "dict"):
        recs = preference_records(load_rows(tmp_path / src), TOK)
        assert [r["chosen"] for r in recs] == ["2", "4"], src
        assert "row 1" in recs[1]["where"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(STANDARD[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_rows(p)


def test_missing_column_names_row_and_field(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [STANDARD[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'rejected' \(row has: chosen, prompt\)"):
        preference_records(load_rows(p), TOK)


def test_wrong_field_type(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": 3, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'prompt' must be a string"):
        preference_records(load_rows(p), TOK)


def test_empty_response_and_long_prompt_are_counted_skips():
    skips = SkipCounter()
    assert encode_example(TOK, "1+1=", "  ", 32, skips, "f.jsonl:3", "chosen") is None
    assert encode_example(TOK, "x" * 40, "2", 32, skips, "f.jsonl:4", "chosen") is None
    ids, plen = encode_example(TOK, "1+1=", "2" * 50, 32, skips, "f.jsonl:5", "chosen")
    assert len(ids) == 32 and plen == 5  # BOS + 4 prompt chars
    assert skips.counts == {"empty chosen": 1, "prompt longer than max_len": 1, "chosen truncated to max_len": 1}
    assert "first at f.jsonl:3" in skips.report()


def test_sft_formats(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
    ]
    recs = completion_records(load_rows(write_jsonl(tmp_path / "sft.jsonl", rows)), TOK)
    assert [(r["prompt"], r["completion"]) for r in recs] == [("a", "b"), ("user: q\nassistant: ", "r")]


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported format"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")


def test_arith_cot_and_checker():
    assert cot(347, 85) == "7+5=12,4+8+1=13,3+1=4|432"
    task = make_task("arith")
    a, b = task.examples("train", 50, seed=1), task.examples("train", 50, seed=1)
    assert a == b  # deterministic by seed
    test = {e["prompt"] for e in task.examples("test", 1000, seed=1)}
    assert not test & {e["prompt"] for e in task.examples("train", 2000, seed=1)}  # held out
    for e in a:
        x, y = map(int, e["prompt"][:-1].split("+"))
        assert int(e["answer"]) == x + y and task.score(e["solution"], e) == 1.0
        assert task.score(e["solution"].replace("|", "|9"), e) == 0.0
    assert task.score("no answer here", a[0]) == 0.0


def test_countdown_checker():
    task = make_task("countdown")
    ex = {"numbers": [3, 7, 25], "answer": "46"}
    assert task.score("25+3*7", ex) == 1.0
    assert task.score("25+7*3", ex) == 1.0
    assert task.score("25*3", ex) == 0.0  # wrong value
    assert task.score("25+3*7+3", ex) == 0.0  # 3 used twice
    assert task.score("__import__('os')", ex) == 0.0 and evaluate_expression("1/0") is None
    for e in task.examples("train", 30, seed=0):
        assert task.score(e["solution"], e) == 1.0


def test_reasoning_gym_adapter():
    task = make_task("rg:basic_arithmetic")
    exs = task.examples("test", 4, seed=0)
    assert exs == task.examples("test", 4, seed=0)
    assert all(task.score(e["answer"], e) == 1.0 for e in exs)
    assert task.score("definitely wrong", exs[0]) < 1.0
    with pytest.raises(ValueError, match="valid names"):
        make_task("rg:not_a_dataset")
    # the dataset's config after a second ':', values as YAML scalars; a wrong field or form is named
    legs = make_task("rg:leg_counting:min_animals=1,max_animals=1,max_instances=3")
    assert legs.name == "rg:leg_counting:min_animals=1,max_animals=1,max_instances=3"
    assert legs.kwargs == {"min_animals": 1, "max_animals": 1, "max_instances": 3}
    for e in legs.examples("train", 20, seed=0):
        assert "," not in e["prompt"].split("you have ")[1] and legs.score(e["answer"], e) == 1.0  # one kind of animal
    with pytest.raises(ValueError, match="no config field max_legs; its fields: min_animals, max_animals"):
        make_task("rg:leg_counting:max_legs=2")
    with pytest.raises(ValueError, match="'max_animals' is not key=value"):
        make_task("rg:leg_counting:max_animals")
    ops = make_task("rg:basic_arithmetic:operators=[+,-],max_terms=2,allow_negation=false")
    assert ops.kwargs == {"operators": ["+", "-"], "max_terms": 2, "allow_negation": False}
    assert make_task("rg:basic_arithmetic:operators=*").kwargs == {"operators": "*"}
    assert make_task("rg:ransom_note:p_solvable=1e-1").kwargs == {"p_solvable": 0.1}
    assert make_task("rg:ransom_note").name == "rg:ransom_note"
    # through a chat template the answer is read from prose: a box, else the last 'answer is', else the last line
    cases = {"The answer is 12 legs.": "12", "so\n\\boxed{7}": "7", "It is\nTrue": "True", "Answer: **False**": "False",
             "1. The answer is 1.\n\nThe answer is 4.": "4", "The answer is:\n42": "42", "": ""}  # fmt: skip
    assert {c: legs.chat_extract(c) for c in cases} == cases
    e = legs.examples("test", 1, seed=0)[0]
    assert legs.chat_score(f"Counting them, the answer is {e['answer']} legs.", e) == 1.0
    with pytest.raises(ValueError, match="valid: arith"):
        make_task("chess")


def test_batch_indices_cover_each_epoch_once():
    n, bs = 10, 4
    idx = [i for s in range(5) for i in batch_indices(n, bs, s, seed=3)]  # 20 = two epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert batch_indices(n, bs, 2, seed=3) == batch_indices(n, bs, 2, seed=3)


def test_grpo_runs_on_countdown(tmp_path):
    # the task reward reads the fields countdown's examples have (numbers, answer): it once asked for 'target'
    from mirl.recipes import grpo

    res = grpo.train(
        grpo.Config(task="countdown", steps=1, group_size=2, prompts_per_step=2, max_new_tokens=6, eval_n=0,
                    threads=1, report=False, out_dir=str(tmp_path))
    )  # fmt: skip
    assert len(res.history) == 1
